"""Scale-out engines (``retrieval.jobs.engines``): every embed engine writes what the local job writes,
every index engine builds an index that answers as the local build does; Ray's retries survive a
killed worker (a decoding task or a model actor), and a re-run skips finished parts.

The Ray tests run on a local 2-CPU cluster that this module starts and stops (loopback only)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.jobs.embed import EMBED_ENGINES, EmbedConfig, load_embeddings, run_embed, write_vectors
from retrieval.jobs.index import FILL_ENGINES, BuildConfig, build_index, open_index
from tests.conftest import clustered

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module (started here, shut down after)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _engine_fixture(entry, request):
    if entry.make_example()["extra"] == "ray":
        request.getfixturevalue("ray_cluster")


def assert_same_embeddings(a: Path, b: Path) -> None:
    """Same ids, keys and metadata; vectors equal to float16 rounding."""
    ea, eb = load_embeddings(a), load_embeddings(b)
    assert ea.n == eb.n and ea.header["model_id"] == eb.header["model_id"]
    ma, mb = ea.meta().drop(["part"]), eb.meta().drop(["part"])
    assert ma.equals(mb)
    np.testing.assert_allclose(ea.array(), eb.array(), atol=2e-3, rtol=0)
    for pa_, pb in zip(ea.parts, eb.parts):
        assert pa_.with_suffix(".thumbs").read_bytes() == pb.with_suffix(".thumbs").read_bytes()


def _embed_engines() -> list:
    """Every embed engine; Ray's run is slow-marked, as the killed-actor run below writes and compares
    the same output through it (and the half-read run its re-run)."""
    slow = {e.name for e in EMBED_ENGINES.entries() if e.make_example()["extra"] == "ray"}
    return [
        pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name in slow else []) for e in EMBED_ENGINES.entries()
    ]


@pytest.mark.parametrize("entry", _embed_engines())
def test_every_embed_engine_writes_what_the_local_job_writes(entry, request, embedded, tiny_ckpt, toy_shards, tmp_path):
    _engine_fixture(entry, request)
    cfg = EmbedConfig(model=tiny_ckpt, data=str(toy_shards), out=str(tmp_path / "e"), batch_size=8, engine=entry.name)
    stats = run_embed(cfg, progress=False)
    assert stats["items"] == 64 and stats["embedded"] == 64 and stats["parts"] == 4 and stats["failed"] == {}
    assert_same_embeddings(embedded[0], tmp_path / "e")
    again = run_embed(cfg, progress=False)  # a re-run skips every finished part
    assert again["skipped_parts"] == 4 and again["embedded"] == 0 and again["items"] == 64


def _kill_first(title: str, seen: list[int], stop: threading.Event, after_s: float) -> None:
    """SIGKILL the first process whose title starts with ``title`` (Ray names a worker by what it
    runs: ``ray::_embed_source``, ``ray::Encoder.encode``), ``after_s`` after it is first seen."""
    first, before = None, set(_titled(title))  # not a worker of an earlier job
    while not stop.is_set() and not seen:
        for pid in _titled(title):
            if pid not in before:
                first = first or time.monotonic()
                if time.monotonic() - first >= after_s:
                    os.kill(pid, signal.SIGKILL)
                    seen.append(pid)
                break
        time.sleep(0.005)


def _titled(title: str) -> list[int]:
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").startswith(title):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("victim", [pytest.param("ray::_embed_source", marks=pytest.mark.slow), "ray::Encoder"])
def test_a_killed_ray_worker_is_retried_and_the_output_is_complete(
    victim, ray_cluster, embedded, tiny_ckpt, toy_shards, tmp_path
):
    """A decoding task's worker killed mid-source is re-run by Ray; a killed model actor is restarted
    and its calls retried. Either way every part is written once, complete, equal to the local job's."""
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_first, args=(victim, killed, stop, 0.05), daemon=True)
    watcher.start()
    cfg = EmbedConfig(model=tiny_ckpt, data=str(toy_shards), out=str(tmp_path / "e"), batch_size=2, engine="ray")
    try:
        stats = run_embed(cfg, progress=False)
    finally:
        stop.set()
        watcher.join()
    assert killed, f"no {victim} process was seen to kill"
    assert stats["failed"] == {} and stats["items"] == 64
    assert_same_embeddings(embedded[0], tmp_path / "e")


@pytest.mark.slow  # 17 s; the local job's half-read source is tested in test_retrieval
def test_ray_embed_leaves_a_half_read_source_unfinished(ray_cluster, tiny_ckpt, toy_shards, tmp_path):
    """As the local job: a truncated shard gets a .failed.json and no part, and the re-run retries only it."""
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(toy_shards, data)
    (data / "shard-000004.tar").write_bytes((data / "shard-000000.tar").read_bytes()[:3000])
    cfg = EmbedConfig(model=tiny_ckpt, data=str(data), out=str(tmp_path / "e"), batch_size=8, engine="ray")
    stats = run_embed(cfg, progress=False)
    assert list(stats["failed"]) == [str(data / "shard-000004.tar")] and stats["items"] == 64
    assert (tmp_path / "e" / "parts" / "part-00004.failed.json").is_file()
    shutil.copy(data / "shard-000000.tar", data / "shard-000004.tar")
    again = run_embed(cfg, progress=False)
    assert again["skipped_parts"] == 4 and again["embedded"] == 16 and again["failed"] == {}


