"""Strict, layered configs: unknown keys / wrong types fail with the valid choices named."""

from __future__ import annotations

import pytest
import yaml

from mmpretrain.config.loader import apply_override, save_resolved
from mmpretrain.config.schema import ExperimentConfig, TrainConfig
from mmpretrain.config.strict import ConfigError, from_dict, to_dict
from mmpretrain.training.validate import experiment_from_tree
from mmpretrain.training.validate import load_experiment as load_config
from tests.conftest import TINY_MODEL


def tree(**sections):
    return {"model": TINY_MODEL, **sections}


def test_defaults_validate():
    cfg = experiment_from_tree(tree())
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.train.accum_steps == 1 and cfg.loss.pairs[0].kind == "clip"


def test_unknown_key_names_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        experiment_from_tree(tree(optim={"lrr": 0.1}))
    msg = str(err.value)
    assert "optim.lrr" in msg and "Did you mean 'lr'" in msg and "weight_decay" in msg


@pytest.mark.parametrize(
    "section, value, fragment",
    [
        ({"train": {"steps": "many"}}, None, "train.steps: expected int"),
        ({"train": {"steps": 1.5}}, None, "train.steps: expected int"),
        ({"train": {"compile": "yes"}}, None, "train.compile: expected bool"),
        ({"train": {"precision": "fp16"}}, None, "'fp16' is not one of"),
        ({"optim": {"betas": [0.9]}}, None, "optim.betas: expected 2 items"),
        (
            {"data": {"ops": [{"op": "decode_image", "params": {"bogus": 1}}]}},
            None,
            "unknown key 'data.ops[0].params.bogus'",
        ),
    ],
)
def test_wrong_types_fail(section, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        experiment_from_tree(tree(**section))


def test_yaml_style_scientific_floats_accepted():
    cfg = experiment_from_tree(tree(optim={"lr": "1e-3"}))
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_unknown_encoder_lists_valid_names():
    bad = {"embed_dim": 8, "towers": {"image": {"encoder": "openclip_vison"}, "text": TINY_MODEL["towers"]["text"]}}
    with pytest.raises(ConfigError) as err:
        experiment_from_tree({"model": bad})
    assert "Did you mean 'openclip_vision'" in str(
        err.value
    ) and "Valid: hf_clip_vision, openclip_vision, timm_vision" in str(err.value)


def test_unknown_modality_and_open_clip_model_name():
    with pytest.raises(ConfigError, match="unknown modality"):
        experiment_from_tree({"model": {"towers": {"smell": {"encoder": "x"}}}})
    bad = {
        "towers": {
            "image": {"encoder": "openclip_vision", "params": {"model_name": "ViT-Q-99"}},
            "text": TINY_MODEL["towers"]["text"],
        }
    }
    with pytest.raises(
        ConfigError, match=r"model.towers.image.params.model_name: unknown open_clip model 'ViT-Q-99'.*ViT-B-32"
    ):
        experiment_from_tree({"model": bad})  # at load, before any model is built
    bad["towers"]["image"]["params"] = {"vision_cfg": {"widht": 3}}
    with pytest.raises(ConfigError, match="unknown open_clip field 'widht'"):
        experiment_from_tree({"model": bad})
    bad["towers"] = {
        "image": TINY_MODEL["towers"]["image"],
        "text": {"encoder": "hf_text", "params": {"model_type": "bertt"}},
    }
    with pytest.raises(ConfigError, match="unknown transformers model type 'bertt'; did you mean bert"):
        experiment_from_tree({"model": bad})
    bad["towers"]["text"]["params"] = {"path": "/nonexistent/model"}
    with pytest.raises(ConfigError, match="no config.json"):
        experiment_from_tree({"model": bad})


def test_loss_pairs_must_name_towers_and_kinds():
    with pytest.raises(ConfigError, match="modality 'audio' has no tower"):
        experiment_from_tree(tree(loss={"pairs": [{"a": "audio", "b": "text"}]}))
    with pytest.raises(
        ConfigError, match="unknown loss kind .clipp.*Valid: clip, clip_blockwise, milnce, siglip, siglip_chunked"
    ):
        experiment_from_tree(tree(loss={"pairs": [{"a": "image", "b": "text", "kind": "clipp"}]}))
    with pytest.raises(ConfigError, match="local_loss=true needs loss.gather_with_grad"):
        experiment_from_tree(tree(loss={"local_loss": True, "gather_with_grad": False}))


def test_layering_order_and_overrides(tmp_path):
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {"steps": 5, "seed": 1}}))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": {"batch_size": 4}, "train": {"steps": 6}}))
    (tmp_path / "exp.yaml").write_text("base: [model.yaml, data.yaml]\ntrain: {steps: 7}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert (cfg.train.steps, cfg.train.seed, cfg.data.batch_size) == (7, 1, 4)
    cfg = load_config(
        tmp_path / "exp.yaml",
        [
            "train.steps=8",
            "model.towers.image.params.vision_cfg.layers=1",
            "optim.betas=[0.8, 0.9]",
            "train.resume=null",
        ],
    )
    assert cfg.train.steps == 8 and cfg.optim.betas == (0.8, 0.9) and cfg.train.resume is None
    assert cfg.model.towers["image"].params["vision_cfg"]["layers"] == 1
    assert cfg.model.towers["image"].params["vision_cfg"]["width"] == 32  # siblings kept


def test_include_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "train.steps")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = experiment_from_tree(tree(train={"steps": 3}))
    path = save_resolved(cfg, tmp_path)
    again = experiment_from_tree(yaml.safe_load(path.read_text()))
    assert again == cfg


