"""The emoji corpus builder on a committed fixture (12 concepts, 3 styles), without npm or apt."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile

import pytest
from PIL import Image

from mmpretrain.corpora import CorpusError, base, emoji
from mmpretrain.corpora.emoji import EmojiCorpusConfig, build_emoji_corpus
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "emoji"
SOURCES = {name: FIXTURE / name for name in ("emojibase", "noto", "twemoji", "noto-v1")}
CFG = EmojiCorpusConfig(
    train_styles=("noto",),
    rendition_styles=("twemoji",),
    sketch_styles=("noto-v1",),
    concepts=None,
    unseen_fraction=0.25,
    size=32,
    rasterizer="stub",
    shard_count=5,
)
pytestmark = pytest.mark.usefixtures("raster_calls")


def test_build_from_fixture(tmp_path, raster_calls):
    m = build_emoji_corpus(CFG, tmp_path / "cache", tmp_path / "out", sources=SOURCES)
    assert len(m["concepts"]["seen"]) == 9 and len(m["concepts"]["unseen"]) == 3  # the flag was dropped
    assert not set(m["concepts"]["seen"]) & set(m["concepts"]["unseen"])
    groups = {f"groups_{split}": 9 for split in ("train_styles_seen", "rendition", "sketch")}
    assert m["counts"] == {
        "train_shards": 9,
        **{"train_styles_seen": 9, "rendition": 9, "sketch": 9, "unseen_concepts": 3},
        **groups,
    }
    assert m["sources"]["noto"] == {"name": "@iconify-json/noto", "version": "1.2.9", "license": "Apache-2.0"}
    assert m["sources"]["emojibase"]["license"] == "MIT"
    assert len(raster_calls) == 36  # 12 concepts x 3 styles
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text())["counts"] == m["counts"]
    unseen_folders = sorted(p.name for p in (out / "eval" / "unseen_concepts").iterdir())
    assert [f.replace("_", " ") for f in unseen_folders] == sorted(m["concepts"]["unseen"])
    # the coarse task: the seen concepts' images again, by Unicode emoji group
    by_group = {p.parent.name for p in (out / "eval" / "groups_train_styles_seen").glob("*/*.png")}
    assert by_group <= {"smileys_and_emotion", "animals_and_nature", "food_and_drink", "travel_and_places", "objects"}
    assert len(by_group) >= 3
    # the shards hold captions that name the concept
    from mmpretrain.data.shards import load_manifest

    shard_manifest = load_manifest(out / "shards")
    assert shard_manifest.samples == 9 and len(shard_manifest.shards) == 2
    rows = (out / "train_images" / "captions.csv").read_text().splitlines()[1:]
    labels = {c.lower() for c in m["concepts"]["seen"]}
    assert all(any(label in row.lower() for label in labels) for row in rows)


def test_rebuild_reuses_the_raster_cache(tmp_path, raster_calls):
    build_emoji_corpus(CFG, tmp_path / "cache", tmp_path / "out", sources=SOURCES)
    raster_calls.clear()
    build_emoji_corpus(CFG, tmp_path / "cache", tmp_path / "out", sources=SOURCES)
    assert raster_calls == []


def test_eval_splits_feed_the_evaluator(tmp_path, tiny_model_cfg):
    from mmpretrain import api
    from mmpretrain.eval.runner import EvalSet, zeroshot_eval

    build_emoji_corpus(CFG, tmp_path / "cache", tmp_path / "out", sources=SOURCES)
    r = zeroshot_eval(
        api.create_model(tiny_model_cfg),
        EvalSet.parse(f"unseen@folder={tmp_path}/out/eval/unseen_concepts"),
        templates="a <> emoji",
        progress=False,
    )
    assert r["n"] == 3 and r["classes"] == 3


def test_missing_tools_fail_with_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="apt-get install librsvg2-bin"):
        base.rsvg("<svg/>", tmp_path / "x.png", 8)
    with pytest.raises(CorpusError, match="install Node.js and npm"):
        emoji.fetch_npm("@iconify-json/noto", tmp_path)


@pytest.mark.skipif(
    shutil.which("rsvg-convert") is None,
    reason="rsvg-convert not installed (make test installs it: apt-get install librsvg2-bin)",
)
def test_rsvg_renders_a_real_icon(tmp_path):
    style = emoji.load_style("noto", FIXTURE / "noto")
    base.rsvg(style.svgs["dog-face"], tmp_path / "dog.png", 64)
    img = Image.open(tmp_path / "dog.png").convert("RGB")
    assert img.size == (64, 64) and len(img.getcolors(maxcolors=1 << 16)) > 20  # a drawing, not a blank


def test_every_npm_package_of_the_default_corpus_is_pinned():
    cfg = EmojiCorpusConfig()
    styles = cfg.train_styles + cfg.rendition_styles + cfg.sketch_styles
    wanted = {"emojibase-data", *(f"@iconify-json/{s}" for s in styles)}
    assert wanted <= set(emoji.NPM_PINS)
    for version, digest in emoji.NPM_PINS.values():
        assert version[0].isdigit() and digest.startswith("sha512-") and len(digest) == 95


def _fake_npm(tmp_path, monkeypatch, tarball: bytes) -> list:
    """An ``npm`` on PATH whose ``pack`` writes ``tarball``; returns the argv it was called with."""
    (tmp_path / "served.tgz").write_bytes(tarball)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "npm").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nfor a; do d="$a"; done\ncp {tmp_path}/served.tgz "$d/x-1.0.0.tgz"\n'
    )
    (bin_ / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    return tmp_path / "calls"


def _tarball(tmp_path, version: str) -> bytes:
    pkg = tmp_path / "src" / "package"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "x", "version": version}))
    with tarfile.open(tmp_path / "x.tgz", "w:gz") as tf:
        tf.add(pkg, arcname="package")
    return (tmp_path / "x.tgz").read_bytes()


def test_npm_packages_are_fetched_at_their_pinned_version_and_integrity(tmp_path, monkeypatch):
    good = _tarball(tmp_path, "1.0.0")
    calls = _fake_npm(tmp_path, monkeypatch, good)
    pins = {"x": ("1.0.0", "sha512-" + base64.b64encode(hashlib.sha512(good).digest()).decode())}
    folder = emoji.fetch_npm("x", tmp_path / "cache", pins)
    assert json.loads((folder / "package.json").read_text())["version"] == "1.0.0"
    assert calls.read_text().split()[:2] == ["pack", "x@1.0.0"]
    emoji.fetch_npm("x", tmp_path / "cache", pins)  # cached and checked: npm is not called again
    assert len(calls.read_text().splitlines()) == 1
    (tmp_path / "served.tgz").write_bytes(good + b"tampered")  # the registry now serves other bytes
    with pytest.raises(CorpusError, match="x@2.0.0: the tarball's integrity is sha512-.*not the pinned"):
        emoji.fetch_npm("x", tmp_path / "cache", {"x": ("2.0.0", pins["x"][1])})
    with pytest.raises(CorpusError, match="y has no pin: add its version and integrity to emoji.NPM_PINS"):
        emoji.fetch_npm("y", tmp_path / "cache", pins)