@pytest.fixture(scope="module")
def clustered_job(tmp_path_factory):
    """30k x 32 clustered vectors in 7 parts (uneven), and 200 held-out queries."""
    x = clustered(30_200, 32, 200, seed=3)
    folder = tmp_path_factory.mktemp("vec") / "emb"
    write_vectors(folder, x[:30_000], part_size=4_500)
    return folder, np.ascontiguousarray(x[30_000:])


def assert_same_answers(a, b, q: np.ndarray) -> None:
    """The same top-10 scores, and the same ids except among equal scores."""
    da, ia = a.index.search(q, 10)
    db, ib = b.index.search(q, 10)
    np.testing.assert_allclose(da, db, atol=1e-5)
    for row in range(len(q)):
        differ = ia[row] != ib[row]
        for j in np.nonzero(differ)[0]:  # a swap is fine where the scores tie
            assert np.isclose(da[row], da[row, j], atol=1e-5).sum() > 1, (row, j)


CASES = [
    ("ivf_flat", False),
    ("ivf_flat", True),
    ("ivf_pq", True),
    ("ivf_sq8", False),
    ("ivf_sq8", True),
    ("ivf_pq_refine", False),
    ("ivf_pqfs_refine", False),
    ("ivf_rabitq_refine", False),
]


@pytest.mark.parametrize("entry", FILL_ENGINES.entries(), ids=FILL_ENGINES.names())
@pytest.mark.parametrize("index_type, on_disk", CASES, ids=[f"{t}{'-on_disk' if d else ''}" for t, d in CASES])
def test_every_index_engine_answers_as_the_local_build(entry, index_type, on_disk, request, clustered_job, tmp_path):
    _engine_fixture(entry, request)
    folder, q = clustered_job
    common = {"index_type": index_type, "on_disk": on_disk, "queries": 200, "tune_seconds": 0}
    local = build_index(folder, tmp_path / "local", BuildConfig(**common), progress=False)
    other = build_index(folder, tmp_path / "other", BuildConfig(**common, engine=entry.name), progress=False)
    assert other["ntotal"] == local["ntotal"] == 30_000
    assert (other["knob_value"], other["recall@10"]) == (local["knob_value"], local["recall@10"])
    assert not list((tmp_path / "other").glob("piece-*"))  # the pieces are merged and removed
    assert_same_answers(open_index(tmp_path / "local"), open_index(tmp_path / "other"), q)


SHARDED = ["ivf_sq8", "ivf_rabitq_refine", "hnsw"]


@pytest.mark.parametrize("entry", FILL_ENGINES.entries(), ids=FILL_ENGINES.names())
@pytest.mark.parametrize("index_type", SHARDED)
def test_a_sharded_index_is_searched_as_one(entry, index_type, request, clustered_job, tmp_path):
    """--shards 3: three shard files over consecutive parts, no merged index, the collection's ids;
    an IVF index answers as its merged build (the shards share the trained quantizer), any type
    reaches the recall target or the merged build's recall; the files are checksummed, and adding to it is refused."""
    from retrieval.jobs.index import IndexError_, add_to_index

    _engine_fixture(entry, request)
    folder, q = clustered_job
    common = {"index_type": index_type, "queries": 200, "tune_seconds": 0}
    merged = build_index(folder, tmp_path / "merged", BuildConfig(**common), progress=False)
    h = build_index(folder, tmp_path / "sharded", BuildConfig(**common, shards=3, engine=entry.name), progress=False)
    assert h["shard_files"] == ["shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss"]
    assert not (tmp_path / "sharded" / "index.faiss").exists() and not list((tmp_path / "sharded").glob("piece-*"))
    assert h["ntotal"] == 30_000 and h["recall@10"] >= min(0.95, merged["recall@10"] - 0.01)  # SQ8 tops out low at d=32
    loaded = open_index(tmp_path / "sharded")
    assert [loaded.index.at(i).ntotal for i in range(3)] == [13_500, 9_000, 7_500]  # runs of 3, 2, 2 parts
    if index_type == "ivf_sq8":
        assert (h["knob_value"], h["recall@10"]) == (merged["knob_value"], merged["recall@10"])
        assert_same_answers(open_index(tmp_path / "merged"), loaded, q)
    _, ids = loaded.index.search(q, 10)
    assert ids.min() >= 0 and ids.max() < 30_000
    with pytest.raises(IndexError_, match="sharded index is not supported"):
        add_to_index(tmp_path / "sharded", folder, progress=False)
    shard = tmp_path / "sharded" / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IndexError_, match="shard-00001.faiss is corrupt"):
        open_index(tmp_path / "sharded")


def test_shards_and_on_disk_are_exclusive():
    from retrieval.jobs.index import IndexError_

    with pytest.raises(IndexError_, match="--on-disk or --shards"):
        BuildConfig(shards=2, on_disk=True)
    with pytest.raises(IndexError_, match="shards must be >= 1"):
        BuildConfig(shards=0)


def test_the_ray_engine_fills_graphs_and_exact_search_itself(ray_cluster, clustered_job, tmp_path):
    folder, q = clustered_job
    h = build_index(folder, tmp_path / "ix", BuildConfig(index_type="hnsw", engine="ray", queries=100), progress=False)
    assert h["ntotal"] == 30_000 and h["recall@10"] >= 0.95


def test_engines_fail_fast_on_unknown_names():
    from retrieval.jobs.embed import EmbedError
    from retrieval.jobs.index import IndexError_

    with pytest.raises(EmbedError, match="engine 'sparkk': one of local, ray"):
        EmbedConfig(model="m", data="d", out="o", engine="sparkk")
    with pytest.raises(IndexError_, match="engine 'sparkk'"):
        BuildConfig(engine="sparkk")
