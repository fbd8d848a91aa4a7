#!/usr/bin/env python
"""The fault suite: kill at every point, poison every input, skew every signal, change every field
(in the way SQLite's crash tests and FoundationDB's simulation test themselves), and print the
counts. Everything runs on CPU with real processes (the CLI, torchrun + gloo); nothing is mocked.

  kill    SIGKILL at random times of a run and at every named crash point of a checkpoint write
          (``mmpretrain/utils/faults.py``), then ``train.resume=latest`` to the end: % of trials
          whose final weights are bit-identical to an uninterrupted run's; trials left with no
          valid checkpoint.
  poison  a shard per hostile member (deep JSON, 50 MB member, 180-megapixel PNG, EPS named .jpg,
          non-UTF-8 text, empty WAV, truncated MP4, ../ names, zero-byte shard, hung pipe) read by
          the training loader with one worker: skipped-and-counted / crashed / hung, and the
          worker's peak RSS beside a clean shard's.
  term    SIGTERM to both of 2 gloo ranks with 0-50 ms skew: % of trials where both ranks stop at the
          same step with one checkpoint and exit 0 within 30 s; then % whose resumed run matches an
          uninterrupted one bit for bit.
  resume  resume with batch size, seed, sources, world size, steps or lr changed: refused or
          accepted, against what docs/training.md says.

    python benchmarks/faults.py [--sections kill poison term resume] [--kill-trials 24] [--term-trials 20]
                                [--json OUT]
Takes about 15 minutes on 2 cores; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
CRASH_POINTS = [
    "ckpt.weights:2",
    "ckpt.state:2",
    "ckpt.checksums:3",
    "atomic_dir.synced:2",
    "ckpt.renamed:3",
    "remove_tree.renamed:1",
    "remove_tree.renamed:3",
    "train.step:9",
    "ckpt.weights:4",
    "ckpt.state:5",
    "atomic_dir.synced:4",
    "ckpt.renamed:2",
]


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data and configs
def toy_shards(root: Path, count: int = 96) -> Path:
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    subprocess.run(
        [PY, str(ROOT / "scripts/make_toy_images.py"), "--out", str(root), "--count", str(count)],
        check=True,
        capture_output=True,
        env=ENV,
    )
    make_shards(root, root / "captions.csv", root / "shards", ShardWriterConfig(max_count=16), progress=False)
    return root / "shards"


def config(shards: Path, run_dir: Path, path: Path, **train) -> Path:
    tree = {
        "base": [str(ROOT / "configs/model/tiny.yaml")],
        "data": {"train": str(shards), "batch_size": 8, "num_workers": 1, "shuffle_buffer": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 4},
        "train": {
            "name": "f",
            "run_dir": str(run_dir),
            "progress": False,
            "threads": 1,
            "log_every": 1,
            "log_sample_keys": True,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "mmpretrain.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_step(path: Path) -> int:
    from mmpretrain.training.metrics import read_jsonl

    return max((r["step"] for r in read_jsonl(path)), default=0)


# ------------------------------------------------------------------ kill -9
def kill_suite(work: Path, shards: Path, trials: int, seed: int) -> dict:
    """Half the trials: SIGKILL at a random time after the first checkpoint; half: at a named crash point."""
    from mmpretrain.models.layout import checkpoint_dir, find_latest

    steps, train = 40, {"steps": 40, "ckpt_every": 4, "keep_last": 1}
    ref = cli("train", str(config(shards, work / "ref", work / "ref.yaml", **train)))
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = weights(checkpoint_dir(work / "ref", steps))
    rng, rows = random.Random(seed), []
    for i in range(trials):
        run = work / f"kill{i}"
        cfg = config(shards, run, work / f"kill{i}.yaml", **train)
        point = CRASH_POINTS[(i // 2) % len(CRASH_POINTS)] if i % 2 else None
        how = point or "random time"
        if point:
            killed = cli("train", str(cfg), env={"MMPRETRAIN_CRASH_AT": point}).returncode == -9
        else:
            killed = _kill_at_random(cfg, run, rng)
        valid, at = find_latest(run) is not None, last_step(run / "metrics.jsonl")
        done = cli("train", str(cfg), "train.resume=latest")
        same = done.returncode == 0 and identical(weights(checkpoint_dir(run, steps)), want)
        rows.append(
            {
                "trial": i,
                "kill": how,
                "killed": killed,
                "last_logged_step": at,
                "valid_checkpoint_left": valid,
                "identical": same,
            }
        )
        say(f"kill {i + 1}/{trials}: {how:22s} killed={killed} after step {at:2d}, valid_left={valid} identical={same}")
    return {
        "trials": rows,
        "identical_pct": 100 * sum(r["identical"] for r in rows) / len(rows),
        "no_valid_checkpoint": sum(not r["valid_checkpoint_left"] for r in rows),
        "killed": sum(r["killed"] for r in rows),
    }


def _kill_at_random(cfg: Path, run: Path, rng: random.Random) -> bool:
    proc = subprocess.Popen(
        [PY, "-m", "mmpretrain.cli", "train", str(cfg)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while last_step(run / "metrics.jsonl") < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # past the first checkpoint (step 4)
    time.sleep(rng.uniform(0, 1.2))  # the rest of the run takes ~1.5 s here
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -9


# ------------------------------------------------------------------ poisoned corpus
def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def poison_cases() -> dict[str, tuple[list[tuple[str, bytes]] | str, str]]:
    """name -> (the poison sample's tar members, or a shard URL; the modality its ops decode).
    A name ending in "(cap off)" reads its case with ``data.max_member_bytes`` raised to 1 GiB: the
    contrast that shows what the cap saves."""
    from make_toy_clips import make_clip
    from PIL import Image

    clip, _ = make_clip(random.Random(0), size=32, n_frames=16)
    wav = io.BytesIO()
    import wave

    with wave.open(wav, "wb") as w:  # a header and no frames
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    img = io.BytesIO()
    Image.new("RGB", (64, 64)).save(img, format="PNG")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
    return {
        "clean shard (baseline)": ([], "image"),
        "200k-deep JSON caption": ([("p.png", img.getvalue()), ("p.json", b"[" * 200_000 + b"]" * 200_000)], "image"),
        "50 MB member": ([("p.png", os.urandom(1 << 20) * 50), ("p.txt", b"big")], "image"),
        "50 MB member (cap off)": ([("p.png", os.urandom(1 << 20) * 50), ("p.txt", b"big")], "image"),
        "180-megapixel PNG": ([("p.png", _png_header(15000, 12000)), ("p.txt", b"bomb")], "image"),
        "EPS named .jpg": ([("p.jpg", eps), ("p.txt", b"postscript")], "image"),
        "non-UTF-8 text": ([("p.png", img.getvalue()), ("p.txt", b"\xff\xfe\xfa\xc3\x28 caption")], "image"),
        "../ member names": ([("../p.png", img.getvalue()), ("../p.txt", b"escape")], "image"),
        "empty WAV": ([("p.wav", wav.getvalue()), ("p.txt", b"silence")], "audio"),
        "truncated MP4": ([("p.mp4", clip[: len(clip) // 3]), ("p.txt", b"cut")], "video"),
        "zero-byte shard": ("EMPTY", "image"),
        "hung pipe: shard": ("pipe:sleep 600", "image"),
    }


POISON_RUNNER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mmpretrain.training.validate import experiment_from_tree
from mmpretrain.data.loader import ResumableLoader
from mmpretrain.data.ops import OpContext
from mmpretrain.models import build_model
tree = json.loads(sys.argv[2])
cfg = experiment_from_tree(tree)
ctx = build_model(cfg.model).data_context()
loader = ResumableLoader(cfg.data, ctx, seed=0)
it, keys = iter(loader), []
for _ in range(int(sys.argv[3])):
    keys += next(it).keys
counts = loader.error_counts()
peak = 0  # the live worker's peak resident set (VmHWM), in kB
for worker in loader.loader._iterator._workers:
    for line in open(f"/proc/{worker.pid}/status"):
        if line.startswith("VmHWM:"):
            peak = max(peak, int(line.split()[1]))
print(json.dumps({"keys": keys, "counts": counts, "worker_rss_mb": peak / 1024}))
"""

MEDIA_OPS = {
    "image": [{"op": "decode_image"}, {"op": "resize_center_crop"}, {"op": "to_tensor_normalize"}],
    "audio": [{"op": "decode_audio", "params": {"sample_rate": 16000, "seconds": 1.0, "train": False}}],
    "video": [{"op": "decode_video", "params": {"frames": 4, "fps": 4, "size": 32, "train": False}}],
}


def poison_suite(work: Path) -> dict:
    from make_toy_clips import make_clip

    rows = {}
    for name, (members, modality) in poison_cases().items():
        rng = random.Random(1)
        good = []
        for i in range(4):
            data, caption = make_clip(rng, size=32, n_frames=16)
            good += [
                (f"g{i}.mp4", data),
                (f"g{i}.wav", _wav(rng)),
                (f"g{i}.png", _png(rng)),
                (f"g{i}.txt", caption.encode()),
            ]
        folder = work / f"poison{len(rows)}"
        folder.mkdir()
        urls = [str(_tar(folder / "good.tar", good))]
        if isinstance(members, list) and members:
            urls.append(str(_tar(folder / "poison.tar", members)))
        elif members == "EMPTY":
            (folder / "poison.tar").write_bytes(b"")
            urls.append(str(folder / "poison.tar"))
        elif isinstance(members, str):
            urls.append(members)
        tree = {
            "model": yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())["model"],
            "data": {
                "train": "::".join(urls),
                "batch_size": 2,
                "num_workers": 1,
                "shuffle_buffer": 0,
                "shuffle_shards": False,
                "stall_timeout_s": 5,
                "timeout_s": 60,
                "ops": MEDIA_OPS[modality] + [{"op": "caption"}, {"op": "tokenize"}],
            },
        }
        if name.endswith("(cap off)"):
            tree["data"]["max_member_bytes"] = 1 << 30
        rows[name] = _run_poison(tree, modality)
        say(
            f"poison: {name:26s} {rows[name]['outcome']:22s} {rows[name]['counts']} "
            f"worker peak RSS {rows[name]['worker_rss_mb']:.0f} MB"
        )
    return rows


