"""``retrieval`` loads FAISS's OpenMP runtime with threads that sleep after a parallel region (spin count
0) and torch's with a short spin (20,000) (``retrieval/_openmp.py``); a user's setting applies to both.
libgomp prints each runtime's settings as it loads (``OMP_DISPLAY_ENV``): torch's first, then FAISS's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

SHOW = "import os, retrieval; print('after:', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def loaded(policy: str | None) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    runtimes = re.findall(r"OMP_WAIT_POLICY = '(\w+)'.*?GOMP_SPINCOUNT = '(\d+)'", text, re.S)
    return runtimes, re.search(r"after: (\S+) (\S+)", text).groups()


def test_faiss_threads_sleep_and_torchs_spin_briefly():
    runtimes, after = loaded(None)
    if len(runtimes) != 2:
        pytest.skip(f"expected torch's and FAISS's libgomp, found {len(runtimes)} OpenMP runtimes")
    assert runtimes == [("PASSIVE", "20000"), ("PASSIVE", "0")]  # libgomp's default would spin 300,000 times
    assert after == ("None", "None")  # processes started later get the environment as it was


def test_a_users_policy_applies_to_both():
    runtimes, after = loaded("ACTIVE")
    assert runtimes and all(policy == "ACTIVE" for policy, _ in runtimes)  # and libgomp's own spin count
    assert after == ("ACTIVE", "None")
