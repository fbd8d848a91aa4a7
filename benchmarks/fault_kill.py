"""The fault suite's kill -9 section (``benchmarks/faults.py --sections kill``).

Each trial kills a training run at a random step of the whole run (1 to 39 of 40), or at a named
crash point inside a checkpoint write or pruning (``mmpretrain/utils/faults.py``), on a random pass of
it (any of the run's checkpoints), then resumes it with ``train.resume=latest`` to the end. Per trial:
whether the process was killed at all (only killed trials count), the last step it logged, which
checkpoint the resume used (from the resumed run's own log line) and so the steps redone, whether a
valid checkpoint was left though the run had gone past its first one, and whether the final weights
are bit-identical to an uninterrupted run's. A few trials train with ``train.strategy=fsdp`` on 2
gloo ranks (sharded checkpoints) and kill one rank.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path

from fault_common import ENV, PY, ROOT, cli, config, finish, identical, last_step, say, torchrun, weights

STEPS, CKPT_EVERY = 40, 4
TRAIN = {"steps": STEPS, "ckpt_every": CKPT_EVERY, "keep_last": 1}
# crash point -> how many times a run passes it (a trial picks one of those passes at random)
CRASH_POINTS = {
    "ckpt.weights": STEPS // CKPT_EVERY,
    "ckpt.state": STEPS // CKPT_EVERY,
    "ckpt.checksums": STEPS // CKPT_EVERY,
    "atomic_dir.synced": STEPS // CKPT_EVERY,
    "ckpt.renamed": STEPS // CKPT_EVERY,
    "remove_tree.renamed": STEPS // CKPT_EVERY - 1,  # the first checkpoint prunes nothing
    "train.step": STEPS - 1,
}
USED = re.compile(r"resume=latest: .*step_(\d{8})")


def kill_suite(work: Path, shards: Path, trials: int, seed: int, fsdp_trials: int = 4) -> dict:
    """``trials`` single-process trials (half at random steps, half at crash points) and ``fsdp_trials``
    with sharded checkpoints. The reference runs keep every checkpoint (the power-loss section reads
    them)."""
    from mmpretrain.models.layout import checkpoint_dir

    refs = {
        s: weights(checkpoint_dir(reference(work, shards, s), STEPS)) for s in ("ddp", "fsdp")[: 1 + bool(fsdp_trials)]
    }
    rng, rows, names = random.Random(seed), [], list(CRASH_POINTS)
    for i in range(trials + fsdp_trials):
        fsdp = i >= trials
        if fsdp or i % 2 == 0:
            how = f"random step {rng.randint(1, STEPS - 1)}"
        else:
            name = names[(i // 2) % len(names)]
            how = f"{name}:{rng.randint(1, CRASH_POINTS[name])}"
        rows.append(_trial(work, shards, i, how, fsdp, refs["fsdp" if fsdp else "ddp"], rng))
        r = rows[-1]
        say(
            f"kill {i + 1}/{trials + fsdp_trials}: {r['strategy']} {how:24s} killed={r['killed']} after step "
            f"{r['last_logged_step']:2d}, resumed from {r['resumed_from']:2d} (redone {r['steps_redone']}), "
            f"valid_left={r['valid_checkpoint_left']} identical={r['identical']}"
        )
    killed = [r for r in rows if r["killed"]]
    return {
        "trials": rows,
        "killed": len(killed),
        "identical_pct": 100 * sum(r["identical"] for r in killed) / max(1, len(killed)),
        "no_valid_checkpoint": sum(r["needed_checkpoint"] and not r["valid_checkpoint_left"] for r in killed),
        "max_steps_redone": max((r["steps_redone"] for r in killed), default=0),
        "over_ckpt_every": sum(r["steps_redone"] > CKPT_EVERY for r in killed),
        "resume_used_other": sum(r["resume_used"] != r["resumed_from"] for r in killed),
        "ckpt_every": CKPT_EVERY,
        "fsdp_trials": fsdp_trials,
    }


def reference(work: Path, shards: Path, strategy: str) -> Path:
    """The uninterrupted run of ``strategy`` (ddp: one process; fsdp: 2 gloo ranks), every checkpoint
    kept; made once per work folder."""
    run = work / f"ref_{strategy}"
    if (run / "checkpoints" / f"step_{STEPS:08d}").is_dir():
        return run
    cfg = config(shards, run, work / f"ref_{strategy}.yaml", **{**TRAIN, "keep_last": 1000})
    if strategy == "ddp":
        code, err = (p := cli("train", str(cfg))).returncode, p.stderr
    else:
        code, err = finish(torchrun("train", str(cfg), "train.strategy=fsdp"), 600)
    assert code == 0, err[-2000:]
    return run


def _trial(work: Path, shards: Path, i: int, how: str, fsdp: bool, want: dict, rng: random.Random) -> dict:
    from mmpretrain.models.layout import checkpoint_dir, find_latest, step_of

    run = work / f"kill{i}"
    cfg = config(shards, run, work / f"kill{i}.yaml", **TRAIN)
    extra = ("train.strategy=fsdp",) if fsdp else ()
    if how.startswith("random step"):
        killed = _kill_at_step(cfg, run, int(how.split()[-1]), fsdp, rng)
    else:
        killed = cli("train", str(cfg), env={"MMPRETRAIN_CRASH_AT": how}).returncode == -9
    logged = last_step(run / ("samples.rank0.jsonl" if fsdp else "metrics.jsonl"))
    latest = find_latest(run)
    start = step_of(latest) if latest is not None else 0
    if fsdp:
        code, err = finish(torchrun("train", str(cfg), "train.resume=latest", *extra), 600)
    else:
        done = cli("train", str(cfg), "train.resume=latest")
        code, err = done.returncode, done.stderr
    used = USED.search(err)
    same = code == 0 and identical(weights(checkpoint_dir(run, STEPS)), want)
    return {
        "trial": i,
        "strategy": "fsdp" if fsdp else "ddp",
        "kill": how,
        "killed": killed,
        "last_logged_step": logged,
        "needed_checkpoint": logged > CKPT_EVERY,  # the run went past its first checkpoint
        "valid_checkpoint_left": latest is not None,
        "resumed_from": start,
        "resume_used": int(used.group(1)) if used else (0 if "no checkpoint yet" in err else None),
        "steps_redone": max(0, logged - (int(used.group(1)) if used else start)),
        "identical": same,
    }


def _kill_at_step(cfg: Path, run: Path, target: int, fsdp: bool, rng: random.Random) -> bool:
    """SIGKILL the run (one rank of an FSDP run) once it has logged ``target`` steps, after a random
    0-50 ms more (inside the next step, or its checkpoint write)."""
    from mmpretrain.utils.procs import rank_pids

    if fsdp:
        proc = torchrun("train", str(cfg), "train.strategy=fsdp")
        log = run / "samples.rank0.jsonl"
    else:
        cmd = [PY, "-m", "mmpretrain.cli", "train", str(cfg)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = run / "metrics.jsonl"
    deadline = time.time() + 300
    while last_step(log) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    if proc.poll() is not None:
        return False
    if fsdp:
        victim = rank_pids(proc.pid)[rng.randrange(2)]
        subprocess.run(["kill", "-9", str(victim)], check=False)
        finish(proc, 120)  # the agent stops the other rank and exits
        return True
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -9
