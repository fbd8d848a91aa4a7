"""The desktop-icon benchmark corpus: freedesktop icon names drawn by 16 Debian icon themes.

Sources: Debian icon-theme packages, fetched with ``apt-get download`` (no root needed, no
install) and unpacked with ``dpkg-deb -x`` into the cache. Icon names follow the freedesktop
Icon Naming Spec (``printer``, ``camera-photo``, ``weather-storm``); names that are symlinks of
one another in some theme are aliases and merge into one concept. Themes are grouped into
families so that near-copies (gnome~mate, Paper~Moka, elementary~elementary-xfce, Yaru~suru)
stay on the same side of a split. Splits: training families; held-out rendition families (oxygen,
breeze, Papirus); ``*-symbolic`` monochrome versions (sketch); concepts never trained on (unseen).
Output layout as the emoji corpus (``corpora.base.write_corpus``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from mmpretrain.corpora.base import CORPORA, RASTERIZERS, CorpusError, need_rsvg, seeded_split, write_corpus
from mmpretrain.corpora.debian import fetch_debs, licence
from mmpretrain.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
PACKAGES = (
    "adwaita-icon-theme",
    "oxygen-icon-theme",
    "breeze-icon-theme",
    "papirus-icon-theme",
    "tango-icon-theme",
    "elementary-icon-theme",
    "numix-icon-theme",
    "gnome-icon-theme",
    "faenza-icon-theme",
    "mate-icon-theme",
    "lxde-icon-theme",
    "yaru-theme-icon",
    "suru-icon-theme",
    "elementary-xfce-icon-theme",
    "moka-icon-theme",
    "paper-icon-theme",
)
FAMILIES = {
    "adwaita": ("Adwaita",),
    "tango": ("Tango",),
    "gnome": ("gnome", "mate"),
    "paper": ("Paper", "Moka"),
    "elementary": ("elementary", "elementary-xfce"),
    "yaru": ("Yaru", "suru"),
    "faenza": ("Faenza",),
    "numix": ("Numix",),
    "lxde": ("nuoveXT2",),
    "oxygen": ("oxygen",),
    "breeze": ("breeze",),
    "papirus": ("Papirus",),
}
TEMPLATES = (
    "{label}",
    "a {label} icon",
    "an icon of a {label}",
    "the {label} symbol",
    "a desktop icon of {label}",
    "{label}, {context}",
)
SUFFIXES = (".svg", ".png")


@dataclass(frozen=True)
class IconCorpusConfig:
    packages: tuple[str, ...] = PACKAGES
    families: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(FAMILIES))
    rendition_families: tuple[str, ...] = ("oxygen", "breeze", "papirus")
    contexts: tuple[str, ...] = ("devices", "places", "emotes", "status", "categories")
    min_train_themes: int = 3  # a concept is kept if this many training themes draw it
    concepts: int | None = None  # concepts sampled (seeded); None: all usable
    unseen_fraction: float = 0.2
    size: int = 64
    seed: int = 0
    shard_count: int = 1000
    rasterizer: str = "rsvg_file"


@dataclass
class ThemeIcons:
    """One theme's best file per icon name (``regular``) and per symbolic name, plus alias links."""

    theme: str
    regular: dict[str, Path] = field(default_factory=dict)
    symbolic: dict[str, Path] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)
    real: set[str] = field(default_factory=set)  # names drawn by a file of their own (not a symlink)


@RASTERIZERS.register("rsvg_file", example={"source": "file", "needs": ("rsvg-convert",)})
def rsvg_file(src: str, out: Path, size: int) -> None:
    """An SVG file via ``rsvg-convert`` or a PNG via PIL, on white, ``size`` x ``size``."""
    if src.endswith(".png"):
        with Image.open(src) as img:
            img = img.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)
            canvas = Image.new("RGBA", img.size, "white")
            canvas.alpha_composite(img)
            path = out.with_suffix(".tmp.png")
            canvas.convert("RGB").save(path)
            path.replace(out)
        return
    need_rsvg()
    png = subprocess.run(
        ["rsvg-convert", "-w", str(size), "-h", str(size), "-b", "white", src], capture_output=True, check=True
    ).stdout
    atomic_write_bytes(out, png)


def _size_of(path: Path) -> int:
    """Resolution rank of an icon file from its folders: scalable > 256x256 > ... (``@2x`` doubles)."""
    best = 0
    for part in path.parts:
        if part == "scalable":
            return 10_000
        m = re.fullmatch(r"(\d+)(?:x\d+)?(@2x)?", part)
        if m:
            best = max(best, int(m.group(1)) * (2 if m.group(2) else 1))
    return best


