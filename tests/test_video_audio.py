"""Video and audio towers beyond the generated shape/gradient/NaN tests: image-weight inflation,
DropToken, and padding masks that really mask."""

from __future__ import annotations

import pytest
import torch

from mmpretrain.encoders import build_encoder
from mmpretrain.encoders.audio import EXAMPLE_AST, EXAMPLE_WAVE
from mmpretrain.encoders.video import EXAMPLE as VIDEO

torch.manual_seed(0)


def video(variant: str, **over):
    return build_encoder("video", variant, {**VIDEO, **over}, embed_dim=16).eval()


def test_image_vit_weights_inflate_into_the_spatial_part():
    import timm

    image = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    enc = video("vivit_fe")
    loaded = enc.inflate_from_image(image.state_dict())
    assert "blocks.1.attn.qkv.weight" in loaded
    torch.testing.assert_close(enc.blocks[1].attn.qkv.weight, image.blocks[1].attn.qkv.weight)
    # a clip of one frame repeated: the inflated tubelet sees exactly the image's patch embedding
    frame = torch.randn(1, 3, 32, 32)
    clip = frame.unsqueeze(1).expand(1, 4, 3, 32, 32)
    tokens = enc.tubelet(clip.transpose(1, 2)).flatten(3).permute(0, 2, 3, 1)[0, 0]  # (N, D) of time step 0
    torch.testing.assert_close(tokens, image.patch_embed(frame)[0], atol=1e-5, rtol=1e-5)
    # and the spatial CLS of each time step equals the image ViT's pre-norm CLS through the same blocks
    x = torch.cat([image.cls_token, image.patch_embed(frame)], 1) + image.pos_embed
    for block in image.blocks:
        x = block(x)
    s = torch.cat([enc.cls_token + enc.pos_embed[:, :1], tokens[None] + enc.pos_embed[:, 1:]], 1)
    for block in enc.blocks:
        s = block(s)
    torch.testing.assert_close(s[:, 0], x[:, 0], atol=1e-5, rtol=1e-5)


def test_inflation_refuses_mismatched_depth():
    import timm

    image = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=0
    )
    with pytest.raises(ValueError, match="lack"):
        video("vivit_fe").inflate_from_image(image.state_dict())


@pytest.mark.parametrize("variant", ["vivit_fe", "vivit_fsa"])
def test_padded_frames_do_not_change_the_embedding(variant):
    enc = video(variant)
    clip = torch.randn(1, 4, 3, 32, 32)
    mask = torch.tensor([[True, True, False, False]])
    other = clip.clone()
    other[:, 2:] = torch.randn(1, 2, 3, 32, 32)  # different padding content
    a, b = enc({"video": clip, "video_mask": mask}), enc({"video": other, "video_mask": mask})
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, enc({"video": other}))  # without the mask the padding counts


@pytest.mark.parametrize("variant, example", [("ast", EXAMPLE_AST), ("waveform", EXAMPLE_WAVE)])
def test_padded_audio_does_not_change_the_embedding(variant, example):
    enc = build_encoder("audio", variant, example, embed_dim=16).eval()
    s = enc.p.samples
    wave = torch.randn(1, s) * 0.1
    mask = torch.zeros(1, s, dtype=torch.bool)
    mask[:, : s // 2] = True
    other = wave.clone()
    other[:, s // 2 + enc.samples_per_token * 2 :] = torch.randn(1, s - s // 2 - enc.samples_per_token * 2)
    torch.testing.assert_close(enc({"audio": wave, "audio_mask": mask}), enc({"audio": other, "audio_mask": mask}))


@pytest.mark.parametrize(
    "modality, name, example",
    [
        ("video", "vivit_fe", VIDEO),
        ("video", "vivit_fsa", VIDEO),
        ("audio", "ast", EXAMPLE_AST),
        ("audio", "waveform", EXAMPLE_WAVE),
    ],
)
def test_drop_token_only_in_training(modality, name, example):
    enc = build_encoder(modality, name, {**example, "drop_token": 0.5}, embed_dim=16)
    batch = enc.example_batch(2)
    enc.train()
    torch.manual_seed(1)
    a = enc(batch)
    torch.manual_seed(2)
    b = enc(batch)
    assert not torch.allclose(a, b)  # different tokens kept
    assert torch.isfinite(a).all()
    enc.eval()
    torch.testing.assert_close(enc(batch), enc(batch))


def test_bad_audio_and_video_params_fail_at_config_time():
    from mmpretrain.config.strict import ConfigError

    with pytest.raises(ConfigError, match="multiple"):
        build_encoder("video", "vivit_fe", {**VIDEO, "frames": 5}, embed_dim=16)
    with pytest.raises(ConfigError, match="drop_token"):
        build_encoder("audio", "ast", {**EXAMPLE_AST, "drop_token": 1.0}, embed_dim=16)
    with pytest.raises(ConfigError, match="sample_rate"):
        build_encoder("audio", "waveform", {**EXAMPLE_WAVE, "sample_rate": 10}, embed_dim=16)


def test_init_from_inflates_a_trained_image_tower_into_a_fresh_runs_video_tower(tmp_path):
    """towers.video.init_from: an image-text checkpoint's timm ViT starts the video tower (positions
    resampled from a 64 px to a 32 px grid); a second init_from copies a same-modality tower."""
    from safetensors.torch import save_model

    from mmpretrain.config.strict import ConfigError
    from mmpretrain.models.contrastive import ContrastiveModel
    from mmpretrain.models.init import init_towers
    from mmpretrain.training.validate import experiment_from_tree

    vit = {
        "model_name": "vit_tiny_patch16_224",
        "image_size": 64,
        "kwargs": {"patch_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2},
    }
    text = {
        "encoder": "openclip_text",
        "params": {"text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    }
    image_model = ContrastiveModel(
        experiment_from_tree(
            {"model": {"embed_dim": 16, "towers": {"image": {"encoder": "timm_vision", "params": vit}, "text": text}}}
        ).model
    )
    save_model(image_model, str(tmp_path / "image.safetensors"))
    video_tower = {
        "encoder": "vivit_fe",
        "init_from": str(tmp_path / "image.safetensors"),
        "params": {**VIDEO, "image_size": 32, "patch_size": 16},
    }
    tree = {
        "model": {"embed_dim": 16, "towers": {"video": video_tower, "text": text}},
        "loss": {"pairs": [{"a": "video", "b": "text"}]},
    }
    model = ContrastiveModel(experiment_from_tree(tree).model)
    assert init_towers(model, model.cfg) == {"video": 4 + 2 * 12}  # proj w/b, cls, pos + 2 blocks x 12 tensors
    trunk = image_model.towers["image"].trunk
    torch.testing.assert_close(model.towers["video"].blocks[1].mlp.fc2.weight, trunk.blocks[1].mlp.fc2.weight)
    assert model.towers["video"].pos_embed.shape == (1, 5, 32)  # 4 patches + CLS, resampled from 16 + CLS
    torch.testing.assert_close(model.towers["video"].pos_embed[:, 0], trunk.pos_embed[:, 0])
    # the same modality copies as it is
    save_model(model, str(tmp_path / "video.safetensors"))
    tree["model"]["towers"]["video"]["init_from"] = str(tmp_path / "video.safetensors")
    again = ContrastiveModel(experiment_from_tree(tree).model)
    init_towers(again, again.cfg)
    torch.testing.assert_close(again.towers["video"].tubelet.weight, model.towers["video"].tubelet.weight)
    tree["model"]["towers"]["video"]["init_from"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="init_from .*missing: no checkpoint at"):
        init_towers(again, experiment_from_tree(tree).model)