def _run_poison(tree: dict, modality: str) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [PY, "-c", POISON_RUNNER, str(ROOT), json.dumps(tree), "4"],
            capture_output=True,
            text=True,
            timeout=180,
            env=ENV,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "hung", "counts": {}, "worker_rss_mb": float("nan"), "seconds": 180}
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {
            "outcome": "crashed",
            "counts": {},
            "worker_rss_mb": float("nan"),
            "seconds": seconds,
            "error": proc.stderr.strip().splitlines()[-1][:200],
        }
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    good = sorted(set(out["keys"])) == [f"g{i}" for i in range(4)]
    counted = bool(out["counts"])
    outcome = "skipped and counted" if good and counted else ("clean" if good else "samples lost")
    return {"outcome": outcome, "counts": out["counts"], "worker_rss_mb": out["worker_rss_mb"], "seconds": seconds}


def _png(rng: random.Random) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return buf.getvalue()


def _wav(rng: random.Random) -> bytes:
    import wave

    import numpy as np

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) * rng.uniform(0.01, 0.1)) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


# ------------------------------------------------------------------ SIGTERM with skew
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 240) -> subprocess.Popen:
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "mmpretrain.cli",
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[1]


def term_suite(work: Path, shards: Path, trials: int, seed: int, agent_trials: int = 4) -> dict:
    ref_cfg = config(shards, work / "tref", work / "tref.yaml", steps=400, ckpt_every=1, keep_last=1000, stop_after=36)
    ref_code, err = _finish(torchrun("train", str(ref_cfg)), 300)
    assert ref_code == 0, err[-2000:]
    rng, rows = random.Random(seed), []
    for i in range(trials + agent_trials):
        mode = "ranks" if i < trials else "agent"
        rows.append(_term_trial(work, shards, i, mode, rng))
        r = rows[-1]
        say(
            f"term {i + 1}/{trials + agent_trials} ({mode}): skew {r['skew_ms']:4.1f} ms: exit {r['exit_code']} in "
            f"{r['exit_s']:.1f} s, checkpoint step {r['step']}, ranks ended {r['rank_last_steps']}, "
            f"exact resume {r['exact_resume']}"
        )
    ranks = [r for r in rows if r["mode"] == "ranks"]
    agent = [r for r in rows if r["mode"] == "agent"]
    pct = lambda rs, k: 100 * sum(r[k] for r in rs) / max(1, len(rs))  # noqa: E731
    return {
        "trials": rows,
        "same_step_pct": pct(ranks, "same_step"),
        "exact_resume_pct": pct(ranks, "exact_resume"),
        "max_exit_s": max(r["exit_s"] for r in ranks),
        "agent_same_step_pct": pct(agent, "same_step"),
        "agent_trials": len(agent),
    }


