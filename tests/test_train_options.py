"""Trainer options: bf16 autocast, gradient checkpointing, accumulation, SigLIP, HF text tower."""

from __future__ import annotations

import pytest

from mmpretrain import api
from mmpretrain.training.metrics import read_jsonl
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import experiment_tree

HF_TEXT = {
    "encoder": "hf_text",
    "params": {
        "model_type": "bert",
        "context_length": 12,
        "config": {
            "vocab_size": 49408,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 32,
        },
    },
}


@pytest.mark.parametrize(
    "sections",
    [
        {"train": {"precision": "bf16"}},
        {"train": {"grad_checkpointing": True, "accum_steps": 2}},
        {
            "loss": {"pairs": [{"a": "image", "b": "text", "kind": "siglip"}]},
            "model": {"logit_bias_init": -10.0, "logit_scale_init": 2.3026},
        },
        {"model": {"towers": {"text": HF_TEXT}}, "optim": {"grad_clip_norm": None}},
    ],
    ids=["bf16", "ckpt+accum", "siglip", "hf_text"],
)
def test_option_trains(toy_shards, tmp_path, sections):
    from mmpretrain.config.loader import deep_merge

    tree = deep_merge(experiment_tree(toy_shards, tmp_path / "run", train={"steps": 3, "ckpt_every": 3}), sections)
    run_dir = api.train(experiment_from_tree(tree))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN


@pytest.mark.slow
def test_torch_compile_trains(toy_shards, tmp_path):
    tree = experiment_tree(toy_shards, tmp_path / "run", train={"steps": 2, "compile": True, "ckpt_every": 2})
    run_dir = api.train(experiment_from_tree(tree))
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2


def test_periodic_evaluation_is_logged(toy_shards, tmp_path):
    from tests.test_eval import make_folder

    val = make_folder(tmp_path / "val", ["red_circle", "blue_square"], per_class=2)
    tree = experiment_tree(
        toy_shards,
        tmp_path / "run",
        train={"steps": 4, "ckpt_every": 4},
        eval={"every": 2, "zeroshot": [f"val@folder={val}"], "templates": "a <>"},
    )
    run_dir = api.train(experiment_from_tree(tree))
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/val/top1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["eval/val/top1"] <= 1 for r in evals)


def test_eval_sets_checked_at_load(toy_shards, tmp_path):
    from mmpretrain.config.strict import ConfigError

    with pytest.raises(ConfigError, match="eval.zeroshot\\[0\\]: folder not found"):
        experiment_from_tree(
            experiment_tree(toy_shards, tmp_path, eval={"every": 2, "zeroshot": [f"folder={tmp_path}/x"]})
        )
    with pytest.raises(ConfigError, match="LAYOUT one of"):
        experiment_from_tree(
            experiment_tree(toy_shards, tmp_path, eval={"every": 2, "zeroshot": [f"imagenet-q={tmp_path}"]})
        )


def test_default_threads_leave_a_core_per_worker_of_every_source(monkeypatch):
    """Compute threads = cores / local ranks - workers, where a mixture's every source starts its own workers."""
    import os

    import torch

    from mmpretrain.config.schema import DataConfig, ExperimentConfig, SourceConfig
    from mmpretrain.training.run import configure_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert configure_threads(ExperimentConfig(data=DataConfig(num_workers=3))) == 13
    sources = [SourceConfig("a.tar"), SourceConfig("b.tar"), SourceConfig("c.tar")]
    assert configure_threads(ExperimentConfig(data=DataConfig(num_workers=3, sources=sources))) == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert configure_threads(ExperimentConfig(data=DataConfig(num_workers=3, sources=sources))) == 1  # 8 - 9 -> 1
