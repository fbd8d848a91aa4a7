"""Nothing lost, nothing hung (issue 11): run-folder identity, durable checksummed checkpoints,
resume compatibility, kills inside checkpoint writes. Each test fails on the code before the fix."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmpretrain import api
from mmpretrain.config.loader import dump_config
from mmpretrain.config.strict import ConfigError
from mmpretrain.models.layout import CHECKSUMS, find_latest, list_checkpoints, verify_checkpoint
from mmpretrain.training.checkpoint import save_checkpoint, weights_only
from mmpretrain.training.metrics import read_jsonl, truncate_jsonl
from mmpretrain.training.resume import plan_resume
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import ROOT, TINY_MODEL, experiment_tree


def _train(toy_shards, run_dir, **sections):
    return api.train(experiment_from_tree(experiment_tree(toy_shards, run_dir, **sections)))


def _tiny_model():
    return api.create_model(TINY_MODEL)


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- 1. run-folder identity
def test_fresh_start_in_a_used_run_folder_is_refused_and_loses_nothing(toy_shards, tmp_path):
    run = _train(toy_shards, tmp_path / "run", train={"steps": 4, "ckpt_every": 2})
    before = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(run)}
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*train.resume=latest.*train.overwrite=true"):
        _train(toy_shards, tmp_path / "run", train={"steps": 2})
    assert {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(run)} == before
    assert (run / "metrics.jsonl").read_text() == metrics


def test_overwrite_starts_over_and_the_new_checkpoint_is_the_latest(toy_shards, tmp_path):
    _train(toy_shards, tmp_path / "run", train={"steps": 6, "ckpt_every": 3})
    run = _train(toy_shards, tmp_path / "run", train={"steps": 2, "overwrite": True})
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert find_latest(run).name == "step_00000002"


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    model = _tiny_model()
    save_checkpoint(tmp_path, 10, weights_only(model), {}, "x: 1\n", keep_last=1)
    save_checkpoint(
        tmp_path, 5, weights_only(model), {}, "x: 1\n", keep_last=1
    )  # e.g. a branch resumed from an older step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000010"]


def test_a_same_step_checkpoint_is_not_deleted_before_its_replacement_is_written(tmp_path, monkeypatch):
    model = _tiny_model()
    old = save_checkpoint(tmp_path, 5, weights_only(model), {}, "x: 1\n", keep_last=3)
    _corrupt(old / "model.safetensors")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, weights_only(model), {}, "x: 1\n", keep_last=3)
    assert (old / "model.safetensors").is_file() and (old / "state.pt").is_file()  # still there, as it was
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_resuming_an_older_checkpoint_of_the_run_needs_overwrite(toy_shards, tmp_path):
    run = _train(toy_shards, tmp_path / "run", train={"steps": 6, "ckpt_every": 3})
    older = str(run / "checkpoints" / "step_00000003")
    with pytest.raises(ConfigError, match="would branch off"):
        _train(toy_shards, tmp_path / "run", train={"steps": 6, "resume": older})
    with pytest.raises(ConfigError, match="data.batch_size"):  # refused resume: overwrite deletes nothing
        _train(
            toy_shards, tmp_path / "run", train={"steps": 6, "resume": older, "overwrite": True}, data={"batch_size": 4}
        )
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    _train(toy_shards, tmp_path / "run", train={"steps": 4, "resume": older, "overwrite": True})
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000004"]


# ---------------------------------------------------------------- 4. durable, checksummed checkpoints
def test_every_checkpoint_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    final = save_checkpoint(tmp_path, 1, weights_only(_tiny_model()), {}, "x: 1\n", keep_last=1)
    names = {os.path.basename(p) for p in synced}
    assert {"model.safetensors", "state.pt", "config.yaml", CHECKSUMS} <= names
    assert any(p.endswith(".tmp") and "step_00000001" in p for p in synced)  # the folder, before its rename
    assert str(final.parent) in synced  # and the parent, after it


def test_latest_skips_a_corrupt_checkpoint_and_says_so(toy_shards, tmp_path, caplog):
    run = _train(toy_shards, tmp_path / "run", train={"steps": 4, "ckpt_every": 2, "keep_last": 2})
    newest = list_checkpoints(run)[-1]
    _corrupt(newest / "model.safetensors")
    assert "sha256" in verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        assert find_latest(run).name == "step_00000002"
    assert "skipping checkpoint" in caplog.text and "step_00000004" in caplog.text
    model = api.load_checkpoint(run / "checkpoints")  # the older, valid one
    want = load_file(run / "checkpoints" / "step_00000002" / "model.safetensors")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    again = _train(toy_shards, tmp_path / "run", train={"steps": 4, "resume": "latest", "keep_last": 2})
    assert verify_checkpoint(list_checkpoints(again)[-1]) is None  # step 4 rewritten from step 2


def test_torn_jsonl_lines_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')  # killed mid-write
    truncate_jsonl(path, 2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2] and path.read_text().endswith("\n")


def _cli_train(config, *overrides, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mmpretrain.cli", "train", str(config), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "point",
    [
        "ckpt.state:2",  # mid-write: the default run's case; the other two points run in make test-all
        pytest.param("atomic_dir.synced:2", marks=pytest.mark.slow),
        pytest.param("remove_tree.renamed:1", marks=pytest.mark.slow),
    ],
)
def test_a_kill_inside_a_checkpoint_write_resumes_exactly(toy_shards, tmp_path, point):
    """SIGKILL at a named point of the 2nd checkpoint write (or of pruning): resume=latest picks a valid
    checkpoint, cleans the leftovers, and ends with the same weights as an uninterrupted run."""
    common = {"train": {"steps": 9, "ckpt_every": 3, "keep_last": 1}}
    ref = _train(toy_shards, tmp_path / "ref", **common)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(experiment_tree(toy_shards, tmp_path / "run", **common)))
    killed = _cli_train(cfg, env={"MMPRETRAIN_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert find_latest(tmp_path / "run") is not None  # keep_last=1, killed mid-write: still one valid checkpoint
    done = _cli_train(cfg, "train.resume=latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    want = load_file(ref / "checkpoints" / "step_00000009" / "model.safetensors")
    got = load_file(tmp_path / "run" / "checkpoints" / "step_00000009" / "model.safetensors")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0)


# ---------------------------------------------------------------- 5. resume compatibility
def _saved(toy_shards, tmp_path):
    run = _train(toy_shards, tmp_path / "run", train={"steps": 2})
    return list_checkpoints(run)[-1]


@pytest.mark.parametrize(
    "change,refused",
    [
        ({"data": {"batch_size": 4}}, "data.batch_size"),
        ({"train": {"seed": 7}}, "train.seed"),
        ({"data": {"shuffle_buffer": 0}}, "data.shuffle_buffer"),
        ({"loss": {"local_loss": True}}, "loss.local_loss"),
    ],
)
def test_resume_refuses_changes_that_break_exactness(toy_shards, tmp_path, change, refused):
    ckpt = _saved(toy_shards, tmp_path)
    cfg = experiment_from_tree(experiment_tree(toy_shards, tmp_path / "run", **change))
    with pytest.raises(ConfigError, match=rf"{refused} .*train.resume_allow=\[{refused}\]"):
        plan_resume(cfg, ckpt, 1, 1)
    with_allow = {**change, "train": {**change.get("train", {}), "resume_allow": [refused]}}
    allowed = experiment_from_tree(experiment_tree(toy_shards, tmp_path / "run", **with_allow))
    plan = plan_resume(allowed, ckpt, 1, 1)
    assert plan.allowed == (refused,) and plan.restart_data == (refused in ("train.seed", "data.shuffle_buffer"))


def test_resume_with_more_ranks_is_refused_with_a_clear_message(toy_shards, tmp_path):
    ckpt = _saved(toy_shards, tmp_path)
    cfg = experiment_from_tree(experiment_tree(toy_shards, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"world size 1 -> 2.*resume_allow=\[world_size\]"):
        plan_resume(cfg, ckpt, 1, 2)


def test_resume_accepts_steps_and_lr_and_applies_the_new_lr(toy_shards, tmp_path):
    run = _train(toy_shards, tmp_path / "run", train={"steps": 4, "stop_after": 2}, optim={"schedule": "constant"})
    again = _train(
        toy_shards, tmp_path / "run", train={"steps": 6, "resume": "latest"}, optim={"schedule": "constant", "lr": 3e-4}
    )
    rows = read_jsonl(again / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[1]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] == pytest.approx(3e-4)  # not the saved 1e-3
    assert run == again


def test_allowed_seed_change_restarts_the_data_at_the_next_epoch(toy_shards, tmp_path):
    _train(toy_shards, tmp_path / "run", train={"steps": 2})
    run = _train(
        toy_shards, tmp_path / "run", train={"steps": 4, "resume": "latest", "seed": 5, "resume_allow": ["train.seed"]}
    )
    from mmpretrain.training.checkpoint import load_state

    positions = load_state(list_checkpoints(run)[-1])["data"][0]["positions"]
    assert {p["epoch"] for p in positions.values()} == {1}


def test_resolved_config_round_trips_as_unchanged(toy_shards, tmp_path):
    ckpt = _saved(toy_shards, tmp_path)
    cfg = experiment_from_tree(yaml.safe_load((ckpt / "config.yaml").read_text()))
    assert dump_config(cfg) == (ckpt / "config.yaml").read_text()
    assert plan_resume(cfg, ckpt, 1, 1).accepted == ()
    assert json.loads((ckpt / CHECKSUMS).read_text())["step"] == 2
