"""The emoji benchmark corpus: real concepts with real names, drawn in many styles.

Sources (npm, cached): ``emojibase-data`` (names, tags, groups; MIT) and one
``@iconify-json/<style>`` package per style (SVG bodies keyed by CLDR slug, e.g. ``dog-face``).
Each (style, concept) SVG is rasterised once (``rsvg-convert``) into the cache. Splits (see
shared DATA.md): training styles; a held-out rendition style (ImageNet-R analogue); held-out
monochrome sketch styles (ImageNet-Sketch analogue); concepts never trained on (unseen).
Output: training shards (via the shard writer) and each evaluation split as an ImageFolder
tree (``<split>/<concept>/<style>.png``) for ``mmpretrain eval zeroshot --data NAME@folder=DIR``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mmpretrain.registry import Registry
from mmpretrain.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
RASTERIZERS: Registry[Callable[[str, Path, int], None]] = Registry("rasterizer")
CORPORA: Registry[Callable[..., dict]] = Registry("corpus")  # name -> build(cfg, cache, out); config_cls types cfg
TEMPLATES = ("{label}", "a {label} emoji", "an icon of a {label}", "a drawing of a {label}", "{label}, {tag}",
             "the {label} symbol")


class CorpusError(RuntimeError):
    """A source cannot be had; the message says what to install."""


@dataclass(frozen=True)
class EmojiCorpusConfig:
    train_styles: tuple[str, ...] = ("noto", "twemoji", "fluent-emoji-flat", "emojione", "noto-v1", "emojione-v1")
    rendition_styles: tuple[str, ...] = ("openmoji",)
    sketch_styles: tuple[str, ...] = ("fluent-emoji-high-contrast", "emojione-monotone")
    concepts: int | None = 300  # concepts sampled (seeded); None: all
    unseen_fraction: float = 0.2  # of the sampled concepts, never trained on
    size: int = 64
    seed: int = 0
    shard_count: int = 1000
    rasterizer: str = "rsvg"


@dataclass(frozen=True)
class Concept:
    slug: str
    label: str
    tags: tuple[str, ...] = ()


@dataclass
class Style:
    name: str
    svgs: dict[str, str]
    package: dict = field(default_factory=dict)


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


@RASTERIZERS.register("rsvg")
def rsvg(svg: str, out: Path, size: int) -> None:
    """librsvg's ``rsvg-convert`` on a white background (Debian: librsvg2-bin)."""
    if shutil.which("rsvg-convert") is None:
        raise CorpusError("rsvg-convert not found: install it with `apt-get install librsvg2-bin`")
    png = subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-b", "white"], input=svg.encode(),
                         capture_output=True, check=True).stdout
    atomic_write_bytes(out, png)