def index_theme(theme_dir: Path, contexts: tuple[str, ...]) -> ThemeIcons:
    """Best file per icon name in ``contexts``; symlinked names are recorded as alias links."""
    icons, best = ThemeIcons(theme_dir.name), {}
    for path in theme_dir.rglob("*"):
        if path.suffix not in SUFFIXES:
            continue
        context = next((c for c in path.relative_to(theme_dir).parts[:-1] if c in contexts), None)
        if context is None:
            continue
        name = path.stem
        if name.endswith(("-rtl", "-ltr")):  # mirrored variants of another name
            continue
        symbolic = name.endswith("-symbolic") or "symbolic" in path.parts
        name = name.removesuffix("-symbolic")
        if path.is_symlink():
            target = path.resolve()
            if target.suffix in SUFFIXES and target.stem.removesuffix("-symbolic") != name:
                icons.links.append((name, target.stem.removesuffix("-symbolic")))
            if not target.is_file():
                continue
        else:
            icons.real.add(name)
        rank = (_size_of(path), path.suffix == ".svg")
        key = (name, symbolic)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, path, context)
    for (name, symbolic), (_, path, context) in best.items():
        (icons.symbolic if symbolic else icons.regular)[name] = path
        icons.context.setdefault(name, context)
    return icons


def merge_aliases(themes: list[ThemeIcons], names: set[str]) -> dict[str, str]:
    """name -> canonical concept name, merging names that themes link to one another (union-find).

    A link ``a -> b`` is an alias only if more themes link the pair than draw both as files of
    their own: a theme that reuses one picture for two meanings (``network-wireless`` ->
    ``network-wired``) must not merge concepts others draw apart. The canonical name of a group
    is the one drawn by the most themes (then the shortest).
    """
    linked: dict[frozenset, int] = {}
    for t in themes:
        for pair in {frozenset(p) for p in t.links if p[0] in names and p[1] in names}:
            linked[pair] = linked.get(pair, 0) + 1
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for pair, n_linked in linked.items():
        a, b = tuple(pair)
        if n_linked > sum(a in t.real and b in t.real for t in themes):
            parent[find(a)] = find(b)
    votes = {n: sum(n in t.regular for t in themes) for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    canon = {}
    for members in groups.values():
        head = min(members, key=lambda n: (-votes[n], len(n), n))
        canon.update({n: head for n in members})
    return canon


def label_of(name: str) -> str:
    """``camera-photo`` -> ``camera photo``."""
    return name.replace("-", " ").replace("_", " ")


@dataclass
class IconPlan:
    """Which file draws each (style, concept): ``files[(style, concept)]``; styles are themes or
    ``<theme>-symbolic``."""

    seen: list[str]
    unseen: list[str]
    files: dict[tuple[str, str], Path]
    train_styles: list[str]
    rendition_styles: list[str]
    sketch_styles: list[str]
    context: dict[str, str]


def plan_corpus(cfg: IconCorpusConfig, themes: dict[str, ThemeIcons]) -> IconPlan:
    """Merge aliases, pick the usable concepts and split them (seeded)."""
    family_of = {t: fam for fam, members in cfg.families.items() for t in members}
    unknown = sorted(set(cfg.rendition_families) - set(cfg.families))
    if unknown:
        raise CorpusError(f"rendition families {unknown} are not among the families {sorted(cfg.families)}")
    rendition = [t for t in themes if family_of.get(t) in cfg.rendition_families]
    train = [t for t in themes if t in family_of and t not in rendition]
    names = {n for t in themes.values() for n in (*t.regular, *t.symbolic)}
    canon = merge_aliases(list(themes.values()), names)
    files: dict[tuple[str, str], Path] = {}
    context: dict[str, str] = {}
    for t in train + rendition:
        for name, path in themes[t].regular.items():
            files.setdefault((t, canon[name]), path)
            context.setdefault(canon[name], themes[t].context[name])
        for name, path in themes[t].symbolic.items():
            files.setdefault((f"{t}-symbolic", canon[name]), path)
    usable = sorted({c for (_, c) in files if sum((t, c) in files for t in train) >= cfg.min_train_themes})
    seen, unseen = seeded_split(usable, seed=cfg.seed, limit=cfg.concepts, unseen_fraction=cfg.unseen_fraction)
    sketch = sorted({s for (s, _) in files if s.endswith("-symbolic")})
    return IconPlan(seen, unseen, files, train, rendition, sketch, context)


def rasterize_plan(cfg: IconCorpusConfig, cache: Path, plan: IconPlan) -> dict[tuple[str, str], Path]:
    """PNG per (style, concept) used, cached in ``cache/png/<size>/<style>/<concept>.png`` (2 threads)."""

    draw = RASTERIZERS.get(cfg.rasterizer).builder
    wanted = set(plan.seen) | set(plan.unseen)
    jobs = {key: cache / "png" / str(cfg.size) / key[0] / f"{key[1]}.png" for key in plan.files if key[1] in wanted}

    def one(key: tuple[str, str]) -> None:
        png = jobs[key]
        if png.is_file():
            return
        png.parent.mkdir(parents=True, exist_ok=True)
        try:
            draw(str(plan.files[key]), png, cfg.size)
            if key[0].endswith("-symbolic"):  # light grey glyphs: stretch to black on white
                with Image.open(png) as img:
                    ImageOps.autocontrast(img.convert("L"), cutoff=1).convert("RGB").save(png)
        except (subprocess.CalledProcessError, OSError) as exc:
            log.warning("skipping unrenderable icon %s: %s", plan.files[key], exc)

    with ThreadPoolExecutor(2) as pool:
        list(tqdm(pool.map(one, jobs), total=len(jobs), desc="rasterise", unit="icon"))
    return {key: png for key, png in jobs.items() if png.is_file()}


def example_roots(folder: Path) -> dict[str, Path]:
    """Synthetic offline themes (the registry's example): three themes drawing 8 device icons as SVGs,
    with ``-symbolic`` variants in the first, unpacked as one package ``example-icons``."""
    icons = Path(folder) / "example-icons" / "usr" / "share" / "icons"
    names = ("printer", "camera-photo", "computer", "phone", "battery", "keyboard", "mouse", "scanner")
    for t, theme in enumerate(("ThemeA", "ThemeB", "ThemeR")):
        devices = icons / theme / "scalable" / "devices"
        devices.mkdir(parents=True, exist_ok=True)
        for j, name in enumerate(names):
            svg = (
                f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle r="{4 + j % 4}" cx="8" cy="8" '
                f'fill="#{(30 * j) % 256:02x}{(80 * t) % 256:02x}40"/></svg>'
            )
            (devices / f"{name}.svg").write_text(svg)
            if t == 0:
                (devices / f"{name}-symbolic.svg").write_text(svg.replace('fill="#', 'fill="#0'))
    return {"example-icons": Path(folder) / "example-icons"}


def _example() -> dict:
    """The corpus example: small config overrides and ``offline(folder) -> builder keyword arguments``."""
    return {
        "config": {
            "packages": ("example-icons",),
            "families": {"a": ("ThemeA",), "b": ("ThemeB",), "r": ("ThemeR",)},
            "rendition_families": ("r",),
            "contexts": ("devices",),
            "min_train_themes": 2,
            "unseen_fraction": 0.25,
            "size": 16,
            "rasterizer": "placeholder",
            "shard_count": 10,
        },
        "offline": lambda folder: {"roots": example_roots(folder)},
    }


@CORPORA.register("icons", config=IconCorpusConfig, example=_example)
def build_icon_corpus(
    cfg: IconCorpusConfig, cache: str | Path, out: str | Path, roots: dict[str, Path] | None = None
) -> dict:
    """Fetch (or take ``roots``: package -> unpacked root), index, split, rasterise, write + manifest.json.

    Idempotent: downloaded packages, unpacked trees and rasterised icons are cached; ``out`` is rebuilt.
    """
    cache, out = Path(cache), Path(out)
    if roots is None:
        sources = fetch_debs(cfg.packages, cache)
        roots = {pkg: cache / "root" / pkg for pkg in cfg.packages}
    else:
        sources = {pkg: {"name": pkg, "version": "local", "license": licence(root, pkg)} for pkg, root in roots.items()}
    wanted = {t for members in cfg.families.values() for t in members}
    themes = {
        d.name: index_theme(d, cfg.contexts)
        for root in roots.values()
        for d in sorted((root / "usr" / "share" / "icons").glob("*"))
        if d.name in wanted and d.is_dir()
    }
    plan = plan_corpus(cfg, themes)
    if not plan.seen:
        raise CorpusError(f"no icon name is drawn by {cfg.min_train_themes} training themes")
    pngs = rasterize_plan(cfg, cache, plan)
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(cfg.seed + 1)

    def caption(c: str) -> str:
        return rng.choice(TEMPLATES).format(label=label_of(c), context=plan.context.get(c, "icon"))

    def rows(concepts: list[str], styles: list[str]) -> list[tuple[Path, str, str]]:
        return [(pngs[(s, c)], label_of(c), f"{s}.png") for c in concepts for s in styles if (s, c) in pngs]

    train = [(pngs[(s, c)], caption(c), f"{s}/{c}.png") for c in plan.seen for s in plan.train_styles if (s, c) in pngs]
    splits = {
        "train_styles_seen": rows(plan.seen, plan.train_styles),
        "rendition": rows(plan.seen, plan.rendition_styles),
        "sketch": rows(plan.seen, plan.sketch_styles),
        "unseen_concepts": rows(plan.unseen, plan.train_styles),
    }
    counts = write_corpus(out, train, splits, cfg.shard_count)
    manifest = {
        "format": "mmpretrain-icon-corpus/1",
        "config": asdict(cfg),
        "counts": counts,
        "styles": {"train": plan.train_styles, "rendition": plan.rendition_styles, "sketch": plan.sketch_styles},
        "concepts": {"seen": [label_of(c) for c in plan.seen], "unseen": [label_of(c) for c in plan.unseen]},
        "sources": sources,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