def test_frozen():
    cfg = from_dict(TrainConfig, {"steps": 3})
    with pytest.raises(Exception):
        cfg.steps = 4  # type: ignore[misc]
    assert to_dict(cfg)["steps"] == 3


def test_shipped_configs_load(tiny_ckpt):
    """Every shipped config loads; a template that names a placeholder pretrained model is given one."""
    from tests.conftest import ROOT

    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        pretrained = (yaml.safe_load(path.read_text()).get("model") or {}).get("pretrained")
        load_config(path, [f"model.pretrained={tiny_ckpt}"] if pretrained else [])
    for path in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        load_config(path)


def test_a_retired_key_in_an_older_config_is_dropped_with_a_warning(caplog):
    """Checkpoints and resolved.yaml files written before data.eval_ops was retired keep loading."""
    import logging

    with caplog.at_level(logging.WARNING):
        cfg = experiment_from_tree(tree(data={"eval_ops": [{"op": "decode_image"}]}))
    assert not hasattr(cfg.data, "eval_ops") and "retired key data.eval_ops" in caplog.text


def test_builders_refuse_params_of_an_entry_without_a_config_class_as_the_checks_do(toy_shards):
    """One conversion (``config.strict.typed_params``) for builders and checks: ``tokenize`` has no config
    class, so its params are refused when built too (not dropped), naming the source's own ops."""
    from mmpretrain.config.schema import DataConfig, OpSpec
    from mmpretrain.data.loader import build_loader
    from mmpretrain.data.ops import OpContext, build_ops, check_ops
    from mmpretrain.encoders.openclip import BpeTokenizer
    from mmpretrain.types import TextSpec

    ctx = OpContext({"text": TextSpec(BpeTokenizer(12))})
    bad = [OpSpec("tokenize", {"context_length": 7})]
    with pytest.raises(ConfigError, match=r"data.ops\[0\].params: 'tokenize' takes no parameters"):
        check_ops(bad, "data.ops")
    with pytest.raises(ConfigError, match=r"data.ops\[0\].params: 'tokenize' takes no parameters"):
        build_ops(bad, ctx)
    shards = str(toy_shards / "shard-{000000..000003}.tar")
    sources = [{"train": shards}, {"train": shards, "ops": [{"op": "tokenize"}]}]
    data = from_dict(DataConfig, {"sources": sources, "num_workers": 0})
    build_loader(data, ctx, seed=0)  # fine without params
    sources = [{"train": shards}, {"train": shards, "ops": [{"op": "tokenize", "params": {"context_length": 7}}]}]
    data = from_dict(DataConfig, {"sources": sources, "num_workers": 0})
    with pytest.raises(ConfigError, match=r"data.sources\[1\].ops\[0\].params: 'tokenize' takes no"):
        build_loader(data, ctx, seed=0)
