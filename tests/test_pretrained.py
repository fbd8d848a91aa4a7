"""Loading open_clip checkpoints offline, exporting to open_clip, and zero-shot parity."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

from mmpretrain import api
from mmpretrain.models.formats import open_clip_model_config
from tests.conftest import OC_CFG

PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=12)(["a cat", "a dog on a mat", "x", "two birds"])
    return images, tokens


def assert_same_embeddings(ours, theirs):
    images, tokens = inputs()
    with torch.no_grad():
        want_i = theirs.encode_image(images, normalize=True)
        want_t = theirs.encode_text(tokens, normalize=True)
    got_i = api.encode(ours, "image", {"image": images})
    got_t = api.encode(ours, "text", {"text": tokens, "text_mask": tokens != 0})
    assert (got_i - want_i).abs().max() < 1e-5 and (got_t - want_t).abs().max() < 1e-5


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_file_loads_with_same_embeddings(oc_model, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in oc_model.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(path))
    ours = api.create_model(open_clip_model_config(OC_CFG), pretrained=path)
    assert_same_embeddings(ours, oc_model)
    assert ours.logit_scale.item() == pytest.approx(3.0)


def test_open_clip_local_dir_with_preprocess_config(oc_model, tmp_path):
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors")
    )
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG, "preprocess_cfg": PRE}))
    ours = api.create_model(f"local-dir:{tmp_path}")
    assert_same_embeddings(ours, oc_model)
    ctx = ours.data_context()  # preprocessing from the checkpoint's own config, not guessed
    img = ctx.image
    assert img.mean == tuple(PRE["mean"]) and img.std == tuple(PRE["std"]) and img.interpolation == "bilinear"
    assert img.size == (32, 32)
    same = api.load_checkpoint(tmp_path)
    assert_same_embeddings(same, oc_model)


def test_export_loads_in_open_clip(tmp_path, tiny_model_cfg):
    torch.manual_seed(3)
    ours = api.create_model(tiny_model_cfg)
    out = api.export_open_clip(ours, tmp_path / "export")
    theirs = open_clip.create_model(f"local-dir:{out}").eval()
    assert_same_embeddings(ours, theirs)
    back = api.create_model(f"local-dir:{out}")
    assert_same_embeddings(back, theirs)


def test_wrong_weights_fail_clearly(oc_model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(path))
    bigger = json.loads(json.dumps(OC_CFG))
    bigger["vision_cfg"]["layers"] = 3
    with pytest.raises(ValueError, match="does not fit the model: missing"):
        api.create_model(open_clip_model_config(bigger), pretrained=path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope.pt"):
        api.create_model("ViT-B-32", pretrained=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown model 'ViT-Q'"):
        api.create_model("ViT-Q")


def test_zero_shot_equals_open_clip_classifier(oc_model, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    ours = api.create_model(open_clip_model_config(OC_CFG), pretrained=tmp_path / "w.safetensors")
    classes = ["cat", "dog", "bird", "fish", "horse"]
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of the {c}.", lambda c: f"{c}, up close"]
    want = open_clip.build_zero_shot_classifier(
        oc_model,
        open_clip.tokenizer.SimpleTokenizer(context_length=12),
        classes,
        templates,
        num_classes_per_batch=2,
        use_tqdm=False,
    )
    clf = api.zero_shot([t("<>") for t in templates], classes, model=ours, progress=False)
    assert (clf.weights.T - want).abs().max() < 1e-5
    images, _ = inputs()
    with torch.no_grad():
        want_logits = oc_model.logit_scale.exp() * oc_model.encode_image(images, normalize=True) @ want
    assert (clf.logits(images) - want_logits).abs().max() < 1e-4
    assert clf.weights is clf.weights  # cached


def test_zero_shot_predict_inputs_and_errors(tmp_path, tiny_model_cfg):
    model = api.create_model(tiny_model_cfg)
    clf = api.zero_shot("a photo of a <>", ["cat", "dog", "car"], model=model, progress=False)
    paths = []
    for i, color in enumerate([(200, 0, 0), (0, 200, 0)]):
        Image.new("RGB", (50, 40), color).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    by_path = clf.predict(paths, k=2)
    by_pil = clf.predict([Image.open(p) for p in paths], k=2)
    assert len(by_path) == 2 and len(by_path[0]) == 2 and by_path[0][0][0] in clf.classes
    assert [c for c, _ in by_path[0]] == [c for c, _ in by_pil[0]]
    assert abs(sum(p for _, p in clf.predict(paths[0], k=3)[0]) - 1) < 1e-5
    assert clf.logits(torch.randn(3, 32, 32)).shape == (1, 3)  # one preprocessed sample
    loader = [torch.randn(2, 3, 32, 32), {"image": torch.randn(3, 3, 32, 32)}]
    assert clf.logits(loader).shape == (5, 3)
    assert len(api.zero_shot("imagenet80", ["cat"], model=model).templates) == 80
    with pytest.raises(ValueError, match="no '<>' placeholder"):
        api.zero_shot("a photo of a cat", ["cat"], model=model)
    with pytest.raises(ValueError, match="empty"):
        api.zero_shot("a <>", [], model=model)
    with pytest.raises(ValueError, match="duplicate class names: cat"):
        api.zero_shot("a <>", ["cat", "dog", "cat"], model=model)
    image_only = api.create_model({"embed_dim": 32, "towers": {"image": tiny_model_cfg.towers["image"].__dict__}})
    with pytest.raises(ValueError, match="needs a text tower"):
        api.zero_shot("a <>", ["cat"], model=image_only)
    with pytest.raises(FileNotFoundError, match="image not found"):
        clf.predict([tmp_path / "missing.png"])


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_hf_clip_and_siglip_folders(model_type):
    import transformers

    from mmpretrain.encoders.hf_clip import tiny_folder

    path = tiny_folder(model_type)["path"]
    ref = getattr(transformers, "CLIPModel" if model_type == "clip" else "SiglipModel").from_pretrained(path).eval()
    ours = api.load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1, 999, (3, 16), generator=g)

    def feats(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    with torch.no_grad():
        want_i = torch.nn.functional.normalize(feats(ref.get_image_features(pixel_values=images)), dim=-1)
        kwargs = {"attention_mask": torch.ones_like(ids)} if model_type == "clip" else {}
        want_t = torch.nn.functional.normalize(feats(ref.get_text_features(input_ids=ids, **kwargs)), dim=-1)
    got_i = api.encode(ours, "image", {"image": images})
    got_t = api.encode(ours, "text", {"text": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool)})
    assert (got_i - want_i).abs().max() < 1e-5 and (got_t - want_t).abs().max() < 1e-5
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item(), abs=1e-5)
    if model_type == "siglip":
        assert ours.logit_bias.item() == pytest.approx(ref.logit_bias.item(), abs=1e-5)


def test_model_id_is_stable():
    """Embedding folders and indexes record model_id: the same weights and preprocessing must keep their id
    across code changes (value computed before the input specs were keyed by modality)."""
    import torch

    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    assert api.model_id(api.create_model(TINY_MODEL)) == "152f034277ed1a3b"  # every tower's input spec hashed


def test_model_id_covers_every_towers_input_spec():
    """A video tower's fps or an audio tower's sample rate decides the embeddings as an image's size does:
    the same weights with another spec get another id (before, only the image preprocessing was hashed)."""
    import torch

    from mmpretrain.encoders.audio import EXAMPLE_WAVE
    from mmpretrain.encoders.video import EXAMPLE as VIDEO

    def model(video=None, audio=None):
        towers = {"video": {"encoder": "vivit_fe", "params": {**VIDEO, **(video or {})}},
                  "audio": {"encoder": "waveform", "params": {**EXAMPLE_WAVE, **(audio or {})}}}  # fmt: skip
        torch.manual_seed(0)
        return api.create_model({"embed_dim": 16, "towers": towers})

    base = model()
    assert api.model_id(model()) == api.model_id(base)
    faster = model(video={"fps": 2 * base.input_spec("video").fps})
    rate = EXAMPLE_WAVE["sample_rate"]  # twice the rate for half the time: the same samples, the same weights
    resampled = model(audio={"sample_rate": 2 * rate, "seconds": EXAMPLE_WAVE["seconds"] / 2})
    for other in (faster, resampled):
        assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), other.state_dict().values()))
        assert api.model_id(other) != api.model_id(base)


def test_export_replaces_an_export_and_refuses_other_folders(tmp_path, tiny_model_cfg):
    model = api.create_model(tiny_model_cfg)
    out = api.export_open_clip(model, tmp_path / "e")
    api.export_open_clip(model, out)  # an earlier export: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier open_clip export"):
        api.export_open_clip(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    api.export_open_clip(model, tmp_path / "mine", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
