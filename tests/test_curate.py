"""Curation: near-duplicate removal and CLIP-score filtering (retrieval/jobs/curate.py), and the keep-list
applied to shards (``mmpretrain shards filter``)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrieval.jobs.curate import DedupConfig, FilterConfig, dedup, filter_items
from retrieval.jobs.embed import EmbedConfig, run_embed, write_vectors
from tests.conftest import ROOT, clustered, run_cli


def near_copies(n: int, d: int, copies: dict[int, int], seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """``n`` spread-out unit vectors, then for each ``original: count`` that many noisy copies appended."""
    rng = np.random.default_rng(seed)
    x = clustered(n, d, n // 4, seed=seed, spread=1.0)
    extra = [x[o] + noise * rng.standard_normal((c, d)) for o, c in copies.items()]
    x = np.concatenate([x, *extra]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_dedup_finds_injected_copies_exact_and_on_an_index(tmp_path):
    """Injected copies form groups with their original; exact range search and kNN on an index agree;
    the first item of each group is kept."""
    from retrieval.jobs.index import BuildConfig, build_index

    x = near_copies(400, 32, {5: 2, 17: 1, 300: 3})
    emb = write_vectors(tmp_path / "emb", x, part_size=150)
    r = dedup(emb.folder, tmp_path / "keep.parquet", DedupConfig(threshold=0.95), progress=False)
    assert r["groups"] == 3 and r["removed"] == 6 and r["group_sizes"] == {"2": 1, "3": 1, "4": 1}
    kept = pq.read_table(tmp_path / "keep.parquet")
    ids = set(kept.column("id").to_pylist())
    assert len(ids) == 400 and ids == set(range(400)) and set(kept.column("key").to_pylist()) == {str(i) for i in ids}
    assert json.loads((tmp_path / "keep.report.json").read_text())["kept"] == 400
    build_index(emb.folder, tmp_path / "ix", BuildConfig(index_type="hnsw"), progress=False)
    r2 = dedup(emb.folder, tmp_path / "k2.parquet", DedupConfig(threshold=0.95, index=str(tmp_path / "ix")))
    assert r2["group_sizes"] == r["group_sizes"] and r2["method"].startswith("index")
    assert pq.read_table(tmp_path / "k2.parquet").column("id").to_pylist() == kept.column("id").to_pylist()


def test_dedup_refuses_an_index_over_other_embeddings(tmp_path):
    from retrieval.jobs.embed import EmbedError
    from retrieval.jobs.index import BuildConfig, build_index

    a = write_vectors(tmp_path / "a", near_copies(100, 16, {}))
    b = write_vectors(tmp_path / "b", near_copies(100, 16, {}, seed=1))
    build_index(a.folder, tmp_path / "ix", BuildConfig(), progress=False)
    with pytest.raises(EmbedError, match="exactly these embeddings"):
        dedup(b.folder, tmp_path / "k.parquet", DedupConfig(index=str(tmp_path / "ix")), progress=False)


def image_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dup_shards(tmp_path_factory):
    """Two shards of 24 distinct block images with captions, plus near-duplicates of three of them:
    a JPEG re-encode at quality 60, a 5% crop, and a 2x resize. Returns (shard folder, keys of copies,
    key of the 2x resize and its original)."""
    from webdataset import TarWriter

    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(0)
    images = []  # 4 x 4 blocks of random colours: distinct to a random tiny tower as well
    for _ in range(24):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(blocks).resize((48, 48), Image.NEAREST))
    crop = images[7].crop((2, 2, 46, 46)).resize((48, 48))
    copies = {
        "jpeg": (3, image_bytes(images[3], "JPEG", quality=60), "jpg"),
        "crop": (7, image_bytes(crop), "png"),
        "resize": (11, image_bytes(images[11].resize((96, 96))), "png"),
    }
    rows = [(f"{i:04d}", image_bytes(img), "png", f"stripes number {i}") for i, img in enumerate(images)]
    rows += [(f"copy_{name}", data, ext, f"stripes number {o}") for name, (o, data, ext) in copies.items()]
    (root / "shards").mkdir()
    for s in range(2):
        with TarWriter(str(root / "shards" / f"shard-{s:06d}.tar")) as w:
            for key, data, ext, cap in rows[12 * s : 12 * s + 12] if s == 0 else rows[12:]:  # copies last
                w.write({"__key__": key, ext: data, "txt": cap, "json": json.dumps({"caption": cap})})
    return root / "shards", {f"copy_{n}": f"{o:04d}" for n, (o, _, _) in copies.items()}


@pytest.fixture(scope="module")
def dup_model(dup_shards, tmp_path_factory):
    """The tiny model trained 150 steps on the collection itself (a random tower maps every image
    close to one direction; training spreads them: distinct images <= 0.963, copies >= 0.983 here)."""
    import yaml

    from mmpretrain import api
    from tests.conftest import experiment_tree

    tmp = tmp_path_factory.mktemp("dupmodel")
    data = {"train": str(dup_shards[0] / "shard-{000000..000001}.tar"), "batch_size": 9}
    tree = experiment_tree(dup_shards[0], tmp / "run", data=data, train={"steps": 150, "ckpt_every": 1000},
                           optim={"lr": 3e-3, "warmup_steps": 2})  # fmt: skip
    (tmp / "c.yaml").write_text(yaml.safe_dump(tree))
    return str(api.train(tmp / "c.yaml") / "checkpoints")


@pytest.fixture(scope="module")
def dup_embeddings(dup_shards, dup_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dupemb") / "emb"
    run_embed(EmbedConfig(model=dup_model, data=str(dup_shards[0]), out=str(out), batch_size=8), progress=False)
    return out


def groups_of(keep_path: Path, emb_folder: Path, threshold: float) -> dict[str, int]:
    """key -> its group size, for every item (kept or not), from a fresh exact dedup."""
    from retrieval.jobs.curate import components, exact_pairs, item_table
    from retrieval.jobs.embed import load_embeddings

    emb = load_embeddings(emb_folder)

    class Bar:
        update = staticmethod(lambda n: None)

    labels = components(emb.n, *exact_pairs(emb, threshold, 64, Bar()))
    keys = item_table(emb).column("key").to_pylist()
    return {k: labels[i] for i, k in enumerate(keys)}


def test_dedup_of_shards_finds_reencoded_cropped_and_resized_copies(dup_embeddings, dup_shards, tmp_path):
    """Each injected copy lands in its original's group and nothing else is grouped; ``resolution``
    keeps the 2x resize over its original, ``first`` the original."""
    _, copies = dup_shards
    labels = groups_of(tmp_path / "k.parquet", dup_embeddings, 0.975)
    for copy, original in copies.items():
        assert labels[copy] == labels[original], copy
    grouped = {k for k in labels if sum(v == labels[k] for v in labels.values()) > 1}
    assert grouped == set(copies) | set(copies.values())
    r = dedup(dup_embeddings, tmp_path / "first.parquet", DedupConfig(threshold=0.975), progress=False)
    assert r["removed"] == 3 and r["groups"] == 3
    first = set(pq.read_table(tmp_path / "first.parquet").column("key").to_pylist())
    assert not first & set(copies) and set(copies.values()) <= first
    dedup(dup_embeddings, tmp_path / "res.parquet", DedupConfig(threshold=0.975, keep="resolution"), progress=False)
    res = pq.read_table(tmp_path / "res.parquet")
    assert "copy_resize" in res.column("key").to_pylist() and "0011" not in res.column("key").to_pylist()
    assert max(res.column("width").to_pylist()) == 96


def read_keys(folder: Path) -> dict[str, dict]:
    from mmpretrain.data.stream import ErrorCounter, read_samples

    out = {}
    for s in read_samples(sorted(str(p) for p in folder.glob("*.tar")), ErrorCounter("raise", None).handler):
        out[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return out


def test_shards_filter_keeps_exactly_the_keep_list(dup_embeddings, dup_shards, tmp_path):
    """``mmpretrain shards filter`` writes exactly the kept samples, every member byte-identical, with
    a manifest; a re-run replaces its earlier output; another non-empty folder is refused."""
    shards, copies = dup_shards
    dedup(dup_embeddings, tmp_path / "keep.parquet", DedupConfig(threshold=0.975), progress=False)
    keep = set(pq.read_table(tmp_path / "keep.parquet").column("key").to_pylist())
    out = tmp_path / "clean"
    proc = run_cli("shards", "filter", str(shards), "--keep", str(tmp_path / "keep.parquet"), "--out", str(out),
                   "--max-count", "10")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got, before = read_keys(out), read_keys(shards)
    assert set(got) == keep and len(got) == 24
    assert all(got[k] == before[k] for k in got)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 24 and manifest["skipped"]["not_kept"] == 3 and len(manifest["shards"]) == 3
    assert run_cli("shards", "filter", str(shards), "--keep", str(tmp_path / "keep.parquet"), "--out", str(out)
                   ).returncode == 0  # fmt: skip
    assert len(list(out.glob("*.tar"))) == 1  # the earlier three shards were replaced
    proc = run_cli("shards", "filter", str(shards), "--keep", str(tmp_path / "keep.parquet"), "--out", str(shards))
    assert proc.returncode == 2 and "not an earlier" in proc.stderr


def test_shards_filter_by_key_alone_and_missing_entries(dup_shards, tmp_path):
    import pyarrow as pa

    shards, _ = dup_shards
    pq.write_table(pa.table({"key": ["0001", "0004", "nope"]}), tmp_path / "k.parquet")
    proc = run_cli("shards", "filter", str(shards), "--keep", str(tmp_path / "k.parquet"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0 and "1 keep-list entries are in none" in proc.stderr
    assert set(read_keys(tmp_path / "o")) == {"0001", "0004"}


def test_filter_scores_are_clip_scores_and_thresholds_apply(dup_embeddings, dup_model, tmp_path):
    """The score is the cosine of an item's embedding and its caption's embedding under the same model;
    items below the threshold, and those matching an exclude query, leave the keep-list."""
    from mmpretrain import api
    from retrieval.jobs.curate import item_table
    from retrieval.jobs.embed import load_embeddings

    emb = load_embeddings(dup_embeddings)
    model = api.load_checkpoint(dup_model)
    captions = item_table(emb).column("caption").to_pylist()
    ref = np.einsum("ij,ij->i", emb.array(), api.encode_texts(model, captions).numpy())
    median = float(np.median(ref))
    r = filter_items(dup_embeddings, tmp_path / "keep.parquet", FilterConfig(min_score=median), progress=False)
    kept = pq.read_table(tmp_path / "keep.parquet")
    np.testing.assert_allclose(kept.column("clip_score").to_numpy(), ref[kept.column("id").to_numpy()], atol=2e-3)
    assert r["kept"] == int((ref >= median).sum()) == kept.num_rows and r["kept"] + r["below_min_score"] == 27
    assert Path(r["histogram"]).stat().st_size > 5_000
    query_sim = emb.array() @ api.encode_texts(model, ["stripes"]).numpy()[0]
    t = float(np.median(query_sim))
    r = filter_items(dup_embeddings, tmp_path / "k2.parquet",
                     FilterConfig(min_score=-1, exclude=("stripes",), exclude_threshold=t), progress=False)  # fmt: skip
    assert r["excluded"] == int((query_sim >= t).sum()) and r["kept"] == 27 - r["excluded"]


def test_filter_refuses_another_model(dup_embeddings, tmp_path, tiny_model_cfg):
    from mmpretrain import api
    from retrieval.jobs.embed import EmbedError

    other = tmp_path / "other"
    api.export_open_clip(api.create_model(tiny_model_cfg), other)
    with pytest.raises(EmbedError, match="score with the embedding model"):
        filter_items(dup_embeddings, tmp_path / "k.parquet", FilterConfig(model=f"local-dir:{other}"), progress=False)


def test_curation_clis(dup_embeddings, tmp_path):
    def retrieval(*args):
        return subprocess.run([sys.executable, "-m", "retrieval.cli", *args], cwd=ROOT, capture_output=True, text=True)

    proc = retrieval("dedup", str(dup_embeddings), "--out", str(tmp_path / "d.parquet"), "--threshold", "0.975")
    assert proc.returncode == 0 and "3 near-duplicate groups, 3 removed" in proc.stdout, proc.stderr
    proc = retrieval("filter", str(dup_embeddings), "--out", str(tmp_path / "f.parquet"), "--min-score", "-1")
    assert proc.returncode == 0 and "27 kept" in proc.stdout and (tmp_path / "f.hist.png").is_file(), proc.stderr
    proc = retrieval("dedup", str(tmp_path), "--out", str(tmp_path / "x.parquet"))
    assert proc.returncode == 2 and "not an embedding job folder" in proc.stderr
