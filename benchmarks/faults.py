#!/usr/bin/env python
"""The fault suite: kill at every point, poison every input, skew every signal, change every field
(in the way SQLite's crash tests and FoundationDB's simulation test themselves), and print the
counts. Everything runs on CPU with real processes (the CLI, torchrun + gloo); nothing is mocked.

  kill      SIGKILL at a random step of the whole run, and at every named crash point of a
            checkpoint write (``mmpretrain/utils/faults.py``) on a random pass, single-process and
            FSDP (sharded checkpoints, one of 2 ranks killed); then ``train.resume=latest`` to the
            end. Only killed trials count: % bit-identical to an uninterrupted run; which checkpoint
            each resume used and the steps redone (goal <= ckpt_every); trials with no valid
            checkpoint though the run had gone past its first one (``benchmarks/fault_kill.py``).
  powerloss a traced run (strace) replayed on a strict model of the disk: after every fsync, the
            checkpoints a power cut would leave (only fsynced bytes and entries); corrupt ones
            accepted, progress lost past a returned save, some states resumed to the end
            (``benchmarks/powerloss.py``).
  poison    a shard per hostile member (deep JSON, 50 MB member, 180-megapixel PNG, EPS named .jpg,
            non-UTF-8 text, empty WAV, truncated MP4, ../ names, zero-byte shard, hung pipe), and the
            largest image the caps accept, read by the training loader with one worker: skipped under
            the expected reason / accepted / crashed / hung, and the worker's peak RSS beside a clean
            shard's (``benchmarks/fault_poison.py``).
  term    SIGTERM to both of 2 gloo ranks with 0-50 ms skew: % of trials where both ranks stop at the
          same step with one checkpoint and exit 0 within 30 s; then % whose resumed run matches an
          uninterrupted one bit for bit.
  resume  resume with batch size, seed, sources, world size, steps or lr changed: refused or
          accepted, against what docs/training.md says.

    python benchmarks/faults.py [--sections kill powerloss poison term resume] [--kill-trials 24]
        [--fsdp-trials 4] [--term-trials 20] [--resumes 6] [--json OUT] [--log benchmarks/results/faults_DATE.log]
Takes about 30 minutes on 2 cores; run it with nothing else on the machine (make bench-faults).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from fault_common import cli, config, finish, identical, last_step, say, torchrun, toy_shards, weights
from fault_kill import kill_suite
from fault_poison import poison_suite
from logs import header
from powerloss import powerloss_suite

SECTIONS = ("kill", "powerloss", "poison", "term", "resume")


# ------------------------------------------------------------------ SIGTERM with skew
def term_suite(work: Path, shards: Path, trials: int, seed: int, agent_trials: int = 4) -> dict:
    ref_cfg = config(shards, work / "tref", work / "tref.yaml", steps=400, ckpt_every=1, keep_last=1000, stop_after=36)
    ref_code, err = finish(torchrun("train", str(ref_cfg)), 300)
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
    code, _ = finish(proc, 60)
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
        code2, _ = finish(torchrun("train", str(cfg), "train.resume=latest", f"train.stop_after={step + 3}"), 240)
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
            code, err = finish(torchrun("train", str(base), *common), 240)
            allowed_code, _ = finish(torchrun("train", str(base), *common, "train.resume_allow=[world_size]"), 240)
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
def report(results: dict) -> list[str]:
    """The suite's figures as lines (printed, and written to --log)."""
    out: list[str] = []
    if "kill" in results:
        out += _kill_lines(results["kill"])
    if "powerloss" in results:
        out += _powerloss_lines(results["powerloss"])
    if "poison" in results:
        out += _poison_lines(results["poison"])
    out += _term_lines(results)
    return out


def _kill_lines(k: dict) -> list[str]:
    n, killed = len(k["trials"]), [r for r in k["trials"] if r["killed"]]
    crash = sum(":" in r["kill"] for r in k["trials"])
    return [
        f"\nkill -9 ({n} trials: {n - crash} at random steps of the whole run ({k['fsdp_trials']} of them FSDP, "
        f"sharded checkpoints), {crash} at crash points inside checkpoint writes and pruning)",
        f"  processes actually killed (only these count):   {k['killed']}/{n}",
        f"  resumed bit-identically to an uninterrupted run: {k['identical_pct']:.0f}%   (goal 100%)",
        f"  no valid checkpoint though past the first one:   {k['no_valid_checkpoint']}   (goal 0)",
        f"  steps redone, most in one trial:                 {k['max_steps_redone']}   (goal <= ckpt_every "
        f"{k['ckpt_every']}; over it: {k['over_ckpt_every']})",
        f"  resume used another checkpoint than predicted:   {k['resume_used_other']}",
        "  kill points: " + ", ".join(f"{r['kill']} (step {r['last_logged_step']})" for r in killed),
    ]


