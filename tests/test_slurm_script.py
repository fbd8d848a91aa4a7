"""scripts/slurm_train.sh (docs/cluster.md) with stand-ins for srun, scontrol and torchrun on PATH that log
their arguments: the early SIGTERM before a time limit stops the ranks and requeues the job once; a
preemption, which SLURM requeues itself, is not requeued a second time. Not run on a SLURM cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "slurm_train.sh"
SHIMS = {
    # srun: run the task (its options dropped), passing a SIGTERM on to it as srun does to a step
    "srun": """while [[ "$1" == --* ]]; do shift; done
"$@" & child=$!
trap 'kill -TERM $child' TERM
wait $child; wait $child""",
    "scontrol": """if [ "$1 $2" = "show hostnames" ]; then echo node-a; echo node-b
elif [ "$1 $2" = "show job" ]; then echo "JobId=$3 JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None"
fi""",
    # torchrun: a rank that checkpoints and exits 0 on SIGTERM
    "torchrun": """trap 'echo "torchrun got TERM" >> "$SHIM_LOG"; exit 0' TERM
while :; do sleep 0.05; done""",
}


@pytest.fixture
def shims(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in SHIMS.items():
        path = folder / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> "$SHIM_LOG"\n{body}\n')
        path.chmod(0o755)
    return folder


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def run_and_terminate(shims, tmp_path, **env) -> list[str]:
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "SHIM_LOG": str(log),
        "TORCHRUN": "torchrun",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        **env,
    }
    proc = subprocess.Popen(["bash", str(SCRIPT), "cfg.yaml", "train.steps=5"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 20
    while not (log.exists() and "torchrun " in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, (out, err)
    return log.read_text().splitlines()


def test_the_signal_before_the_time_limit_stops_the_ranks_and_requeues_once(shims, tmp_path):
    calls = run_and_terminate(shims, tmp_path)
    [torchrun] = [c for c in calls if c.startswith("torchrun --")]
    assert "--nnodes 2 --node_rank 0" in torchrun and "--master_addr node-a" in torchrun
    assert torchrun.endswith("-m mmpretrain.cli train cfg.yaml train.steps=5 train.resume=latest")
    assert "torchrun got TERM" in calls
    assert [c for c in calls if c.startswith("scontrol requeue")] == ["scontrol requeue 4242"]
    assert calls.index("torchrun got TERM") < calls.index("scontrol requeue 4242")  # after the ranks saved


def test_a_preempted_job_is_not_requeued_twice(shims, tmp_path):
    calls = run_and_terminate(shims, tmp_path, FAKE_JOB_STATE="PREEMPTED")
    assert "torchrun got TERM" in calls
    assert not [c for c in calls if c.startswith("scontrol requeue")]
