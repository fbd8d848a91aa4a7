"""What the fault suite's sections share (``benchmarks/faults.py``): the toy corpus, configs, the CLI
and torchrun in subprocesses, and checkpoint comparisons."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


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
    """The model's tensors of a checkpoint folder, whole (model.safetensors or sharded/)."""
    from mmpretrain.models.layout import read_weights

    return read_weights(ckpt)


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_step(path: Path) -> int:
    from mmpretrain.training.metrics import read_jsonl

    return max((r["step"] for r in read_jsonl(path)), default=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str) -> list[str]:
    """The command line of a 2-rank gloo run of the CLI."""
    return [
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


def torchrun(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, *torchrun_cmd(*args)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[1]