def _term_trial(work: Path, shards: Path, i: int, mode: str, rng: random.Random) -> dict:
    """One run under torchrun, SIGTERMed after a random step: both ranks (``ranks``, in random order,
    0-50 ms apart) or torchrun's agent alone (``agent``, as Kubernetes signals PID 1)."""
    from mmpretrain.models.layout import checkpoint_dir, list_checkpoints
    from mmpretrain.training.checkpoint import load_state
    from mmpretrain.utils.procs import rank_pids

    run = work / f"term{i}"
    cfg = config(shards, run, work / f"term{i}.yaml", steps=400, ckpt_every=1000)
    proc = torchrun("train", str(cfg))
    target, deadline = rng.randint(3, 25), time.time() + 120
    while last_step(run / "samples.rank0.jsonl") < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    pids, skew, first = rank_pids(proc.pid), rng.uniform(0, 0.05), rng.randrange(2)
    if mode == "agent":
        skew = 0.0
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.kill(pids[first], signal.SIGTERM)
        time.sleep(skew)
        os.kill(pids[1 - first], signal.SIGTERM)
    t0 = time.perf_counter()
    code, _ = _finish(proc, 60)
    exit_s = time.perf_counter() - t0
    ckpts = list_checkpoints(run)
    step = int(load_state(ckpts[-1])["step"]) if ckpts else -1
    ends = [last_step(run / f"samples.rank{r}.jsonl") for r in (0, 1)]
    # torchrun's agent exits 1 after forwarding a SIGTERM to its ranks; the ranks themselves exit 0
    same = (
        (code == 0 or mode == "agent") and code is not None and len(ckpts) == 1 and ends == [step, step] and exit_s < 30
    )
    resumed = False
    if same and step + 3 <= 36:
        code2, _ = _finish(torchrun("train", str(cfg), "train.resume=latest", f"train.stop_after={step + 3}"), 240)
        resumed = code2 == 0 and identical(
            weights(checkpoint_dir(run, step + 3)), weights(checkpoint_dir(work / "tref", step + 3))
        )
    return {
        "trial": i,
        "mode": mode,
        "skew_ms": round(1000 * skew, 1),
        "first": first,
        "exit_code": code,
        "exit_s": round(exit_s, 2),
        "step": step,
        "rank_last_steps": ends,
        "same_step": same,
        "exact_resume": resumed,
    }