def fetch_npm(package: str, cache: Path) -> Path:
    """``npm pack`` ``package`` into ``cache`` once; returns the extracted package folder."""
    target = cache / "npm" / package.replace("/", "__")
    if (target / "package" / "package.json").is_file():
        return target / "package"
    if shutil.which("npm") is None:
        raise CorpusError(f"npm not found, needed to fetch {package}: install Node.js and npm (apt-get install npm)")
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["npm", "pack", package, "--silent", "--pack-destination", str(target)],
                          capture_output=True, text=True)
    tgz = sorted(target.glob("*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise CorpusError(f"npm pack {package} failed: {proc.stderr.strip()[-500:]}")
    with tarfile.open(tgz[-1]) as tf:
        tf.extractall(target, filter="data")
    return target / "package"


def load_concepts(emojibase: Path) -> list[Concept]:
    """Named, non-flag emoji concepts from emojibase (regional indicators and components dropped)."""
    data = json.loads((emojibase / "en" / "data.json" if (emojibase / "en").is_dir() else emojibase / "data.json").read_text())
    out = {}
    for e in data:
        label = e.get("label", "")
        if e.get("group") in (None, 2, 9) or not label or label.startswith("regional indicator"):
            continue  # 2: components (skin tones, hair), 9: flags
        out.setdefault(slug(label), Concept(slug(label), label, tuple(e.get("tags", ()))))
    return list(out.values())


def load_style(name: str, folder: Path) -> Style:
    data = json.loads((folder / "icons.json").read_text())
    w, h = data.get("width", 16), data.get("height", 16)
    svgs = {}
    for key, icon in data["icons"].items():
        iw, ih = icon.get("width", w), icon.get("height", h)
        svgs[key] = f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {iw} {ih}">{icon["body"]}</svg>'
    for alias, target in data.get("aliases", {}).items():
        if target.get("parent") in svgs and len(target) == 1:
            svgs.setdefault(alias, svgs[target["parent"]])
    package = json.loads((folder / "package.json").read_text()) if (folder / "package.json").is_file() else {}
    return Style(name, svgs, {k: package.get(k) for k in ("name", "version", "license")})


def resolve_sources(cfg: EmojiCorpusConfig, cache: Path, sources: dict[str, Path] | None) -> dict[str, Path]:
    """Local source folders by name (``emojibase`` and each style), fetching from npm what is not given."""
    styles = cfg.train_styles + cfg.rendition_styles + cfg.sketch_styles
    given = dict(sources or {})
    out = {"emojibase": given.get("emojibase") or fetch_npm("emojibase-data", cache)}
    for style in styles:
        out[style] = given.get(style) or fetch_npm(f"@iconify-json/{style}", cache)
    return out


def select(cfg: EmojiCorpusConfig, concepts: list[Concept], styles: dict[str, Style]) -> tuple[list[Concept], list[Concept]]:
    """(seen, unseen) concepts: drawn in >= 2 training styles and in every held-out style."""
    held_out = cfg.rendition_styles + cfg.sketch_styles
    usable = [c for c in concepts
              if sum(c.slug in styles[s].svgs for s in cfg.train_styles) >= min(2, len(cfg.train_styles))
              and all(c.slug in styles[s].svgs for s in held_out)]
    rng = random.Random(cfg.seed)
    rng.shuffle(usable)
    if cfg.concepts is not None:
        usable = usable[: cfg.concepts]
    n_unseen = round(len(usable) * cfg.unseen_fraction)
    unseen, seen = usable[:n_unseen], usable[n_unseen:]
    return sorted(seen, key=lambda c: c.slug), sorted(unseen, key=lambda c: c.slug)


def rasterize_all(cfg: EmojiCorpusConfig, cache: Path, styles: dict[str, Style], concepts: list[Concept]) -> dict:
    """PNG per (style, concept) present, cached in ``cache/png/<size>/<style>/<slug>.png``."""
    from tqdm import tqdm

    draw = RASTERIZERS.get(cfg.rasterizer).builder
    jobs = [(s, c) for s in styles.values() for c in concepts if c.slug in s.svgs]
    out: dict[tuple[str, str], Path] = {}
    for style, concept in tqdm(jobs, desc="rasterise", unit="icon"):
        png = cache / "png" / str(cfg.size) / style.name / f"{concept.slug}.png"
        if not png.is_file():
            png.parent.mkdir(parents=True, exist_ok=True)
            draw(style.svgs[concept.slug], png, cfg.size)
        out[(style.name, concept.slug)] = png
    return out


def caption(concept: Concept, rng: random.Random) -> str:
    tag = rng.choice(concept.tags) if concept.tags else concept.label
    return rng.choice(TEMPLATES).format(label=concept.label, tag=tag)


def write_corpus(out: Path, train: list[tuple[Path, str, str]], splits: dict[str, list[tuple[Path, str, str]]],
                 shard_count: int) -> dict[str, int]:
    """Write training shards and evaluation ImageFolder splits; returns image counts per split.

    ``train``: (png, caption, file name) rows; ``splits[name]``: (png, concept label, file name) rows,
    written as ``out/eval/<name>/<label with _>/<file name>``. Shared by every corpus builder.
    """
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    staging = out / "train_images"
    buf = io.StringIO()
    rows = csv.writer(buf)
    rows.writerow(["file", "caption"])
    for png, text, name in train:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, staging / name)
        rows.writerow([name, text])
    atomic_write_text(staging / "captions.csv", buf.getvalue())
    manifest = make_shards(staging, staging / "captions.csv", out / "shards", ShardWriterConfig(max_count=shard_count),
                           progress=False)
    counts = {"train_shards": manifest.samples}
    for split, items in splits.items():
        for png, label, name in items:
            folder = out / "eval" / split / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, folder / name)
        counts[split] = len(items)
    return counts


def write_splits(cfg: EmojiCorpusConfig, out: Path, pngs: dict, seen: list[Concept], unseen: list[Concept]) -> dict:
    """Training shards (seen concepts x training styles) + the four evaluation splits."""
    rng = random.Random(cfg.seed + 1)
    train = [(pngs[(s, c.slug)], caption(c, rng), f"{s}/{c.slug}.png")
             for c in seen for s in cfg.train_styles if (s, c.slug) in pngs]
    plan = {"train_styles_seen": (seen, cfg.train_styles), "rendition": (seen, cfg.rendition_styles),
            "sketch": (seen, cfg.sketch_styles), "unseen_concepts": (unseen, cfg.train_styles)}
    splits = {split: [(pngs[(s, c.slug)], c.label, f"{s}.png") for c in concepts for s in styles if (s, c.slug) in pngs]
              for split, (concepts, styles) in plan.items()}
    return write_corpus(out, train, splits, cfg.shard_count)


@CORPORA.register("emoji", config=EmojiCorpusConfig)
def build_emoji_corpus(cfg: EmojiCorpusConfig, cache: str | Path, out: str | Path,
                       sources: dict[str, Path] | None = None) -> dict:
    """Fetch (or take) the sources, rasterise, split, and write shards + eval folders + manifest.json.

    Idempotent: fetched packages and rasterised icons are cached; ``out`` is rebuilt.
    """
    cache, out = Path(cache), Path(out)
    folders = resolve_sources(cfg, cache, sources)
    styles = {name: load_style(name, folders[name]) for name in folders if name != "emojibase"}
    seen, unseen = select(cfg, load_concepts(folders["emojibase"]), styles)
    if not seen:
        raise CorpusError("no concept is drawn in enough of the configured styles")
    pngs = rasterize_all(cfg, cache, styles, seen + unseen)
    if out.exists():
        shutil.rmtree(out)
    counts = write_splits(cfg, out, pngs, seen, unseen)
    emojibase_pkg = json.loads((folders["emojibase"] / "package.json").read_text())
    manifest = {
        "format": "mmpretrain-emoji-corpus/1", "config": asdict(cfg), "counts": counts,
        "concepts": {"seen": [c.label for c in seen], "unseen": [c.label for c in unseen]},
        "sources": {"emojibase": {k: emojibase_pkg.get(k) for k in ("name", "version", "license")},
                    **{name: s.package for name, s in styles.items()}},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest

from mmpretrain.data import icons, motion  # noqa: E402,F401  (register the icons and motion corpora in CORPORA)
