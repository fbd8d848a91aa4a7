"""Adapting pretrained towers: LoRA adapters through peft (``towers.<m>.lora``) and layer-wise learning-rate
decay (``towers.<m>.layer_decay``). From the registries: every encoder takes its default adapters, whose
merge equals the adapted model, and every encoder's layer groups get lr * decay ** (n - 1 - i). On a
pretrained open_clip model: step 0 is the source model, only adapters train, the exports (open_clip and
ONNX) equal the adapted model and carry its id, and a stopped run resumes bit-identically."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from mmpretrain import api
from mmpretrain.config.schema import LoraConfig, ModelConfig, OptimConfig, TowerConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.models import build_model
from mmpretrain.models.lora import canonical_key, merged
from mmpretrain.training.optim import param_groups
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import experiment_tree
from tests.test_encoders import CASES, example
from tests.test_finetune import oc_folder, start, train_from
from tests.test_pretrained import assert_same_embeddings

IDS = [f"{m}-{e.name}" for m, e in CASES]


def one_tower(modality, entry, **tower) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(embed_dim=24, towers={modality: TowerConfig(entry.name, example(entry), **tower)}))


@pytest.mark.parametrize("modality, entry", CASES, ids=IDS)
def test_every_encoder_takes_adapters_and_their_merge_equals_the_adapted_model(modality, entry):
    model = one_tower(modality, entry, lora=LoraConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable if n != "logit_scale")  # no base weight, no head
    with torch.no_grad():  # B starts at zero (the adapted model is the base one): give the adapters an effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = model.towers[modality].example_batch(3)
    plain = merged(model.eval())
    assert not any(".lora_" in k or "base_layer" in k for k in plain.state_dict())
    assert (plain.encode(modality, batch) - model.encode(modality, batch)).abs().max() < 1e-5
    assert api.model_id(model) == api.model_id(plain)


@pytest.mark.parametrize("modality, entry", CASES, ids=IDS)
def test_every_encoders_layer_groups_get_the_decayed_learning_rate(modality, entry):
    model = one_tower(modality, entry, layer_decay=0.7)
    groups = model.towers[modality].layer_groups()
    tower_params = {id(p) for p in model.towers[modality].parameters()}
    assert sorted(id(p) for g in groups for p in g) == sorted(tower_params)  # each parameter exactly once
    assert len([g for g in groups if g]) >= 3  # embeddings, at least one layer, ...
    optim = OptimConfig(lr=0.01)
    lr = {id(p): g["lr"] for g in param_groups(model, optim, model.cfg) for p in g["params"]}
    for i, group in enumerate(groups):
        for p in group:
            if p.requires_grad:
                assert lr[id(p)] == pytest.approx(0.01 * 0.7 ** (len(groups) - 1 - i))
    assert all(lr[id(p)] == pytest.approx(0.01) for p in model.heads[modality].parameters())


def test_layer_decay_matches_open_clips_groups(oc_model, tmp_path):
    """open_clip's partition (its lock groups): embeddings, block 0, block 1 + ln_post, proj."""
    folder = oc_folder(oc_model, tmp_path / "oc")
    _, model = start({"model": {"pretrained": f"local-dir:{folder}", "towers": {"image": {"layer_decay": 0.5}}}})
    lr = {n: g["lr"] for g in param_groups(model, OptimConfig(lr=1.0), model.cfg) for p in g["params"]
          for n, q in model.named_parameters() if q is p}  # fmt: skip
    v = "towers.image.visual."
    assert lr[v + "conv1.weight"] == lr[v + "ln_pre.weight"] == lr[v + "class_embedding"] == 0.125
    assert lr[v + "transformer.resblocks.0.attn.in_proj_weight"] == 0.25
    assert lr[v + "transformer.resblocks.1.mlp.c_fc.weight"] == lr[v + "ln_post.weight"] == 0.5
    assert lr[v + "proj"] == 1.0 and lr["towers.text.text.token_embedding.weight"] == 1.0  # text: no decay