# ------------------------------------------------------------------ resume with a changed field
def resume_suite(work: Path, shards: Path) -> dict:
    import shutil

    base = config(shards, work / "base", work / "base.yaml", steps=8, stop_after=4, ckpt_every=4)
    assert cli("train", str(base)).returncode == 0
    two = work / "two"
    two.mkdir()
    for i in range(2):  # a second collection, for the "sources" change
        shutil.copy(sorted(shards.glob("*.tar"))[i], two / f"s{i}.tar")
    changes = {
        "data.batch_size": ["data.batch_size=4"],
        "train.seed": ["train.seed=1"],
        "data.train (other shards)": [f"data.train={two}"],
        "world size": None,
        "train.steps": ["train.steps=12"],
        "optim.lr": ["optim.lr=3e-4"],
    }
    rows = {}
    for name, overrides in changes.items():
        run = work / f"r_{len(rows)}"
        shutil.copytree(work / "base", run)
        common = ["train.resume=latest", f"train.run_dir={run}"]
        if overrides is None:
            code, err = _finish(torchrun("train", str(base), *common), 240)
            allowed_code, _ = _finish(torchrun("train", str(base), *common, "train.resume_allow=[world_size]"), 240)
        else:
            proc = cli("train", str(base), *common, *overrides)
            code, err = proc.returncode, proc.stderr
            key = overrides[0].split("=")[0]
            allowed_code = (
                cli("train", str(base), *common, *overrides, f"train.resume_allow=[{key}]").returncode
                if code != 0
                else None
            )
        message = next((line for line in err.splitlines() if "cannot resume" in line), "")
        rows[name] = {
            "outcome": "accepted" if code == 0 else "refused",
            "exit_code": code,
            "with_resume_allow": None if allowed_code is None else ("runs" if allowed_code == 0 else "fails"),
            "message": message.split("error: ")[-1][:400],
        }
        say(
            f"resume: {name:26s} {rows[name]['outcome']:9s} allow-> {rows[name]['with_resume_allow']}  {message[-120:]}"
        )
    return rows


