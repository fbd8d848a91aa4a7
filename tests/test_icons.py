"""The icon-theme corpus builder on fake themes made from six committed Tango SVGs (no apt),
and the hard subset (ImageNet-A analogue) built from a reference model's mistakes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain.corpora import CORPORA, CorpusError, icons
from mmpretrain.corpora.icons import IconCorpusConfig, build_icon_corpus, index_theme, merge_aliases
from tests.conftest import ROOT

TANGO = ROOT / "tests" / "fixtures" / "icons" / "tango"
CFG = IconCorpusConfig(
    families={"a": ("ThemeA",), "b": ("ThemeB", "ThemeB2"), "r": ("ThemeR",)},
    rendition_families=("r",),
    min_train_themes=2,
    unseen_fraction=0.2,
    size=32,
    rasterizer="stub",
    shard_count=4,
)


def _put(theme: Path, rel: str, src: str) -> None:
    path = theme / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TANGO / f"{src}.svg", path)


def _link(theme: Path, rel: str, target: str) -> None:
    path = theme / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def fake_themes(root: Path) -> Path:
    """Four themes in three folder layouts; ThemeB2 is a near-copy of ThemeB (same family)."""
    icons_dir = root / "usr" / "share" / "icons"
    a, b, b2, r = (icons_dir / n for n in ("ThemeA", "ThemeB", "ThemeB2", "ThemeR"))
    for name, src, ctx in (
        ("printer", "printer", "devices"),
        ("computer", "computer", "devices"),
        ("computer-laptop", "camera-photo", "devices"),
        ("user-trash", "user-trash", "places"),
        ("folder", "folder", "places"),
        ("battery-caution", "battery-caution", "status"),
    ):
        _put(a, f"scalable/{ctx}/{name}.svg", src)  # <size>/<context>/
        _put(b, f"{ctx}/64/{name}.svg", src)  # <context>/<size>/
        _put(b2, f"48x48/{ctx}/{name}.svg", src)
    _put(a, "16x16/devices/printer.svg", "computer")  # a smaller size loses to scalable
    _put(a, "scalable/mimetypes/text-x-generic.svg", "folder")  # not a kept context
    _put(a, "symbolic/devices/printer-symbolic.svg", "printer")
    _put(b, "devices/64/printer-rtl.svg", "printer")  # mirrored variant: dropped
    _link(b, "devices/64/printer-laser.svg", "printer.svg")  # an alias nobody draws apart: merged
    _link(r, "devices/48/computer-laptop.svg", "computer.svg")  # reuse of a picture: not merged
    _put(r, "devices/48/computer.svg", "computer")
    _put(r, "devices/48/printer.svg", "printer")
    _put(r, "places/48/folder.svg", "folder")
    doc = root / "usr" / "share" / "doc" / "tango-icon-theme"
    doc.mkdir(parents=True)
    shutil.copyfile(TANGO / "COPYRIGHT", doc / "copyright")
    return root


def test_index_picks_the_largest_file_per_name_and_records_links(tmp_path):
    root = fake_themes(tmp_path) / "usr" / "share" / "icons"
    a = index_theme(root / "ThemeA", CFG.contexts)
    assert a.regular["printer"].parts[-3] == "scalable" and "text-x-generic" not in a.regular
    assert set(a.symbolic) == {"printer"}
    b = index_theme(root / "ThemeB", CFG.contexts)
    assert ("printer-laser", "printer") in b.links and "printer-rtl" not in b.regular
    themes = [index_theme(root / t, CFG.contexts) for t in ("ThemeA", "ThemeB", "ThemeB2", "ThemeR")]
    canon = merge_aliases(themes, {n for t in themes for n in t.regular})
    assert canon["printer-laser"] == "printer"
    assert canon["computer-laptop"] == "computer-laptop"  # three themes draw it apart, one links it


def test_build_from_fake_themes(tmp_path, raster_calls):
    fake_themes(tmp_path / "src")
    m = build_icon_corpus(CFG, tmp_path / "cache", tmp_path / "out", roots={"tango-icon-theme": tmp_path / "src"})
    assert m["styles"]["train"] == ["ThemeA", "ThemeB", "ThemeB2"] and m["styles"]["rendition"] == ["ThemeR"]
    assert m["styles"]["sketch"] == ["ThemeA-symbolic"]
    seen, unseen = m["concepts"]["seen"], m["concepts"]["unseen"]
    assert len(seen) + len(unseen) == 6 and len(unseen) == 1 and not set(seen) & set(unseen)
    assert "printer laser" not in seen + unseen and "computer laptop" in seen + unseen
    assert m["sources"]["tango-icon-theme"]["license"] == "public-domain"
    c = m["counts"]
    assert c["train_shards"] == c["train_styles_seen"] == 3 * len(seen)
    assert c["unseen_concepts"] == 3
    out = tmp_path / "out" / "eval"
    assert sorted(p.name for p in (out / "rendition").iterdir()) == sorted(
        x.replace(" ", "_") for x in ("computer", "computer laptop", "printer", "folder") if x in seen
    )
    if "printer" in seen:
        assert [p.name for p in (out / "sketch" / "printer").iterdir()] == ["ThemeA-symbolic.png"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"] == c
    # cached: the rebuild rasterises nothing
    raster_calls.clear()
    build_icon_corpus(CFG, tmp_path / "cache", tmp_path / "out", roots={"tango-icon-theme": tmp_path / "src"})
    assert raster_calls == []


def test_icon_corpus_is_registered_and_fails_clearly_without_apt(tmp_path, monkeypatch):
    assert CORPORA.get("icons").config_cls is IconCorpusConfig
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="needs a Debian/Ubuntu machine"):
        icons.fetch_debs(("tango-icon-theme",), tmp_path)


@pytest.mark.skipif(
    shutil.which("rsvg-convert") is None,
    reason="rsvg-convert not installed (make test installs it: apt-get install librsvg2-bin)",
)
def test_rsvg_file_renders_a_tango_icon_and_png_sources(tmp_path):
    icons.rsvg_file(str(TANGO / "printer.svg"), tmp_path / "p.png", 48)
    img = Image.open(tmp_path / "p.png").convert("RGB")
    assert img.size == (48, 48) and len(img.getcolors(maxcolors=1 << 16)) > 20
    icons.rsvg_file(str(tmp_path / "p.png"), tmp_path / "q.png", 24)
    assert Image.open(tmp_path / "q.png").size == (24, 24)


def test_hard_subset_holds_exactly_the_reference_mistakes(tmp_path, tiny_model_cfg, raster_calls):
    from mmpretrain import api
    from mmpretrain.eval.runner import EvalSet, embed_folder, hard_subset, predictions, zeroshot_metrics

    fake_themes(tmp_path / "src")
    build_icon_corpus(CFG, tmp_path / "cache", tmp_path / "out", roots={"tango-icon-theme": tmp_path / "src"})
    model = api.create_model(tiny_model_cfg)  # untrained: mostly wrong, rarely all wrong
    eval_dir = tmp_path / "out" / "eval"
    fes = [
        embed_folder(model, EvalSet.parse(f"{s}@folder={eval_dir / s}"), templates="a <> icon", progress=False)
        for s in ("train_styles_seen", "rendition")
    ]
    wrong = sum(int((predictions(fe) != fe.labels).sum()) for fe in fes)
    info = hard_subset(fes, tmp_path / "hard", reference="untrained tiny")
    assert info["hard"] == wrong and info["reference_model"] == "untrained tiny"
    assert json.loads((tmp_path / "hard" / "hard_subset.json").read_text())["hard"] == wrong
    assert info["classes"] == len(list((eval_dir / "train_styles_seen").iterdir()))  # every class folder kept
    if wrong:  # by construction the reference scores zero on its own hard subset
        again = embed_folder(
            model, EvalSet.parse(f"hard@folder={tmp_path / 'hard'}"), templates="a <> icon", progress=False
        )
        assert zeroshot_metrics(again)["top1"] == 0.0 and len(again.labels) == wrong


def test_pinned_debs_are_checked_by_version_and_sha256(tmp_path):
    from mmpretrain.corpora.debian import fetch_debs

    (tmp_path / "root" / "pkg").mkdir(parents=True)  # a cached, unpacked copy: nothing is downloaded
    info = {"name": "pkg", "version": "1.0", "license": "MIT"}
    (tmp_path / "root" / "pkg" / ".unpacked").write_text(json.dumps(info))
    (tmp_path / "deb").mkdir()
    (tmp_path / "deb" / "pkg_1.0_all.deb").write_bytes(b"the package")
    digest = hashlib.sha256(b"the package").hexdigest()
    assert fetch_debs(("pkg",), tmp_path, {"pkg": ("1.0", digest)})["pkg"]["sha256"] == digest
    with pytest.raises(CorpusError, match=r"pkg: got 1.0 \(.*\), pinned 1.1 .*bump the pin"):
        fetch_debs(("pkg",), tmp_path, {"pkg": ("1.1", digest)})
    with pytest.raises(CorpusError, match="pinned 1.0 \\(0{64}\\)"):
        fetch_debs(("pkg",), tmp_path, {"pkg": ("1.0", "0" * 64)})