def test_lora_fine_tune_trains_only_adapters_and_exports_the_adapted_model(oc_model, toy_shards, tmp_path):
    folder = oc_folder(oc_model, tmp_path / "oc")
    lora = {"r": 4, "alpha": 8}
    tree = {"model": {"pretrained": f"local-dir:{folder}", "towers": {"image": {"lora": lora}, "text": {"lora": lora}}}}
    _, model = start(tree)
    assert_same_embeddings(model, oc_model)  # adapters start as zero updates: step 0 is open_clip's model
    trained, run = train_from(tree, toy_shards, tmp_path, steps=3)
    base = oc_model.state_dict()
    after = {canonical_key(k): v for k, v in trained.state_dict().items() if ".lora_" not in k}
    oc_names = {"towers.image.visual.": "visual.", "towers.text.text.": ""}
    for key, value in after.items():
        source = next((o + key[len(ours) :] for ours, o in oc_names.items() if key.startswith(ours)), None)
        if source in base:
            assert torch.equal(value, base[source]), f"{key} changed: only the adapters train"
    adapters = [v for k, v in trained.state_dict().items() if "lora_B" in k]
    assert adapters and all(v.abs().sum() > 0 for v in adapters)  # every adapter learned something
    saved = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert any(".lora_A." in k for k in saved)  # the checkpoint holds the adapters

    out = api.export_open_clip(trained, tmp_path / "oc_out")
    assert_same_embeddings(trained, open_clip.create_model(f"local-dir:{out}").eval())  # open_clip's own model
    assert api.model_id(api.load_checkpoint(f"local-dir:{out}")) == api.model_id(trained)
    onnx = api.load_model(api.export_onnx(trained, tmp_path / "onnx", towers=["text"]), backend="onnxruntime")
    texts = ["a red circle", "a dog"]
    assert (api.encode_texts(onnx, texts) - api.encode_texts(trained, texts)).abs().max() <= 1e-4
    assert api.model_id(onnx) == api.model_id(trained)


def test_a_lora_run_resumes_exactly(oc_model, toy_shards, tmp_path):
    folder = oc_folder(oc_model, tmp_path / "oc")
    model = {"pretrained": f"local-dir:{folder}", "towers": {"image": {"lora": {"r": 2}, "layer_decay": 0.8}}}
    weights = []
    for name, stop in (("whole", None), ("stopped", 2)):
        tree = experiment_tree(toy_shards, tmp_path / name, train={"steps": 4, "ckpt_every": 2, "stop_after": stop})
        run = api.train(experiment_from_tree({**tree, "model": model}))
        if stop:
            tree["train"] = {**tree["train"], "resume": "latest", "stop_after": None}
            api.train(experiment_from_tree({**tree, "model": model}))
        weights.append(load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_lora_configs_fail_clearly(tmp_path):
    text = {"encoder": "openclip_text", "params": {"text_cfg": {"context_length": 12, "width": 32, "heads": 2,
                                                                "layers": 2}}}  # fmt: skip
    image = {"encoder": "openclip_vision", "params": {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                                                                     "layers": 2, "head_width": 16}}}  # fmt: skip
    with pytest.raises(ConfigError, match="lora adapts a frozen encoder itself"):
        experiment_from_tree({"model": {"towers": {"image": image, "text": {**text, "freeze": True, "lora": {}}}}})
    cfg = experiment_from_tree({"model": {"towers": {"image": {**image, "lora": {"targets": ["nothing_here"]}},
                                                     "text": text}}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.towers.image.lora.targets \['nothing_here'\].*transformer"):
        build_model(cfg.model)
    with pytest.raises(ConfigError, match="layer_decay must be in"):
        experiment_from_tree({"model": {"towers": {"image": {**image, "layer_decay": 1.5}, "text": text}}})
    lora = {"model": {"towers": {"image": image, "text": {**text, "lora": {}}}}}
    with pytest.raises(ConfigError, match="model.towers.text.lora: LoRA adapters train under an unsharded"):
        experiment_from_tree({**lora, "train": {"strategy": "fsdp"}})
    experiment_from_tree({**lora, "train": {"strategy": "ddp"}})  # unsharded: accepted
