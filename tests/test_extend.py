"""Extending without editing a list: a corpus registered here (a test) is built, evaluated and embedded
through both command lines, which read their choices from the registries when they are built."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmpretrain.cli import main as mmpretrain_main
from mmpretrain.corpora import CORPORA
from mmpretrain.corpora.base import write_corpus
from retrieval.cli import main as retrieval_main

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@dataclass(frozen=True)
class TilesConfig:
    size: int = 24
    seed: int = 0
    per_colour: int = 4
    shard_count: int = 8


def build_tiles(cfg: TilesConfig, cache: str | Path, out: str | Path) -> dict:
    """Solid colour tiles: training shards captioned "a <colour> tile", one evaluation split."""
    cache, out = Path(cache), Path(out)
    cache.mkdir(parents=True, exist_ok=True)
    train, seen = [], []
    for name, rgb in COLOURS.items():
        for i in range(cfg.per_colour):
            png = cache / f"{name}_{i}.png"
            shade = tuple(max(0, c - 8 * i) for c in rgb)
            Image.new("RGB", (cfg.size, cfg.size), shade).save(png)
            train.append((png, f"a {name} tile", f"{name}_{i}.png"))
            seen.append((png, name, f"{name}_{i}.png"))
    counts = write_corpus(out, train, {"seen": seen}, cfg.shard_count)
    manifest = {"counts": counts, "config": {"size": cfg.size, "seed": cfg.seed}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_corpus_registered_in_a_test_is_built_evaluated_and_embedded_from_the_cli(tmp_path, tiny_ckpt, capsys):
    example = {"config": {"per_colour": 2}, "offline": lambda folder: {}}
    with CORPORA.temporary("tiles", build_tiles, config=TilesConfig, example=example, doc="colour tiles"):
        out = tmp_path / "tiles"
        assert (
            mmpretrain_main(
                ["data", "build", "tiles", "--out", str(out), "--cache", str(tmp_path / "c"), "--size", "20"]
            )
            == 0
        )
        assert json.loads((out / "manifest.json").read_text())["config"]["size"] == 20
        assert (
            mmpretrain_main(
                [
                    "eval",
                    "zeroshot",
                    "--model",
                    tiny_ckpt,
                    "--data",
                    f"seen@folder={out}/eval/seen",
                    "--out",
                    str(tmp_path / "zs.json"),
                ]
            )
            == 0
        )
        report = json.loads((tmp_path / "zs.json").read_text())
        assert report["zeroshot"][0]["n"] == 16 and report["zeroshot"][0]["classes"] == 4
        assert (
            retrieval_main(
                [
                    "embed",
                    "--model",
                    tiny_ckpt,
                    "--data",
                    str(out / "shards"),
                    "--out",
                    str(tmp_path / "emb"),
                    "--batch-size",
                    "8",
                ]
            )
            == 0
        )
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert stats["items"] == 16
