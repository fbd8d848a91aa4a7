"""Hostile input (issue 11): every bad sample or shard is a counted skip, never a crash or a hang;
bounds on members, JSON, image formats, stalled pipes and stuck loaders; no secret or server path
over HTTP; no code loading from a checkpoint's config."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from PIL import Image

from mmpretrain.config.strict import ConfigError
from mmpretrain.data.loader import ResumableLoader
from mmpretrain.data.ops import SampleError, open_image
from mmpretrain.data.stream import ErrorCounter, ReadLimits, read_samples
from mmpretrain.errors import DataError
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import TINY_MODEL, api_client, png_bytes, raw_tar, write_shard

DEEP_JSON = b"[" * 200_000 + b"]" * 200_000


def _loader(tmp_path, urls, **data):
    from mmpretrain.models import build_model

    cfg = experiment_from_tree(
        {"model": TINY_MODEL, "data": {"train": urls, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0, **data}}
    )
    return ResumableLoader(cfg.data, build_model(cfg.model).data_context(), seed=0)


def _good(n, prefix="g"):
    return [{"__key__": f"{prefix}{i}", "png": png_bytes(), "txt": f"a red square {i}"} for i in range(n)]


def _first_batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- 3. any failure in a sample is a counted skip
def test_a_200k_deep_json_caption_is_skipped_and_counted(tmp_path):
    shard = write_shard(tmp_path / "s.tar", _good(3) + [{"__key__": "deep", "png": png_bytes(), "json": DEEP_JSON}])
    loader = _loader(tmp_path, str(shard))
    keys = [k for b in _first_batches(loader, 2) for k in b.keys]
    assert "deep" not in keys and loader.error_counts() == {"bad_json": 1}


def test_an_unexpected_exception_in_an_op_is_a_counted_skip_naming_shard_and_key(tmp_path, caplog):
    from mmpretrain.data.stream import ShardStream, StreamSpec

    shard = write_shard(tmp_path / "s.tar", _good(4))

    def explode(s):
        if s["__key__"] == "g1":
            raise KeyError("codec bug")
        return {**s, "x": torch.zeros(1)}

    stream = ShardStream(StreamSpec((str(shard),), batch_size=3, seed=0, shuffle_buffer=0), [explode])
    batch = next(iter(stream))
    assert batch.keys == ["g0", "g2", "g3"] and batch.position.errors == {"op_error": 1}
    assert "s.tar#g1" in caplog.text and "KeyError" in caplog.text


def test_on_error_raise_fails_loudly_with_the_sample_named(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "deep", "png": png_bytes(), "json": DEEP_JSON}] + _good(3))
    with pytest.raises(DataError, match="bad_json.*deep"):
        _first_batches(_loader(tmp_path, str(shard), on_error="raise"), 1)


def test_embedding_job_and_media_eval_survive_hostile_json(tiny_ckpt, tmp_path):
    from mmpretrain import api
    from mmpretrain.eval.items import item_batches

    shard = write_shard(tmp_path / "s.tar", _good(2) + [{"__key__": "deep", "png": png_bytes(), "json": DEEP_JSON}])
    batches = list(item_batches(api.load_checkpoint(tiny_ckpt), str(shard), batch_size=8))
    assert sum(len(b.keys) for b in batches) == 3 and batches[-1].complete  # the image is fine; its json ignored


# ---------------------------------------------------------------- 8. bounds
def test_oversized_members_are_skipped_without_being_read(tmp_path):
    shard = raw_tar(
        tmp_path / "s.tar",
        [
            ("a.png", png_bytes()),
            ("a.txt", b"red"),
            ("big.png", b"\0" * 50_000),
            ("big.txt", b"huge"),
            ("b.png", png_bytes()),
            ("b.txt", b"blue"),
        ],
    )
    errors = ErrorCounter("skip", None)
    samples = list(read_samples([str(shard)], errors.handler, ReadLimits(max_member_bytes=10_000)))
    assert [s["__key__"] for s in samples] == ["a", "big", "b"] and "png" not in samples[1]
    assert errors.counts == {"oversized_member": 1}


def test_member_names_with_dotdot_or_absolute_paths_are_skipped(tmp_path):
    shard = raw_tar(
        tmp_path / "s.tar",
        [("../evil.png", png_bytes()), ("ok.png", png_bytes()), ("a/../../x.txt", b"x"), ("/etc/cron.txt", b"y")],
    )
    errors = ErrorCounter("skip", None)
    samples = list(read_samples([str(shard)], errors.handler))
    assert [s["__key__"] for s in samples] == ["ok"] and errors.counts == {"unsafe_name": 3}


def test_only_the_image_formats_we_decode_are_parsed(tmp_path):
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(ppm, format="PPM")  # PIL decodes it; we must not be asked to
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    for data in (ppm.getvalue(), eps):
        with pytest.raises(SampleError, match="cannot decode"):
            open_image(data)
    assert open_image(png_bytes()).size == (32, 32)
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "ppm", "jpg": ppm.getvalue(), "txt": "x"}] + _good(2))
    loader = _loader(tmp_path, str(shard))
    assert [k for k in _first_batches(loader, 1)[0].keys] == ["g0", "g1"]
    assert loader.error_counts() == {"bad_image": 1}


def test_decompression_bomb_header_is_refused_before_decoding():
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a valid PNG header claiming 15000 x 12000 = 180 megapixels, with almost no data behind it
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 12000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
    t0 = time.perf_counter()
    with pytest.raises(SampleError, match="too large|cannot decode"):
        open_image(png)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.timeout(60)
def test_a_stalled_pipe_shard_is_abandoned_and_counted(tmp_path):
    good = write_shard(tmp_path / "good.tar", _good(4))
    errors = ErrorCounter("skip", None)
    t0 = time.perf_counter()
    urls = ["pipe:sleep 50", str(good)]
    samples = list(read_samples(urls, errors.handler, ReadLimits(stall_timeout_s=1.0)))
    assert [s["__key__"] for s in samples] == ["g0", "g1", "g2", "g3"]
    assert errors.counts.get("stalled_shard") == 1 and time.perf_counter() - t0 < 15


@pytest.mark.timeout(90)
def test_a_stuck_loader_worker_stops_the_run_naming_its_shard(tmp_path):
    good = write_shard(tmp_path / "good.tar", _good(2))
    loader = _loader(
        tmp_path, f"{good}::pipe:sleep 80", num_workers=2, timeout_s=3, stall_timeout_s=0, shuffle_shards=False
    )
    with pytest.raises(DataError, match=r"no batch .* 3 s.*pipe:sleep 80"):
        _first_batches(loader, 4)


def test_trust_remote_code_from_a_checkpoint_config_is_refused():
    tree = {
        "model": {
            "embed_dim": 16,
            "towers": {
                "image": TINY_MODEL["towers"]["image"],
                "text": {"encoder": "hf_text", "params": {"model_type": "bert", "config": {"trust_remote_code": True}}},
            },
        }
    }
    with pytest.raises(ConfigError, match="trust_remote_code cannot be set"):
        experiment_from_tree(tree)


# ---------------------------------------------------------------- 7. nothing secret over HTTP
def test_http_never_shows_commands_credentials_or_server_paths(tiny_ckpt, toy_shards, tmp_path):
    from retrieval.jobs.embed import EmbedConfig, run_embed
    from retrieval.jobs.index import BuildConfig, build_index
    from retrieval.jobs.search import Searcher
    from retrieval.serve.service import create_app

    shard = write_shard(tmp_path / "private-shard.tar", _good(8))  # no json: the source shown is the shard's
    data = f"pipe:TOKEN='Authorization: Bearer s3cr3t' cat {shard}::{toy_shards / 'shard-000001.tar'}"
    run_embed(EmbedConfig(model=tiny_ckpt, data=data, out=str(tmp_path / "e"), batch_size=16), progress=False)
    build_index(tmp_path / "e", tmp_path / "ix", BuildConfig(), progress=False)
    client = api_client(create_app(Searcher.open(tmp_path / "ix")))
    body = json.dumps(client.get("/search", params={"q": "a red circle", "k": 32}).json())
    body += json.dumps(client.post("/search", json={"queries": ["a blue square"], "k": 32}).json())
    info = client.get("/info").json()
    for secret in ("s3cr3t", "Bearer", "pipe:", "cat ", str(tmp_path), str(toy_shards)):
        assert secret not in body and secret not in json.dumps(info), secret
    sources = {h["source"] for h in client.get("/search", params={"q": "a", "k": 24}).json()["results"]}
    assert {f"private-shard.tar#g{i}" for i in range(8)} <= sources and "model" not in info
    assert all(not s.startswith("/") for s in sources)  # the others: the relative paths their json records


def test_loader_workers_survive_the_sigterm_of_a_preemption(tmp_path):
    """Schedulers send SIGTERM to the whole process group: a worker that died of it used to take the run
    down (DataLoader worker killed by signal) before the main process could checkpoint."""
    import os
    import signal

    shard = write_shard(tmp_path / "s.tar", _good(8))
    loader = _loader(tmp_path, str(shard), num_workers=1)
    it = iter(loader)
    next(it)
    for worker in loader.loader._iterator._workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(len(next(it).keys) == 2 for _ in range(6))
