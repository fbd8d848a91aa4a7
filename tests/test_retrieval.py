"""Embedding jobs, index building/choice/tuning, atomic + checked index files, Searcher."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from retrieval.jobs import embed as embed_mod
from retrieval.jobs.embed import EmbedConfig, EmbedError, load_embeddings, run_embed, write_vectors
from retrieval.jobs.index import (
    BLAS_FROM_QUERIES,
    INDEX_TYPES,
    BuildConfig,
    IndexError_,
    add_to_index,
    build_index,
    candidate_specs,
    choose_index,
    open_index,
    recall_at_k,
)
from retrieval.jobs.search import QueryError, Searcher
from tests.conftest import TINY_MODEL, clustered, write_shard


def test_embed_job_writes_parts_metadata_and_thumbnails(embedded):
    out, stats = embedded
    assert stats["items"] == 64 and stats["parts"] == 4 and stats["bad"] == {}
    emb = load_embeddings(out)
    assert emb.n == 64 and emb.dim == 32 and len(emb.parts) == 4
    v = emb.array()
    assert v.shape == (64, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=2e-3)  # float16 storage
    meta = emb.meta().to_pylist()
    assert meta[0]["caption"].startswith("a ") and meta[0]["modality"] == "image" and meta[0]["thumb_len"] > 100
    assert json.loads((out / "embeddings.json").read_text())["dtype"] == "float16"


def test_embed_rerun_skips_finished_parts_and_redoes_missing_ones(embedded, tiny_ckpt, toy_shards, monkeypatch):
    out, _ = embedded
    before = load_embeddings(out).array()
    calls = []
    real = embed_mod.embed_part
    monkeypatch.setattr(embed_mod, "embed_part", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    (out / "parts" / "part-00002.parquet").unlink()  # as if killed while writing part 2
    with pytest.raises(EmbedError, match="1 of 4 parts are not embedded"):
        load_embeddings(out)
    stats = run_embed(EmbedConfig(model=tiny_ckpt, data=str(toy_shards), out=str(out), batch_size=8), progress=False)
    assert len(calls) == 1 and calls[0].endswith("shard-000002.tar") and stats["skipped_parts"] == 3
    assert np.array_equal(load_embeddings(out).array(), before)


def test_embed_ranks_split_the_sources(tiny_ckpt, toy_shards, tmp_path, monkeypatch):
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stats = run_embed(
            EmbedConfig(model=tiny_ckpt, data=str(toy_shards), out=str(tmp_path / "e"), batch_size=8), progress=False
        )
        assert stats["parts"] == 2 and stats["items"] == 32
    assert load_embeddings(tmp_path / "e").n == 64


def test_embed_skips_bad_images_but_never_marks_a_half_read_shard_done(tiny_ckpt, toy_shards, tmp_path):
    """A truncated shard gets no part (today's bug: its part was written, so re-runs skipped it forever and
    its skip counts were lost); unreadable images are counted in their part; a re-run retries only it."""
    from tests.conftest import png_bytes

    data = tmp_path / "shards"
    shutil.copytree(toy_shards, data)
    write_shard(
        data / "shard-000004.tar",
        [{"__key__": "ok", "png": png_bytes(), "txt": "red"}, {"__key__": "bad", "png": b"not a png", "txt": "broken"}],
    )
    (data / "shard-000005.tar").write_bytes((data / "shard-000000.tar").read_bytes()[:3000])  # truncated
    cfg = EmbedConfig(model=tiny_ckpt, data=str(data), out=str(tmp_path / "e"), batch_size=8)
    stats = run_embed(cfg, progress=False)
    assert stats["bad"] == {"bad_image": 1} and stats["items"] == 65
    assert list(stats["failed"]) == [str(data / "shard-000005.tar")]
    assert stats["failed"][str(data / "shard-000005.tar")].get("corrupt_shard") == 1
    parts = tmp_path / "e" / "parts"
    assert not (parts / "part-00005.parquet").exists() and (parts / "part-00005.failed.json").is_file()
    assert embed_mod.part_summary(parts / "part-00004")["skipped"] == {"bad_image": 1}  # stored with the part
    with pytest.raises(EmbedError, match="could not be read to their end"):
        load_embeddings(tmp_path / "e")
    assert load_embeddings(tmp_path / "e", allow_partial=True).n == 65

    shutil.copy(data / "shard-000000.tar", data / "shard-000005.tar")  # the store recovers: a re-run retries it
    again = run_embed(cfg, progress=False)
    assert again["failed"] == {} and again["skipped_parts"] == 5 and again["bad"] == {"bad_image": 1}
    assert load_embeddings(tmp_path / "e").n == 65 + 16 and not (parts / "part-00005.failed.json").exists()


def test_embed_strict_stops_at_the_first_skip(tiny_ckpt, toy_shards, tmp_path):
    from tests.conftest import png_bytes

    data = tmp_path / "shards"
    data.mkdir()
    write_shard(
        data / "shard-000000.tar",
        [{"__key__": "ok", "png": png_bytes(), "txt": "red"}, {"__key__": "bad", "png": b"not a png", "txt": "broken"}],
    )
    with pytest.raises(EmbedError, match="bad_image.*--strict"):
        run_embed(EmbedConfig(model=tiny_ckpt, data=str(data), out=str(tmp_path / "e"), strict=True), progress=False)
    assert not list((tmp_path / "e" / "parts").glob("*.parquet"))


def test_embed_refuses_another_model_in_the_same_folder(embedded, toy_shards, tmp_path):
    from mmpretrain import api
    from mmpretrain.training.validate import experiment_from_tree

    other = tmp_path / "other"
    api.export_open_clip(api.create_model(experiment_from_tree({"model": TINY_MODEL}).model), other)
    with pytest.raises(EmbedError, match="different model_id"):
        run_embed(EmbedConfig(model=f"local-dir:{other}", data=str(toy_shards), out=str(embedded[0])), progress=False)


@pytest.mark.parametrize("entry", INDEX_TYPES.entries(), ids=INDEX_TYPES.names())
def test_every_index_type_builds_and_reaches_its_recall(entry, tmp_path):
    """Generated from the registry: each index type's example names the recall@10 it must reach on
    clustered vectors and how often an item must find itself (PQ at d=32 keeps 4 bytes a vector)."""
    ex = entry.make_example()
    emb = write_vectors(tmp_path / "v", clustered(ex["n"], ex["d"], 200))
    h = build_index(
        tmp_path / "v", tmp_path / "ix", BuildConfig(index_type=entry.name, queries=200, tune_seconds=0), progress=False
    )
    assert h["ntotal"] == emb.n and h["recall@10"] >= ex["recall_floor"], h["tuning"]
    loaded = open_index(tmp_path / "ix")
    q = emb.take(np.arange(5))
    found = loaded.index.search(q, 10)[1]
    assert (found == np.arange(5)[:, None]).any(1).mean() >= ex["self_hit"]  # items find themselves


def test_choice_follows_size_and_memory_budget():
    gb = 2**30
    assert choose_index(5_000, 512, BuildConfig()).type == "flat"
    assert choose_index(100_000, 512, BuildConfig()).type == "hnsw"
    assert choose_index(1_000_000, 512, BuildConfig(memory_bytes=int(2.5 * gb))).type == "ivf_flat"
    big = [s.type for s in candidate_specs(1_000_000, 512, BuildConfig(memory_bytes=int(2.5 * gb)))]
    assert big == ["ivf_flat", "ivf_sq8", "ivf_pqfs_refine", "flat"]  # measured side by side (exact search too)
    assert choose_index(1_000_000, 512, BuildConfig(memory_bytes=1 * gb)).type == "ivf_sq8"
    compressed = [s.type for s in candidate_specs(1_000_000, 512, BuildConfig(memory_bytes=1 * gb))]
    assert compressed == ["ivf_sq8", "ivf_rabitq_refine", "ivf_pqfs_refine"]  # the fastest at the target is kept
    # the re-ranked shortlists hold IVF-SQ8's codes and more: measured only when they fit as well
    tight = BuildConfig(memory_bytes=int(0.53 * gb))
    assert [s.type for s in candidate_specs(1_000_000, 512, tight)] == ["ivf_sq8"]
    assert choose_index(10_000_000, 512, BuildConfig(memory_bytes=1 * gb)).type == "ivf_pq"
    with pytest.raises(IndexError_, match="fits"):
        choose_index(100_000_000, 512, BuildConfig(memory_bytes=1 * gb))
    assert choose_index(1_000_000, 512, BuildConfig(on_disk=True, memory_bytes=1 * gb)).type == "ivf_flat"
    spec = choose_index(1_000_000, 512, BuildConfig(memory_bytes=1 * gb))
    assert spec.factory == "IVF4096,SQ8" and spec.memory_bytes < 0.5 * gb
    for name in ("ivf_rabitq_refine", "ivf_pqfs_refine", "ivf_pq_refine"):
        assert INDEX_TYPES.get(name).builder(1_000_000, 512).memory_bytes > spec.memory_bytes
    rabitq = INDEX_TYPES.get("ivf_rabitq_refine").builder(1_000_000, 512)
    assert rabitq.factory == "IVF4096,RaBitQ,Refine(SQ8)" and rabitq.memory_bytes < 0.6 * gb
    fastscan = INDEX_TYPES.get("ivf_pqfs_refine").builder(1_000_000, 512)
    assert fastscan.factory == "IVF4096,PQ128x4fsr,Refine(SQ8)" and fastscan.memory_bytes < 0.6 * gb


def test_candidates_are_measured_and_the_fastest_at_the_target_kept(tmp_path):
    write_vectors(tmp_path / "v", clustered(5_000, 32, 50))
    h = build_index(tmp_path / "v", tmp_path / "ix", BuildConfig(flat_below=1_000, queries=200), progress=False)
    considered = {c["type"]: c for c in h["considered"]}
    assert set(considered) == {"hnsw", "ivf_flat", "flat"}
    reached = [c for c in considered.values() if c["recall@10"] >= 0.95]
    assert reached and h["spec"]["type"] == max(reached, key=lambda c: c["qps"])["type"]
    assert h["recall@10"] >= 0.95
    # isotropic vectors: nothing approximate reaches the target quickly; exact search must win or be close
    write_vectors(tmp_path / "iso", np.random.default_rng(0).standard_normal((5_000, 64)).astype(np.float32))
    h = build_index(tmp_path / "iso", tmp_path / "ix2", BuildConfig(flat_below=1_000, queries=200), progress=False)
    assert h["recall@10"] >= 0.95 and {c["type"] for c in h["considered"]} == {"hnsw", "ivf_flat", "flat"}


def test_on_disk_index_matches_the_in_ram_one(tmp_path):
    write_vectors(tmp_path / "v", clustered(6_000, 32, 50), part_size=1_500)  # 4 parts, built piece by piece
    cfg = dict(index_type="ivf_flat", queries=100)
    ram = build_index(tmp_path / "v", tmp_path / "ram", BuildConfig(**cfg), progress=False)
    disk = build_index(tmp_path / "v", tmp_path / "disk", BuildConfig(**cfg, on_disk=True), progress=False)
    assert (tmp_path / "disk" / "index.ivfdata").stat().st_size > 0 and disk["on_disk"]
    q = clustered(50, 32, 50, seed=3)
    a, b = open_index(tmp_path / "ram").index, open_index(tmp_path / "disk").index
    assert np.array_equal(a.search(q, 10)[1], b.search(q, 10)[1]) and ram["knob_value"] == disk["knob_value"]


def test_an_opened_index_searches_micro_batches_with_blas_and_the_same_results(tmp_path):
    """A service's batches of 16-64 queries take FAISS's BLAS path once an index is opened (FAISS 1.15
    otherwise computes exact distances query by query below ~512 queries): the same neighbours."""
    write_vectors(tmp_path / "v", clustered(25_000, 32, 50), part_size=25_000)
    build_index(tmp_path / "v", tmp_path / "i", BuildConfig(index_type="flat", queries=50), progress=False)
    q = clustered(64, 32, 50, seed=4)
    faiss.cvar.distance_compute_blas_threshold = 128_000
    before = faiss.read_index(str(tmp_path / "i" / "index.faiss")).search(q, 10)[1]
    index = open_index(tmp_path / "i").index
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_FROM_QUERIES <= 64
    assert (index.search(q, 10)[1] == before).mean() > 0.99  # ties may order differently


def test_corrupt_or_foreign_index_files_fail_clearly(tmp_path):
    write_vectors(tmp_path / "v", clustered(1_000, 16, 10))
    build_index(tmp_path / "v", tmp_path / "ix", BuildConfig(), progress=False)
    data = bytearray((tmp_path / "ix" / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ix" / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexError_, match="corrupt"):
        open_index(tmp_path / "ix")
    (tmp_path / "ix" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexError_, match="cannot be read"):
        open_index(tmp_path / "ix", verify=False)
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    (tmp_path / "ix" / "index.json").write_text(json.dumps({**header, "format": "mmpretrain-index/0"}))
    with pytest.raises(IndexError_, match="format"):
        open_index(tmp_path / "ix")
    with pytest.raises(IndexError_, match="not an index folder"):
        open_index(tmp_path)


def test_failed_build_leaves_the_old_index(tmp_path, monkeypatch):
    from retrieval.jobs import index as index_mod

    write_vectors(tmp_path / "v", clustered(1_000, 16, 10))
    build_index(tmp_path / "v", tmp_path / "ix", BuildConfig(), progress=False)
    before = (tmp_path / "ix" / "index.json").read_text()
    monkeypatch.setattr(index_mod, "write_index_folder", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_index(tmp_path / "v", tmp_path / "ix", BuildConfig(), progress=False)
    assert (tmp_path / "ix" / "index.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == sorted(["v", "ix"]) or set(p.name for p in tmp_path.iterdir()) == {
        "v",
        "ix",
    }


def test_incremental_add(tmp_path):
    x = clustered(3_000, 16, 20)
    write_vectors(tmp_path / "a", x[:2_000], model_id="m1")
    write_vectors(tmp_path / "b", x[2_000:], model_id="m1", keys=[f"b{i}" for i in range(1_000)])
    write_vectors(tmp_path / "c", x[:10], model_id="m2")
    build_index(tmp_path / "a", tmp_path / "ix", BuildConfig(), progress=False)
    h = add_to_index(tmp_path / "ix", tmp_path / "b")
    loaded = open_index(tmp_path / "ix")
    assert h["ntotal"] == loaded.ntotal == 3_000 and loaded.meta.column("key")[2_500].as_py() == "b500"
    assert loaded.index.search(x[2_500:2_501], 1)[1][0, 0] == 2_500
    with pytest.raises(IndexError_, match="already in the index"):
        add_to_index(tmp_path / "ix", tmp_path / "b")
    with pytest.raises(IndexError_, match="model m2"):
        add_to_index(tmp_path / "ix", tmp_path / "c")


def test_recall_at_k():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3) == pytest.approx(2 / 3)


def test_searcher_text_and_image_queries(embedded, tiny_ckpt, tmp_path):
    from mmpretrain import api

    build_index(embedded[0], tmp_path / "ix", BuildConfig(), progress=False)
    s = Searcher.open(tmp_path / "ix")  # the model recorded in the index
    hits = s.search(["a red circle", "a blue square"], k=5)
    assert len(hits) == 2 and [h.rank for h in hits[0]] == list(range(5))
    assert hits[0][0].score >= hits[0][-1].score and hits[0][0].caption and hits[0][0].source
    emb = load_embeddings(embedded[0])
    image_hits = s.search_embeddings(emb.take(np.array([7])), k=1)
    assert image_hits[0][0].id == 7 and s.thumbnail(7)[:2] == b"\xff\xd8"  # a JPEG
    for bad, match in (("", "empty"), ("x" * 600, "longer"), (b"\xff\xfe", "UTF-8")):
        with pytest.raises(QueryError, match=match):
            s.search(bad)
    with pytest.raises(QueryError, match="k must be"):
        s.search("a", k=10_000)
    other = api.create_model(s.model.cfg)  # same architecture, other weights
    with pytest.raises(IndexError_, match="not by this model"):
        Searcher(other, tmp_path / "ix")


def test_an_index_and_its_embeddings_move_together(embedded, tmp_path):
    """The index stores the embedding folder and parts relative to itself: moved together, thumbnails
    and stored vectors still come from the embedding parts."""
    import shutil

    shutil.copytree(embedded[0], tmp_path / "a" / "emb")
    build_index(tmp_path / "a" / "emb", tmp_path / "a" / "ix", BuildConfig(index_type="flat"), progress=False)
    header = json.loads((tmp_path / "a" / "ix" / "index.json").read_text())
    assert header["embeddings"] == ["../emb"]
    shutil.move(tmp_path / "a", tmp_path / "b")
    s = Searcher.open(tmp_path / "b" / "ix")
    assert s.thumbnail(7)[:2] == b"\xff\xd8"
    np.testing.assert_array_equal(s.vectors(np.array([3])), load_embeddings(tmp_path / "b" / "emb").take(np.array([3])))
    assert s._embeddings, "vectors came from FAISS, not the moved embedding folder"


def test_a_relative_model_path_is_stored_absolute(tmp_path, monkeypatch):
    """``retrieval embed --model runs/x`` from one directory, searched from another: the header holds
    the absolute path (``local-dir:`` kept), a model name as given."""
    from retrieval.jobs.embed import stored_model_ref

    (tmp_path / "runs" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert stored_model_ref("runs/x") == str(tmp_path / "runs" / "x")
    assert stored_model_ref("local-dir:runs/x") == f"local-dir:{tmp_path / 'runs' / 'x'}"
    assert stored_model_ref("ViT-B-32") == "ViT-B-32"


def test_an_unchanged_index_is_not_rehashed_on_open_and_a_changed_file_still_is(tmp_path, monkeypatch):
    """Opening checks every file's sha256 once; later opens of files unchanged since (size, mtime, inode)
    only stat them; a file written since is hashed again and a corruption found."""
    from mmpretrain import api as mm_api
    from retrieval.jobs import checksums

    write_vectors(tmp_path / "v", clustered(2_000, 16, 10))
    build_index(tmp_path / "v", tmp_path / "ix", BuildConfig(queries=50), progress=False)
    hashed = []
    real = mm_api.files.sha256_file
    monkeypatch.setattr(checksums.api.files, "sha256_file", lambda p: hashed.append(p) or real(p))
    open_index(tmp_path / "ix")
    first = len(hashed)
    assert first >= 1 and (tmp_path / "ix" / checksums.VERIFIED).is_file()
    open_index(tmp_path / "ix")
    assert len(hashed) == first  # nothing read again
    target = tmp_path / "ix" / "index.faiss"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IndexError_, match="index.faiss is corrupt"):
        open_index(tmp_path / "ix")


def test_no_verify_trusts_the_files_of_a_read_only_index(search_index, tmp_path, capsys):
    """`--no-verify` opens an index without hashing its files (a big index in a read-only folder keeps no
    record of its last check); by default a file that does not match its recorded sha256 is refused."""
    import shutil

    from retrieval.cli import main as retrieval_main

    ix = tmp_path / "ix"
    shutil.copytree(search_index, ix)
    meta = ix / "meta.parquet"
    header = json.loads((ix / "index.json").read_text())
    header["checksums"]["meta.parquet"] = "0" * 64  # as if the file had rotted since it was recorded
    (ix / "index.json").write_text(json.dumps(header))
    (ix / ".verified.json").unlink(missing_ok=True)
    assert retrieval_main(["search", str(ix), "--info"]) == 2
    assert "meta.parquet is corrupt" in capsys.readouterr().err
    assert retrieval_main(["search", str(ix), "--info", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["ntotal"] == 64
    meta.unlink()
    assert retrieval_main(["search", str(ix), "--info", "--no-verify"]) == 2  # still there, or refused
    assert "meta.parquet is missing" in capsys.readouterr().err