# ------------------------------------------------------------------ report
def report(results: dict) -> None:
    if "kill" in results:
        k = results["kill"]
        print(
            f"\nkill -9 ({len(k['trials'])} trials: {len(k['trials']) - len(k['trials']) // 2} at random times, "
            f"{len(k['trials']) // 2} at crash points inside checkpoint writes and pruning)"
        )
        print(f"  resumed bit-identically to an uninterrupted run: {k['identical_pct']:.0f}%   (goal 100%)")
        print(f"  trials left with no valid checkpoint:            {k['no_valid_checkpoint']}   (goal 0)")
        print(f"  processes actually killed:                       {k['killed']}/{len(k['trials'])}")
    if "poison" in results:
        print("\npoisoned corpus (training loader, 1 worker; 4 good samples + the poison)")
        base = next(iter(results["poison"].values()))["worker_rss_mb"]
        print(f"  {'poison':26s} {'outcome':22s} {'worker peak RSS':>15s} {'vs clean':>9s} {'s':>5s}  counted as")
        for name, r in results["poison"].items():
            print(
                f"  {name:26s} {r['outcome']:22s} {r['worker_rss_mb']:12.0f} MB {r['worker_rss_mb'] - base:+6.0f} MB "
                f"{r['seconds']:5.1f}  {', '.join(f'{k}={v}' for k, v in r['counts'].items()) or '-'}"
            )
    if "term" in results:
        t = results["term"]
        print(f"\nSIGTERM to 2 gloo ranks, 0-50 ms skew ({len(t['trials']) - t['agent_trials']} trials)")
        print(
            f"  both ranks checkpoint at the same step and exit 0 within 30 s: {t['same_step_pct']:.0f}%  (goal 100%)"
        )
        print(f"  slowest exit after the first SIGTERM:                          {t['max_exit_s']:.1f} s")
        print(f"  resumed run bit-identical to an uninterrupted one:             {t['exact_resume_pct']:.0f}%")
        print(
            f"  SIGTERM to torchrun's agent only ({t['agent_trials']} trials), same step on both ranks: "
            f"{t['agent_same_step_pct']:.0f}%"
        )
    if "resume" in results:
        print("\nresume with one field changed (docs/training.md, 'Resume compatibility')")
        for name, r in results["resume"].items():
            allow = f"; with train.resume_allow: {r['with_resume_allow']}" if r["with_resume_allow"] else ""
            print(f"  {name:26s} {r['outcome']}{allow}")
            if r["message"]:
                print(f"  {'':26s} {r['message'].split(' exactly: ')[-1].split('. Undo')[0][:100]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sections",
        nargs="+",
        default=["kill", "poison", "term", "resume"],
        choices=["kill", "poison", "term", "resume"],
    )
    p.add_argument("--kill-trials", type=int, default=24)
    p.add_argument("--term-trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the full results here")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(tmp)
        shards = toy_shards(work / "toy") if set(args.sections) - {"poison"} else None
        for section in args.sections:
            start = time.perf_counter()
            if section == "kill":
                results["kill"] = kill_suite(work, shards, args.kill_trials, args.seed)
            elif section == "poison":
                results["poison"] = poison_suite(work)
            elif section == "term":
                results["term"] = term_suite(work, shards, args.term_trials, args.seed)
            else:
                results["resume"] = resume_suite(work, shards)
            say(f"{section}: {time.perf_counter() - start:.0f} s")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
