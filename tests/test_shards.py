"""The shard writer: CSV/TSV/JSONL captions, manifest, skipped rows, atomic output."""

from __future__ import annotations

import json
import tarfile

import pytest

from mmpretrain.data.shards import ShardWriterConfig, load_manifest, make_shards
from tests.conftest import make_image_folder


def members(path):
    with tarfile.open(path) as tf:
        return sorted(tf.getnames())


def test_make_shards_csv(tmp_path):
    root = make_image_folder(tmp_path / "imgs", 25)
    m = make_shards(root, root / "captions.csv", tmp_path / "out", ShardWriterConfig(max_count=10), progress=False)
    assert m.samples == 25 and [s["samples"] for s in m.shards] == [10, 10, 5]
    assert m.pattern == "shard-{000000..000002}.tar"
    names = members(tmp_path / "out" / "shard-000000.tar")
    assert names[:3] == ["000000000.json", "000000000.png", "000000000.txt"]  # img2dataset layout
    assert load_manifest(tmp_path / "out").samples == 25
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*"))


def test_make_shards_jsonl_tsv_and_skips(tmp_path):
    root = make_image_folder(tmp_path / "imgs", 4)
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    rows = [
        {"image": "images/0000.png", "text": "a shape", "license": "cc0"},
        {"image": "images/0001.png", "text": "   "},
        {"image": "images/missing.png", "text": "gone"},
        {"image": "images/broken.jpg", "text": "broken"},
    ]
    (root / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = make_shards(root, root / "c.jsonl", tmp_path / "o1", progress=False)
    assert m.samples == 1 and m.skipped == {"empty_caption": 1, "missing_image": 1, "bad_image": 1}
    with tarfile.open(tmp_path / "o1" / "shard-000000.tar") as tf:
        meta = json.loads(tf.extractfile("000000000.json").read())
    assert meta == {"caption": "a shape", "source": "images/0000.png", "license": "cc0"}
    (root / "c.tsv").write_text("filepath\tcaption\nimages/0002.png\ta tab caption\n")
    assert make_shards(root, root / "c.tsv", tmp_path / "o2", progress=False).samples == 1


def test_max_bytes_rolls_over(tmp_path):
    root = make_image_folder(tmp_path / "imgs", 6)
    m = make_shards(root, root / "captions.csv", tmp_path / "out", ShardWriterConfig(max_bytes=4000), progress=False)
    assert len(m.shards) >= 2 and sum(s["samples"] for s in m.shards) == 6


def test_bad_captions_file(tmp_path):
    root = make_image_folder(tmp_path / "imgs", 2)
    (root / "c.csv").write_text("name,words\nx,y\n")
    with pytest.raises(ValueError, match="no image path column"):
        make_shards(root, root / "c.csv", tmp_path / "out", progress=False)
    (root / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="must be .csv, .tsv or .jsonl"):
        make_shards(root, root / "c.txt", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing half-written


def test_interrupted_write_leaves_no_partial_shard(tmp_path):
    root = make_image_folder(tmp_path / "imgs", 12)
    import mmpretrain.data.shards as shards

    calls = {"n": 0}
    real = shards._encode

    def flaky(path, verify):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(path, verify)

    with shards.SHARD_MEDIA.temporary("image", flaky), pytest.raises(KeyboardInterrupt):
        make_shards(root, root / "captions.csv", tmp_path / "out", ShardWriterConfig(max_count=5), progress=False)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["shard-000000.tar"]  # the finished shard only; no temp file, no manifest
