"""What every corpus builder shares: the registries (``CORPORA``, ``RASTERIZERS``), the seeded
seen/unseen split, the writer of training shards and evaluation folders, and the ``rsvg`` rasteriser.

A corpus builder is ``build(cfg, cache, out, **offline_sources) -> manifest`` registered in
``CORPORA`` with its config dataclass; ``mmpretrain data build NAME`` runs it.
"""

from __future__ import annotations

import csv
import io
import random
import shutil
import subprocess
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from mmpretrain.data.shards import ShardWriterConfig, make_shards
from mmpretrain.registry import Registry
from mmpretrain.utils.io import atomic_write_bytes, atomic_write_text

T = TypeVar("T")
RASTERIZERS: Registry[Callable[[str, Path, int], None]] = Registry("rasterizer")
CORPORA: Registry[Callable[..., dict]] = Registry("corpus")  # name -> build(cfg, cache, out); config_cls types cfg


class CorpusError(RuntimeError):
    """A source cannot be had; the message says what to install."""


def seeded_split(
    items: Sequence[T], *, seed: int, limit: int | None, unseen_fraction: float, key: Callable[[T], Any] | None = None
) -> tuple[list[T], list[T]]:
    """(seen, unseen): ``items`` shuffled by ``Random(seed)`` in the order given (not sorted here: the
    order is part of the seed's meaning), the first ``limit`` kept (None: all), the first
    ``round(n * unseen_fraction)`` unseen; each half sorted by ``key``."""
    pool = list(items)
    random.Random(seed).shuffle(pool)
    if limit is not None:
        pool = pool[:limit]
    n_unseen = round(len(pool) * unseen_fraction)
    return sorted(pool[n_unseen:], key=key), sorted(pool[:n_unseen], key=key)


def need_rsvg() -> None:
    if shutil.which("rsvg-convert") is None:
        raise CorpusError("rsvg-convert not found: install it with `apt-get install librsvg2-bin`")


@RASTERIZERS.register("placeholder", example={"source": "svg", "needs": ()})
def placeholder(src: str, out: Path, size: int) -> None:
    """A plain square whose colour follows ``src`` (no rsvg-convert): offline examples and tests."""

    crc = zlib.crc32(src.encode())
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (crc & 255, (crc >> 8) & 255, (crc >> 16) & 255)).save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


@RASTERIZERS.register("rsvg", example={"source": "svg", "needs": ("rsvg-convert",)})
def rsvg(svg: str, out: Path, size: int) -> None:
    """librsvg's ``rsvg-convert`` on a white background (Debian: librsvg2-bin)."""
    need_rsvg()
    png = subprocess.run(
        ["rsvg-convert", "-w", str(size), "-h", str(size), "-b", "white"],
        input=svg.encode(),
        capture_output=True,
        check=True,
    ).stdout
    atomic_write_bytes(out, png)


def write_corpus(
    out: Path, train: list[tuple[Path, str, str]], splits: dict[str, list[tuple[Path, str, str]]], shard_count: int
) -> dict[str, int]:
    """Write training shards and evaluation ImageFolder splits; returns image counts per split.

    ``train``: (png, caption, file name) rows; ``splits[name]``: (png, concept label, file name) rows,
    written as ``out/eval/<name>/<label with _>/<file name>``. Shared by every corpus builder.
    """

    staging = out / "train_images"
    buf = io.StringIO()
    rows = csv.writer(buf)
    rows.writerow(["file", "caption"])
    for png, text, name in train:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, staging / name)
        rows.writerow([name, text])
    atomic_write_text(staging / "captions.csv", buf.getvalue())
    manifest = make_shards(
        staging, staging / "captions.csv", out / "shards", ShardWriterConfig(max_count=shard_count), progress=False
    )
    counts = {"train_shards": manifest.samples}
    for split, items in splits.items():
        for png, label, name in items:
            folder = out / "eval" / split / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, folder / name)
        counts[split] = len(items)
    return counts
