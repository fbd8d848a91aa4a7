"""End to end: training runs, loss falls, checkpoints; SIGKILL + resume equals an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmpretrain import api
from mmpretrain.models.layout import list_checkpoints
from mmpretrain.training.checkpoint import load_state
from mmpretrain.training.metrics import read_jsonl
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import ROOT, experiment_tree


def test_training_loss_falls_and_writes_run(toy_shards, tmp_path):
    tree = experiment_tree(
        toy_shards,
        tmp_path / "run",
        data={"batch_size": 16},
        train={"steps": 40, "ckpt_every": 15, "keep_last": 2},
        optim={"lr": 2e-3, "warmup_steps": 5},
    )
    run_dir = api.train(experiment_from_tree(tree))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert {"lr", "grad_norm", "logit_scale", "samples_per_s", "loss/image-text"} <= set(rows[-1])
    assert (run_dir / "resolved.yaml").is_file() and list((run_dir / "tb").iterdir())
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000030", "step_00000040"]  # keep_last=2
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs
    state = load_state(list_checkpoints(run_dir)[-1])  # weights_only=True load
    assert state["step"] == 40 and len(state["data"]) == 1 and len(state["rng"]) == 1
    model = api.load_checkpoint(run_dir / "checkpoints")
    emb = api.encode(model, "text", api.tokenize(model, ["a red circle", "a blue square"]))
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2))


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in read_jsonl(run_dir / "samples.rank0.jsonl")}


def train_cli(config: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmpretrain.cli", "train", str(config), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def train_popen(config: Path, *overrides: str) -> subprocess.Popen:
    """``mmpretrain train`` in the background, in its own process group (a terminal's Ctrl-C reaches
    the whole group: ``os.killpg``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mmpretrain.cli", "train", str(config), *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        if _max_step(path) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _max_step(path: Path) -> int:
    """Highest step in a JSONL file that another process may be appending to."""
    best = -1
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                best = max(best, json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass  # a line still being written
    return best


def test_sigkill_then_resume_equals_uninterrupted(toy_shards, tmp_path):
    """Killed mid-epoch (2 loader workers, shuffle buffer), resumed with resume=latest: the
    batches after the checkpoint hold the same sample keys and the weights end up identical."""
    # ckpt_every=7: the resume point is an odd number of batches into a 2-worker round robin,
    # so the resumed loader must relabel its workers to continue in order
    common = {
        "data": {"num_workers": 2, "batch_size": 8},
        "train": {"steps": 400, "ckpt_every": 7, "keep_last": 5, "log_sample_keys": True, "threads": 1},
    }
    ref_cfg = write_config(tmp_path / "ref.yaml", experiment_tree(toy_shards, tmp_path / "ref", **common))
    done = train_cli(ref_cfg, "train.stop_after=20")
    assert done.returncode == 0, done.stderr[-3000:]

    cfg = write_config(tmp_path / "run.yaml", experiment_tree(toy_shards, tmp_path / "run", **common))
    proc = train_popen(cfg)
    try:
        wait_for_step(tmp_path / "run" / "samples.rank0.jsonl", 9, proc)  # past the step-7 checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(keys_by_step(tmp_path / "run"))
    assert 9 <= killed_at < 400
    resumed_from = int(list_checkpoints(tmp_path / "run")[-1].name.split("_")[1])
    assert resumed_from in (7, 14)

    again = train_cli(cfg, "train.resume=latest", "train.stop_after=20")
    assert again.returncode == 0, again.stderr[-3000:]
    ref_keys, run_keys = keys_by_step(tmp_path / "ref"), keys_by_step(tmp_path / "run")
    assert sorted(run_keys) == list(range(1, 21))
    for step in range(1, 21):
        assert run_keys[step] == ref_keys[step], f"step {step}: different samples"
    ref_w = load_file(tmp_path / "ref" / "checkpoints" / "step_00000020" / "model.safetensors")
    run_w = load_file(tmp_path / "run" / "checkpoints" / "step_00000020" / "model.safetensors")
    for name, value in ref_w.items():
        torch.testing.assert_close(run_w[name], value, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 21))  # records past the checkpoint were dropped on resume


def test_sigterm_checkpoints_and_stops(toy_shards, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml", experiment_tree(toy_shards, tmp_path / "run", train={"steps": 400, "ckpt_every": 1000})
    )
    proc = train_popen(cfg)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    ckpts = list_checkpoints(tmp_path / "run")
    assert len(ckpts) == 1 and int(ckpts[0].name.split("_")[1]) >= 3


@pytest.mark.slow  # 23 s; the same stop-save-resume path as SIGTERM (test_sigterm_checkpoints_and_stops)
def test_ctrl_c_checkpoints_and_resume_is_exact(toy_shards, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group, loader workers included) saves after the
    step and exits 0; the resumed run equals an uninterrupted one."""
    import os

    common = {"data": {"num_workers": 2}, "train": {"steps": 400, "ckpt_every": 1000, "log_sample_keys": True}}
    ref = write_config(tmp_path / "ref.yaml", experiment_tree(toy_shards, tmp_path / "ref", **common))
    assert train_cli(ref, "train.stop_after=12").returncode == 0
    cfg = write_config(tmp_path / "c.yaml", experiment_tree(toy_shards, tmp_path / "run", **common))
    proc = train_popen(cfg)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    assert "Ctrl-C: checkpointing" in proc.stderr.read()
    stopped = int(list_checkpoints(tmp_path / "run")[-1].name.split("_")[1])
    assert 3 <= stopped < 12
    assert train_cli(cfg, "train.resume=latest", "train.stop_after=12").returncode == 0
    ref_w = load_file(tmp_path / "ref" / "checkpoints" / "step_00000012" / "model.safetensors")
    run_w = load_file(tmp_path / "run" / "checkpoints" / "step_00000012" / "model.safetensors")
    for name, value in ref_w.items():
        torch.testing.assert_close(run_w[name], value, atol=0, rtol=0)


def test_a_second_ctrl_c_aborts():
    from types import SimpleNamespace

    from mmpretrain.training.loop import Trainer

    trainer = SimpleNamespace(step=5, _stop_signal=False)
    previous = signal.getsignal(signal.SIGINT)
    try:
        Trainer._on_stop(trainer, signal.SIGINT, None)
        assert trainer._stop_signal
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            Trainer._on_stop(trainer, signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_latest_without_checkpoint_starts_fresh(toy_shards, tmp_path):
    tree = experiment_tree(toy_shards, tmp_path / "run", train={"steps": 2, "resume": "latest"})
    api.train(experiment_from_tree(tree))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_resume_from_missing_directory_fails(toy_shards, tmp_path):
    tree = experiment_tree(toy_shards, tmp_path / "run", train={"resume": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        api.train(experiment_from_tree(tree))
