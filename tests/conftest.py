"""Shared fixtures: a tiny model config and tiny shards written to tmp (no downloads)."""

from __future__ import annotations

import csv
import io
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TINY_MODEL = {
    "embed_dim": 32,
    "towers": {
        "image": {
            "encoder": "openclip_vision",
            "params": {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}},
        },
        "text": {
            "encoder": "openclip_text",
            "params": {"text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
        },
    },
}


# a tiny open_clip architecture (open_clip.CLIP's own config) for parity and fine-tuning tests
OC_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def oc_model():
    """A tiny open_clip.CLIP, seeded, with logit_scale 3.0 (not CLIP's init, so a copy is visible)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.CLIP(OC_CFG["embed_dim"], OC_CFG["vision_cfg"], OC_CFG["text_cfg"]).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model


def make_image_folder(root: Path, count: int, *, size: int = 32, seed: int = 0) -> Path:
    """``count`` coloured-shape PNGs + captions.csv under ``root``."""
    from make_toy_images import BACKGROUNDS, COLORS, SHAPES, draw

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for i in range(count):
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            name = f"images/{i:04d}.png"
            draw(s, COLORS[c], BACKGROUNDS["white"], size, rng).save(root / name)
            w.writerow([name, f"a {c} {s}"])
    return root


def api_client(app, **kwargs):
    """A TestClient of the search service, addressed as a browser on this machine would (``Host:
    127.0.0.1``: the service serves only the host names it knows, and TestClient's ``testserver`` is none)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1", **kwargs)


@pytest.fixture(scope="module")
def searcher(search_index):
    """The toy index (``search_index``) opened with its model, once per test module."""
    from retrieval.jobs.search import Searcher

    return Searcher.open(search_index)


@pytest.fixture(scope="module")
def client(searcher):
    """A TestClient of the service over ``searcher`` as index "toy" (a module may define its own)."""
    from retrieval.serve.service import create_app

    return api_client(create_app({"toy": searcher}))


@pytest.fixture
def live_service(request):
    """``live_service(cfg, app=None) -> port``: the search service under uvicorn with our connection
    protocol (``retrieval.serve.service.uvicorn_config``) on a free loopback port, over the test module's
    ``searcher`` as index "toy"; stopped at the end of the test."""
    import threading
    import time
    from dataclasses import replace

    import uvicorn

    from retrieval.serve.service import create_app, uvicorn_config

    servers = []

    def start(cfg, app=None) -> int:
        port = free_port()
        app = app or create_app({"toy": request.getfixturevalue("searcher")}, cfg)
        config = uvicorn_config(app, replace(cfg, port=port))
        config.log_level = "warning"
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        servers.append((server, thread))
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(color=(200, 20, 20), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of exactly these (name, bytes) members, in order (hostile shards: no writer's checks)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: Path, samples: list[dict]) -> Path:
    from webdataset import TarWriter

    with TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> Path:
    """4 shards x 16 samples of 32 px shapes; returns the shard directory."""
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    root = make_image_folder(tmp_path_factory.mktemp("toy"), 64)
    out = root / "shards"
    make_shards(root, root / "captions.csv", out, ShardWriterConfig(max_count=16), progress=False)
    return out


@pytest.fixture
def tiny_model_cfg():
    from mmpretrain.training.validate import experiment_from_tree

    return experiment_from_tree({"model": TINY_MODEL}).model


def experiment_tree(shards: Path, run_dir: Path, **sections) -> dict:
    """A small full experiment config tree over ``shards``; ``sections`` are merged on top."""
    import copy

    from mmpretrain.config.loader import deep_merge

    tree = copy.deepcopy(
        {
            "model": TINY_MODEL,
            "data": {
                "train": str(shards / "shard-{000000..000003}.tar"),
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 16,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {
                "name": "t",
                "run_dir": str(run_dir),
                "steps": 10,
                "log_every": 1,
                "ckpt_every": 5,
                "progress": False,
                "threads": 1,
            },
        }
    )
    return deep_merge(tree, sections)


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmpretrain.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random image-text model exported as an open_clip folder (load_checkpoint-able)."""
    import torch

    from mmpretrain import api
    from mmpretrain.training.validate import experiment_from_tree

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    api.export_open_clip(api.create_model(experiment_from_tree({"model": TINY_MODEL}).model), out)
    return f"local-dir:{out}"


@pytest.fixture(scope="session")
def embedded(tiny_ckpt, toy_shards, tmp_path_factory):
    from retrieval.jobs.embed import EmbedConfig, run_embed

    out = tmp_path_factory.mktemp("emb") / "emb"
    stats = run_embed(EmbedConfig(model=tiny_ckpt, data=str(toy_shards), out=str(out), batch_size=8), progress=False)
    return out, stats


@pytest.fixture(scope="session")
def search_index(embedded, tmp_path_factory):
    """An exact index over the embedded toy shards (64 items)."""
    from retrieval.jobs.index import BuildConfig, build_index

    out = tmp_path_factory.mktemp("ix") / "ix"
    build_index(embedded[0], out, BuildConfig(), progress=False)
    return out


@pytest.fixture
def raster_calls():
    """A rasteriser "stub" (the package's placeholder, counting its calls) registered for one test; the
    corpus tests' configs name it. Returns the list of PNGs it drew."""
    from mmpretrain.corpora import RASTERIZERS
    from mmpretrain.corpora.base import placeholder

    calls = []

    def stub(src: str, out, size: int) -> None:
        calls.append(out)
        placeholder(src, out, size)

    with RASTERIZERS.temporary("stub", stub, doc="counts, then draws like the placeholder"):
        yield calls
