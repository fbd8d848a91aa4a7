"""Distributed paths under ``torchrun --nproc_per_node 2`` with gloo on CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmpretrain.losses import LOSSES
from mmpretrain.losses.contrastive import takes_groups
from mmpretrain.models.layout import list_checkpoints
from mmpretrain.training.checkpoint import load_state
from mmpretrain.training.metrics import read_jsonl
from mmpretrain.utils.procs import rank_pids
from tests.conftest import ROOT, experiment_tree

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_popen(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """torchrun with 2 local ranks on CPU/gloo (``launcher``: more torchrun flags) in its own process
    group, so a hang is killed with every rank."""
    rendezvous = (
        () if "--rdzv-backend" in launcher else ("--master_addr", "127.0.0.1", "--master_port", str(free_port()))
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *rendezvous, *launcher, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True
    )


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = torchrun_popen(*args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout}s; stderr tail:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for_lines(path, lines: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` (a rank's samples log) has ``lines`` lines; fails if training exits first."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= lines):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)


def test_distributed_loss_and_grads_equal_single_process(tmp_path):
    out = tmp_path / "report.json"
    proc = torchrun("tests/dist/loss_parity.py", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    multi = [k for k in LOSSES.names() if takes_groups(k)]
    # every registered loss, every one taking several positives (with groups), and clip + distill and
    # clip + self_distill / masked_prediction (a second image forward in the step), each x {masked, not} x 3
    # gather modes
    assert len(report) == 6 * (len(LOSSES) + len(multi) + 3)
    extras = {"clip-groups", "siglip-groups", "clip-distill", "clip-self_distill", "clip-masked_prediction"}
    assert {m.split("-gwg")[0] for m in report} >= extras
    for mode, r in report.items():
        assert r["n_grads"] > 10, mode
        assert r["loss_diff"] < 1e-5, (mode, r)
        assert r["max_grad_diff"] < 1e-5, (mode, r)
        assert r["grad_scale"] > 1e-3, (mode, r)  # the comparison is not between zeros


def test_torchrun_training_and_resume(toy_shards, tmp_path):
    tree = experiment_tree(
        toy_shards,
        tmp_path / "run",
        data={"num_workers": 1, "batch_size": 4},
        train={"steps": 8, "ckpt_every": 4, "stop_after": 4, "log_sample_keys": True},
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    first = torchrun("-m", "mmpretrain.cli", "train", str(cfg))
    assert first.returncode == 0, first.stderr[-4000:]
    state = load_state(list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 4 and len(state["data"]) == 2 and len(state["rng"]) == 2
    again = torchrun("-m", "mmpretrain.cli", "train", str(cfg), "train.resume=latest", "train.stop_after=8")
    assert again.returncode == 0, again.stderr[-4000:]
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step_00000008"
    ranks = [{r["step"]: r["keys"] for r in read_jsonl(tmp_path / "run" / f"samples.rank{i}.jsonl")} for i in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, 9))
    seen = [k for rank in ranks for step in range(1, 9) for k in rank[step]]
    assert len(seen) == 64 and len(set(seen)) == 64  # 2 ranks x 8 steps x 4 = one disjoint epoch
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(toy_shards, tmp_path):
    """Preemption seen by one rank only (rank 1): today it enters the checkpoint's all-gather while rank 0
    starts the next step's all-reduce, and the job hangs. Now the ranks agree, save one checkpoint at
    the same step, and exit 0."""
    import time

    tree = experiment_tree(
        toy_shards,
        tmp_path / "run",
        data={"num_workers": 1, "batch_size": 4},
        train={"steps": 400, "ckpt_every": 1000, "log_sample_keys": True, "log_every": 1},
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = torchrun_popen("-m", "mmpretrain.cli", "train", str(cfg))
    try:
        wait_for_lines(tmp_path / "run" / "samples.rank1.jsonl", 3, proc)
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and elapsed < 30, err[-4000:]
    ckpts = list_checkpoints(tmp_path / "run")
    state = load_state(ckpts[-1])
    last = [max(r["step"] for r in read_jsonl(tmp_path / "run" / f"samples.rank{i}.jsonl")) for i in (0, 1)]
    assert len(ckpts) == 1 and last == [state["step"], state["step"]] and len(state["data"]) == 2


@pytest.mark.slow  # 50 s; the kill/resume path is also in test_torchrun_training_and_resume and benchmarks/faults.py
def test_torchrun_elastic_restart_resumes_exactly(toy_shards, tmp_path):
    """torchrun --max-restarts 1 with train.resume=latest: a rank killed mid-run (SIGKILL, after the
    step-4 checkpoint) makes torchrun restart the group, which resumes from that checkpoint and ends
    bit-identical to an uninterrupted run (docs/cluster.md, "Elastic restarts")."""

    from safetensors.torch import load_file

    common = {"data": {"num_workers": 1, "batch_size": 4}, "train": {"steps": 12, "ckpt_every": 4, "log_every": 1}}
    ref = tmp_path / "ref.yaml"
    ref.write_text(yaml.safe_dump(experiment_tree(toy_shards, tmp_path / "ref", **common)))
    assert torchrun("-m", "mmpretrain.cli", "train", str(ref)).returncode == 0
    tree = experiment_tree(toy_shards, tmp_path / "run", **common)
    tree["train"].update(resume="latest", log_sample_keys=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    launcher = (
        "--max-restarts",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "elastic-test",
    )
    proc = torchrun_popen("-m", "mmpretrain.cli", "train", str(cfg), launcher=launcher)
    try:
        wait_for_lines(tmp_path / "run" / "samples.rank1.jsonl", 6, proc)
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    assert "restart" in err.lower() or "Restarting" in err, err[-2000:]
    final = "checkpoints/step_00000012/model.safetensors"
    ref_w, run_w = load_file(tmp_path / "ref" / final), load_file(tmp_path / "run" / final)
    for name, value in ref_w.items():
        assert torch.equal(run_w[name], value), name
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 13))  # the records past the checkpoint were dropped on the restart


def test_fsdp_trains_resumes_exactly_and_reads_and_converts_ddp_checkpoints(toy_shards, tmp_path):
    """train.strategy=fsdp (FSDP2 on 2 gloo ranks, accumulated micro-batches): ends where DDP ends (up to
    the reduction order), a stopped and resumed run is bit-identical to an uninterrupted one, DDP resumes
    an FSDP checkpoint and FSDP a DDP-layout one, ``checkpoint convert`` there and back loses nothing (a
    run resumed from the converted checkpoint is bit-identical), and a sharded checkpoint loads and
    exports like any other."""
    from mmpretrain import api
    from mmpretrain.models.layout import read_weights

    common = {"data": {"num_workers": 1, "batch_size": 4}, "train": {"steps": 8, "ckpt_every": 4, "accum_steps": 2}}

    def run(name: str, strategy: str, *extra: str) -> Path:
        tree = experiment_tree(toy_shards, tmp_path / name, **common)
        tree["train"]["strategy"] = strategy
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        proc = torchrun("-m", "mmpretrain.cli", "train", str(cfg), *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return tmp_path / name / "checkpoints"

    def final(ckpts: Path) -> dict:
        return read_weights(ckpts / "step_00000008")

    def max_diff(a: dict, b: dict) -> float:
        assert set(a) == set(b)
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    ddp, fsdp = run("ddp", "ddp"), run("fsdp", "fsdp")
    assert (fsdp / "step_00000008" / "sharded" / ".metadata").is_file()
    assert not (fsdp / "step_00000008" / "model.safetensors").exists()
    assert 0 < max_diff(final(ddp), final(fsdp)) < 1e-5  # the same training, other reduction order
    run("stopped", "fsdp", "train.stop_after=4")
    assert max_diff(final(fsdp), final(run("stopped", "fsdp", "train.resume=latest"))) == 0.0
    from_fsdp = run("ddp_from_fsdp", "ddp", f"train.resume={fsdp / 'step_00000004'}")
    assert max_diff(final(fsdp), final(from_fsdp)) < 1e-5
    there = api.convert_checkpoint(fsdp / "step_00000004", tmp_path / "conv" / "step_00000004", to="ddp")
    back = api.convert_checkpoint(there, tmp_path / "conv2" / "step_00000004", to="fsdp")
    assert (there / "model.safetensors").is_file() and "optimizer" in load_state(there)
    assert max_diff(read_weights(fsdp / "step_00000004"), read_weights(back)) == 0.0
    # FSDP resumes a DDP-layout checkpoint, and the conversion lost nothing: bit-identical to uninterrupted
    assert max_diff(final(fsdp), final(run("fsdp_from_ddp", "fsdp", f"train.resume={there}"))) == 0.0
    model = api.load_checkpoint(tmp_path / "fsdp")
    assert max_diff(final(fsdp), model.state_dict()) == 0.0
    assert (api.export_open_clip(model, tmp_path / "oc") / "open_clip_model.safetensors").is_file()


def test_fsdp_runs_in_one_process_without_torchrun(toy_shards, tmp_path, monkeypatch):
    """One GPU with CPU offload is an FSDP use: a single process gets a private group (HashStore),
    trains as DDP does, and leaves no group behind."""
    from mmpretrain import api
    from mmpretrain.models.pretrained import load_pretrained
    from mmpretrain.training.validate import experiment_from_tree

    for var in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    runs = {}
    for strategy in ("ddp", "fsdp"):
        tree = experiment_tree(
            toy_shards, tmp_path / strategy, train={"steps": 3, "ckpt_every": 3, "strategy": strategy}
        )
        runs[strategy] = api.train(experiment_from_tree(tree))
        assert not torch.distributed.is_initialized()
    a, b = (load_pretrained(list_checkpoints(d)[-1]).state_dict() for d in runs.values())
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_ema_teachers_and_a_decoder_train_under_fsdp_and_resume_exactly(toy_shards, tmp_path):
    """SigLIP 2's terms under train.strategy=fsdp on 2 gloo ranks: self-distillation and masked prediction
    (their EMA teachers replicated, updated from the gathered student) and a LocCa decoder with the
    caption objective, accumulated micro-batches; stopped and resumed, bit-identical to uninterrupted,
    teachers included; the sharded checkpoint loads for use and captions."""
    from mmpretrain import api
    from mmpretrain.models.layout import read_weights

    ops = [{"op": "decode_image"}, {"op": "multi_crop", "params": {"local_crops": 1}}, {"op": "resize_center_crop"}]
    ops += [{"op": "to_tensor_normalize"}, {"op": "caption"}, {"op": "tokenize"}, {"op": "patch_mask"}]
    sections = {
        "model": {"decoder": {"kind": "locca", "params": {"width": 32, "layers": 1, "heads": 2}}},
        "data": {"ops": ops, "batch_size": 4, "num_workers": 1},
        "loss": {"objectives": [{"kind": "caption"}, {"kind": "self_distill", "params": {"prototypes": 16}},
                                {"kind": "masked_prediction", "start_frac": 0.5, "params": {"prototypes": 16}}]},
        "train": {"steps": 4, "ckpt_every": 2, "accum_steps": 2, "strategy": "fsdp"},
    }  # fmt: skip

    def run(name: str, *extra: str) -> Path:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(experiment_tree(toy_shards, tmp_path / name, **sections)))
        proc = torchrun("-m", "mmpretrain.cli", "train", str(cfg), *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return tmp_path / name / "checkpoints"

    ref = read_weights(run("ref") / "step_00000004")
    run("run", "train.stop_after=2")
    resumed = read_weights(run("run", "train.resume=latest") / "step_00000004")
    assert {
        "extras.objective1.teacher.center",
        "extras.objective2.mask_token",
        "decoder.token_embedding.weight",
    } <= set(ref)
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
    first = read_weights(tmp_path / "ref" / "checkpoints" / "step_00000002")
    assert not torch.equal(
        first["extras.objective1.teacher.proto.prototypes"], ref["extras.objective1.teacher.proto.prototypes"]
    )
    model = api.load_checkpoint(tmp_path / "ref")
    assert not list(model.extras.keys()) and model.decoder is not None


def test_auto_device_says_why_it_falls_back_to_the_cpu(monkeypatch, caplog):
    """A machine with an NVIDIA driver whose torch cannot use it trains on the CPU, with a warning naming
    the wheel's CUDA version; train.device=cuda there fails with the same reason."""
    from mmpretrain import api
    from mmpretrain.config.schema import TrainConfig
    from mmpretrain.training import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "_nvidia_driver_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with caplog.at_level("WARNING"):
        assert dist.resolve_device(TrainConfig(device="auto")) == torch.device("cpu")
    assert "built for CUDA 13.0" in caplog.text and "train.device=auto" in caplog.text
    assert "running on the CPU" in caplog.text
    with pytest.raises(ValueError, match="built for CUDA 13.0, which needs a driver"):  # DeviceError: one line
        dist.resolve_device(TrainConfig(device="cuda"))
    caplog.clear()  # embedding jobs and the Ray actors take their device by the same rule (api.resolve_device)
    with caplog.at_level("WARNING"):
        assert api.resolve_device("auto", what="--device") == torch.device("cpu")
    assert "--device=auto: an NVIDIA driver is present but this torch is built for CUDA 13.0" in caplog.text
    assert api.resolve_device("cpu") == torch.device("cpu")


def test_skip_counts_are_summed_over_the_ranks(tmp_path):
    """``data/skipped_*`` are the run's counts: every rank gets the sum of all ranks' (kinds any rank has)."""
    from mmpretrain.training.dist import DistInfo, summed_counts

    assert summed_counts({"bad_image": 2}, DistInfo(0, 1, 0, torch.device("cpu"))) == {"bad_image": 2}
    proc = torchrun("tests/dist/summed_counts.py", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = {"bad_image": 5, "corrupt_shard": 1, "empty_caption": 4}
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [want, want]
