"""Fine-tuning from pretrained weights: ``model.pretrained`` (open_clip file and folder, Hugging Face
CLIP folder) and ``towers.<m>.init_from`` (a timm weights file for a timm tower); step-0 embeddings
equal the source's, a few steps train, the result exports and loads back in open_clip; LiT with a
locked pretrained image tower leaves that tower untouched."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmpretrain import api
from mmpretrain.config.strict import ConfigError
from mmpretrain.models import build_model
from mmpretrain.models.formats import open_clip_model_config
from mmpretrain.models.init import init_towers
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import OC_CFG, experiment_tree
from tests.test_pretrained import PRE, assert_same_embeddings


def oc_folder(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG, "preprocess_cfg": PRE}))
    return folder


def start(tree: dict):
    """The model a fresh run starts from (what ``train`` builds before step 1)."""
    cfg = experiment_from_tree(tree)
    model = build_model(cfg.model)
    init_towers(model, cfg.model)
    return cfg, model.eval()


def train_from(tree: dict, toy_shards, tmp_path, steps: int = 3):
    tree = {
        **experiment_tree(toy_shards, tmp_path / "runs", train={"steps": steps, "ckpt_every": steps}),
        "model": tree["model"],
    }
    run = api.train(experiment_from_tree(tree))
    return api.load_checkpoint(run / "checkpoints"), run


def test_from_an_open_clip_folder_trains_and_goes_back_to_open_clip(oc_model, toy_shards, tmp_path):
    folder = oc_folder(oc_model, tmp_path / "oc")
    tree = {"model": {"pretrained": f"local-dir:{folder}"}}
    cfg, model = start(tree)
    assert_same_embeddings(model, oc_model)  # step 0 is open_clip's model
    assert model.logit_scale.item() == pytest.approx(3.0)
    image = model.data_context().image  # its preprocessing, not our defaults
    assert image.mean == tuple(PRE["mean"]) and image.interpolation == "bilinear" and image.size == (32, 32)
    trained, run = train_from(tree, toy_shards, tmp_path)
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())["model"]
    assert (
        resolved["pretrained"] == f"local-dir:{folder}" and resolved["towers"]["image"]["encoder"] == "openclip_vision"
    )
    before, after = model.state_dict(), trained.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed nothing"
    out = api.export_open_clip(trained, tmp_path / "export")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    assert_same_embeddings(trained, back)


def test_from_an_open_clip_weights_file_with_its_architecture(oc_model, toy_shards, tmp_path):
    save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    arch = tmp_path / "arch.yaml"
    arch.write_text(yaml.safe_dump({"model": open_clip_model_config(OC_CFG)}))
    tree = {"model": {"pretrained": str(tmp_path / "w.safetensors"), "architecture": str(arch)}}
    _, model = start(tree)
    assert_same_embeddings(model, oc_model)
    trained, _ = train_from(tree, toy_shards, tmp_path)
    back = open_clip.create_model(f"local-dir:{api.export_open_clip(trained, tmp_path / 'export')}").eval()
    assert_same_embeddings(trained, back)
    for model in ({}, {"towers": {"image": {"lr_mult": 0.1}}}):  # the shipped fine-tune YAML's override
        with pytest.raises(ConfigError, match="holds no architecture; set model.architecture"):
            experiment_from_tree({"model": {"pretrained": str(tmp_path / "w.safetensors"), **model}})


def test_a_changed_architecture_is_refused_clearly(oc_model, tmp_path):
    folder = oc_folder(oc_model, tmp_path / "oc")
    tree = {"model": {"pretrained": f"local-dir:{folder}", "embed_dim": 16}}
    with pytest.raises(ConfigError, match="differs from the checkpoint's"):
        start(tree)


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_from_a_hugging_face_folder(model_type, toy_shards, tmp_path):
    """Temperature and (SigLIP) bias come along; a CLIP folder also trains a few steps."""
    from mmpretrain.encoders.hf_clip import tiny_folder

    path = tiny_folder(model_type)["path"]
    tree = {"model": {"pretrained": path}}
    _, model = start(tree)
    ref = api.load_checkpoint(path)  # parity with transformers' CLIPModel / SiglipModel: test_pretrained
    batch = {"image": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(api.encode(model, "image", batch), api.encode(ref, "image", batch))
    assert model.logit_scale.item() == pytest.approx(ref.logit_scale.item())
    if model_type == "siglip":
        assert model.logit_bias is not None and model.logit_bias.item() == pytest.approx(ref.logit_bias.item())
        return
    trained, _ = train_from(tree, toy_shards, tmp_path, steps=2)
    assert trained.logit_scale.item() == pytest.approx(ref.logit_scale.item(), abs=0.05)


def test_lit_with_a_locked_pretrained_image_tower(oc_model, toy_shards, tmp_path):
    folder = oc_folder(oc_model, tmp_path / "oc")
    tree = {"model": {"pretrained": f"local-dir:{folder}", "towers": {"image": {"freeze": True}}}}
    _, model = start(tree)
    trained, _ = train_from(tree, toy_shards, tmp_path)
    for name, value in model.towers["image"].state_dict().items():
        assert torch.equal(trained.towers["image"].state_dict()[name], value), name
    assert any(
        not torch.equal(v, trained.towers["text"].state_dict()[k]) for k, v in model.towers["text"].state_dict().items()
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_tower_from_a_timm_weights_file(tmp_path, suffix):
    import timm

    from tests.conftest import TINY_MODEL

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64)  # with its classifier
    path = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    image = {
        "encoder": "timm_vision",
        "params": {"model_name": "vit_tiny_r_s16_p8_224", "image_size": 64},
        "init_from": str(path),
    }
    tree = {"model": {**TINY_MODEL, "towers": {**TINY_MODEL["towers"], "image": image}}}
    _, model = start(tree)
    trunk = model.towers["image"].trunk.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(trunk[name], value), name
    other = tmp_path / f"other{suffix}"
    torch.save({"foo": torch.zeros(1)}, other) if suffix == ".pth" else save_file({"foo": torch.zeros(1)}, str(other))
    image["init_from"] = str(other)
    with pytest.raises(ConfigError, match="not weights of vit_tiny_r_s16_p8_224"):
        start(tree)


def test_a_resumed_run_reads_its_own_checkpoint_not_pretrained(oc_model, toy_shards, tmp_path):
    folder = oc_folder(oc_model, tmp_path / "oc")
    tree = {
        **experiment_tree(toy_shards, tmp_path / "runs", train={"steps": 4, "ckpt_every": 2, "stop_after": 2}),
        "model": {"pretrained": f"local-dir:{folder}"},
    }
    run = api.train(experiment_from_tree(tree))
    first = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    import shutil

    shutil.rmtree(folder)  # the source is gone: a resume from the run's resolved.yaml must not need it
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())
    resolved["train"] = {**resolved["train"], "resume": "latest", "stop_after": None}
    api.train(experiment_from_tree(resolved))
    last = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert set(first) == set(last) and any(not torch.equal(first[k], last[k]) for k in first)


def test_the_documented_fine_tuning_config_runs(oc_model, toy_shards, tmp_path):
    from mmpretrain.training.validate import load_experiment
    from tests.conftest import ROOT

    folder = oc_folder(oc_model, tmp_path / "oc")
    cfg = load_experiment(
        ROOT / "configs/experiment/finetune_open_clip.yaml",
        [
            f"model.pretrained=local-dir:{folder}",
            f"data.train={toy_shards}",
            "data.batch_size=8",
            "data.num_workers=0",
            "train.steps=2",
            f"train.run_dir={tmp_path / 'run'}",
            "train.progress=false",
        ],
    )
    assert cfg.model.towers["image"].lr_mult == 0.1 and cfg.model.towers["image"].encoder == "openclip_vision"
    run = api.train(cfg)
    assert (run / "checkpoints").is_dir()


def test_partial_unfreezing_of_a_pretrained_tower(oc_model, toy_shards, tmp_path):
    """towers.image.trainable_layers=2 (open_clip's lock(unlocked_groups=2)): only the projection and the
    last block with the final norm of the pretrained image tower train; the rest stays as loaded."""
    folder = oc_folder(oc_model, tmp_path / "oc")
    tree = {"model": {"pretrained": f"local-dir:{folder}", "towers": {"image": {"trainable_layers": 2}}}}
    _, model = start(tree)
    trainable = {n for n, p in model.towers["image"].named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and {"visual.ln_post.weight", "visual.ln_post.bias"} <= trainable
    assert {n.split(".")[3] for n in trainable if "resblocks" in n} == {"1"}  # the last of 2 blocks
    trained, _ = train_from(tree, toy_shards, tmp_path)
    before, after = model.towers["image"].state_dict(), trained.towers["image"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "resblocks.0." in k or "conv1" in k)
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    timm_tower = {"encoder": "timm_vision", "params": {"model_name": "vit_tiny_r_s16_p8_224", "image_size": 64}}
    text = open_clip_model_config(OC_CFG)["towers"]["text"]
    with pytest.raises(ConfigError, match="vit_tiny_r_s16_p8_224 has 12 blocks to unfreeze"):
        start({"model": {"embed_dim": 32, "towers": {"image": {**timm_tower, "trainable_layers": 99}, "text": text}}})


def test_a_missing_pretrained_reference_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained: no checkpoint at .*resolved.yaml"):
        experiment_from_tree({"model": {"pretrained": f"local-dir:{tmp_path / 'gone'}"}})


def test_a_sharded_hugging_face_folder_loads_with_its_temperature_and_bias(tmp_path):
    """A folder saved in shards (``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``,
    as the hub keeps large models) loads like a single-file one, its SigLIP scalars included."""
    import transformers

    from mmpretrain.encoders.hf_clip import tiny_folder

    single = tiny_folder("siglip")["path"]
    model = transformers.SiglipModel.from_pretrained(single)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                 "preprocessor_config.json"):  # fmt: skip
        if (Path(single) / name).is_file():
            (sharded / name).write_bytes((Path(single) / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    ours, ref = api.load_checkpoint(sharded), api.load_checkpoint(single)
    assert ours.logit_scale.item() == ref.logit_scale.item() and ours.logit_bias.item() == ref.logit_bias.item()
    batch = {"image": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(api.encode(ours, "image", batch), api.encode(ref, "image", batch))


def test_a_hugging_face_folder_of_sharded_pytorch_model_bins_loads_with_its_temperature_and_bias(tmp_path):
    """Older hub folders keep large models as ``pytorch_model-0000x-of-0000y.bin`` shards named by
    ``pytorch_model.bin.index.json`` (read with ``torch.load(weights_only=True)``): they load like a
    single-file folder, the SigLIP scalars (put in the last shard here) included."""
    from safetensors.torch import load_file

    from mmpretrain.encoders.hf_clip import tiny_folder

    single = Path(tiny_folder("siglip")["path"])
    state = load_file(single / "model.safetensors")
    towers = [k for k in state if k not in ("logit_scale", "logit_bias")]
    shards = [towers[0::2], towers[1::2], ["logit_scale", "logit_bias"]]  # the scalars in the last shard
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    where = {}
    for i, part in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in part}, sharded / name)
        where.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    for file in single.iterdir():
        if file.is_file() and not file.name.startswith("model.safetensors"):
            (sharded / file.name).write_bytes(file.read_bytes())
    assert set(where) == set(state) and len(set(where.values())) == 3
    ours, ref = api.load_checkpoint(sharded), api.load_checkpoint(single)
    assert ours.logit_scale.item() == ref.logit_scale.item() and ours.logit_bias.item() == ref.logit_bias.item()
    batch = {"image": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(api.encode(ours, "image", batch), api.encode(ref, "image", batch))


def test_a_weight_index_is_read_as_untrusted(tmp_path):
    """A sharded folder's index may name only files of the folder, and only ones that are there."""
    from mmpretrain.errors import CheckpointError
    from mmpretrain.models.pretrained import _hf_scalars

    index = tmp_path / "pytorch_model.bin.index.json"
    for weight_map, message in [
        ({"logit_scale": "../outside.bin"}, "shard file names in the folder"),
        ({"logit_scale": "pytorch_model-00002-of-00002.bin"}, "which is not in"),
    ]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            _hf_scalars(tmp_path)
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a weight index"):
        _hf_scalars(tmp_path)