def _powerloss_lines(p: dict) -> list[str]:
    out = ["\npower loss (strict model: only fsynced bytes, and entries of fsynced folders, survive)"]
    for strategy, r in p.items():
        out += [
            f"  {strategy}: {len(r['states'])} distinct crash states; content model valid: {r['content_model_valid']}",
            f"    corrupt checkpoint accepted:                   {r['corrupt_accepted']}   (goal 0)",
            f"    progress lost past a returned save:            {r['progress_lost']}   (goal 0)",
            f"    no checkpoint left after a returned save:      {r['no_checkpoint_after_save']}   (goal 0)",
            f"    files cut short in the states (refused):       {r['short_files']}",
            f"    model gaps (paths used but never created):     {len(r.get('model_gaps', []))}   (goal 0)",
            f"    resumed to the end, bit-identical:             {r['resumed_identical']}/{r['resumed']}",
        ]
    return out


def _poison_lines(rows: dict) -> list[str]:
    base = next(iter(rows.values()))["worker_rss_mb"]
    out = [
        "\npoisoned corpus (training loader, 1 worker; 4 good samples + the poison)",
        f"  {'poison':26s} {'outcome':22s} {'expected':17s} {'worker peak RSS':>15s} {'vs clean':>9s} {'s':>5s}  "
        "counted as",
    ]
    for name, r in rows.items():
        out.append(
            f"  {name:26s} {r['outcome']:22s} {str(r['expected']):17s} {r['worker_rss_mb']:12.0f} MB "
            f"{r['worker_rss_mb'] - base:+6.0f} MB {r['seconds']:5.1f}  "
            f"{', '.join(f'{k}={v}' for k, v in r['counts'].items()) or '-'}"
        )
    out.append(f"  as expected: {sum(r['ok'] for r in rows.values())}/{len(rows)}")
    return out


def _term_lines(results: dict) -> list[str]:
    out: list[str] = []
    if "term" in results:
        t = results["term"]
        out.append(f"\nSIGTERM to 2 gloo ranks, 0-50 ms skew ({len(t['trials']) - t['agent_trials']} trials)")
        out.append(
            f"  both ranks checkpoint at the same step and exit 0 within 30 s: {t['same_step_pct']:.0f}%  (goal 100%)"
        )
        out.append(f"  slowest exit after the first SIGTERM:                          {t['max_exit_s']:.1f} s")
        out.append(f"  resumed run bit-identical to an uninterrupted one:             {t['exact_resume_pct']:.0f}%")
        out.append(
            f"  SIGTERM to torchrun's agent only ({t['agent_trials']} trials), same step on both ranks: "
            f"{t['agent_same_step_pct']:.0f}%"
        )
    if "resume" in results:
        out.append("\nresume with one field changed (docs/training.md, 'Resume compatibility')")
        for name, r in results["resume"].items():
            allow = f"; with train.resume_allow: {r['with_resume_allow']}" if r["with_resume_allow"] else ""
            out.append(f"  {name:26s} {r['outcome']}{allow}")
            if r["message"]:
                out.append(f"  {'':26s} {r['message'].split(' exactly: ')[-1].split('. Undo')[0][:100]}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--kill-trials", type=int, default=24, help="single-process kill trials")
    p.add_argument("--fsdp-trials", type=int, default=4, help="kill trials with FSDP (sharded checkpoints)")
    p.add_argument("--term-trials", type=int, default=20)
    p.add_argument("--resumes", type=int, default=6, help="power-loss crash states resumed to the end, per strategy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the full results here")
    p.add_argument("--log", help="write the report here, its first line the command and commit")
    args = p.parse_args()
    results, first = {}, header()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(tmp)
        shards = toy_shards(work / "toy") if set(args.sections) - {"poison"} else None
        for section in args.sections:
            start = time.perf_counter()
            if section == "kill":
                results["kill"] = kill_suite(work, shards, args.kill_trials, args.seed, args.fsdp_trials)
            elif section == "powerloss":
                results["powerloss"] = powerloss_suite(work, shards, args.resumes)
            elif section == "poison":
                results["poison"] = poison_suite(work)
            elif section == "term":
                results["term"] = term_suite(work, shards, args.term_trials, args.seed)
            else:
                results["resume"] = resume_suite(work, shards)
            say(f"{section}: {time.perf_counter() - start:.0f} s")
    lines = [first, *report(results)]
    print("\n".join(lines))
    if args.log:
        Path(args.log).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
