"""Labelled evaluation sets, one spec syntax for every kind: ``[NAME@]KIND[:OPTION]=PATH``.

``KIND`` is a set kind of ``SET_KINDS`` or, otherwise, a folder layout of ``datasets.LAYOUTS``:

    ``folder``, ``imagenet``, ...   an ImageFolder tree (``EvalSet``): images, labels from the folders
    ``wds[:SPLIT]``                 CLIP_benchmark's webdataset layout (``WdsSet``): ``PATH/classnames.txt``,
                                    ``PATH/zeroshot_classification_templates.txt``, ``PATH/SPLIT/nshards.txt``
                                    and ``PATH/SPLIT/0.tar ..`` with ``cls`` + image members (``dataset_type.txt``:
                                    ``retrieval`` for caption sets, several ``txt`` lines per image); SPLIT
                                    defaults to the role's (``test``, or ``train`` for a probe's training set)
    ``shards[:FIELD,..]``           our labelled shards (``ShardSet``): any modality, labels in ``json[FIELD]``

Every kind embeds through the one evaluation-input path (``eval.inputs.EvalInput``) into a
``Labelled``: normalised embeddings, integer labels into the class names, and where each item came
from. Unreadable items are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from webdataset import TarWriter

from mmpretrain.data.loader import expand_shards
from mmpretrain.data.ops import SampleError, json_member, read_captions
from mmpretrain.eval.datasets import LAYOUTS, ImageFolderSet
from mmpretrain.eval.embed import FileReader, embed_shards
from mmpretrain.eval.inputs import Views
from mmpretrain.registry import Registry, unknown_name_message

log = logging.getLogger(__name__)
PLACEHOLDER = "<>"  # our template placeholder (CLIP_benchmark's is ``{c}``)


@dataclass
class Labelled:
    """One labelled set embedded: ``emb`` (N, E) float32 on CPU, L2-normalised; ``labels`` (N,) int64
    indexing ``classes``; ``refs[i]``: where item i came from (a file, or ``shard#key``); ``skipped``:
    unusable items by kind; ``templates``: the set's own prompt templates (``<>``), if it ships any."""

    emb: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    refs: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    templates: tuple[str, ...] | None = None


def sample_meta(sample: dict) -> dict:
    """The json member as a dict; ``{}`` when absent or unusable (too large, too deep, not an object)."""

    try:
        return json_member(sample)
    except SampleError:
        return {}


def file_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the files' names, sizes and modification times: what the feature cache keys on."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _ByRef(dict):
    """A file's label by its path (``__ref__``): a picklable label hook for decoding workers."""

    def __call__(self, sample: dict):
        return self.get(sample.get("__ref__"))


@dataclass(frozen=True)
class EvalSet:
    """One labelled image folder: a display name, a layout (see ``datasets.LAYOUTS``) and a folder."""

    name: str
    layout: str
    root: Path
    has_files = True  # items are image files (a hard subset can copy them)

    @classmethod
    def parse(cls, spec: str, *, check: bool = False) -> EvalSet:
        """``[NAME@]LAYOUT=DIR``, e.g. ``imagenet-r=/data/imagenet-r`` or ``openmoji@folder=/data/openmoji``.
        ``check``: the layout is registered (``ValueError`` with the closest name) and the folder exists."""
        return folder_set(*split_spec(spec), spec=spec, check=check)

    def dataset(self) -> ImageFolderSet:
        """The images of the class folders and their labels, every folder checked against the layout."""
        return ImageFolderSet(self.root, self.layout)

    def caption_source(self) -> None:
        """Shards and a caption reader for caption retrieval; a folder has none (its classes are queries)."""
        return None

    def fingerprint(self) -> str:
        ds = self.dataset()
        return f"{self.layout}-" + file_fingerprint([p for p, _ in ds.samples])

    def embed(
        self, model, modality: str = "image", *, views: Views = Views(), batch_size=64, workers=0, progress=True
    ) -> Labelled:
        """Every image of the class folders through ``embed_shards`` (a ``FileReader`` over the files the
        layout lists, each labelled with its folder's class)."""
        if modality != "image":
            raise ValueError(f"{self.name}: an image folder has no {modality}; use a shards set for {modality}")
        ds = self.dataset()
        label_of = _ByRef({str(path): label for path, label in ds.samples})
        got = embed_shards(
            model,
            list(label_of),
            ["image"],
            label_of,
            name=self.name,
            views=views,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            read=FileReader("image"),
        )
        labels = torch.tensor(got.labels, dtype=torch.long)
        return Labelled(got.emb["image"], labels, list(ds.classes.names), got.refs, got.skipped)


# kind -> fn(name, option, path, split=, check=) -> a set (``embed``, ``fingerprint``, ``caption_source``);
# example: fn(folder) writing a tiny set -> (spec, items, classes)
SET_KINDS: Registry = Registry("evaluation set kind")


def split_spec(spec: str) -> tuple[str, str, str | None, str]:
    """``[NAME@]KIND[:OPTION]=PATH`` -> ``(NAME or KIND, KIND, OPTION or None, PATH)``: the one parser of
    the set grammar (every set spec of the package goes through it). Only the part before the first
    ``=`` is split, so a PATH may hold ``@``, ``:`` or ``=``."""
    head, sep, path = spec.partition("=")
    if not sep:
        raise ValueError(f"data set {spec!r} must look like [NAME@]KIND[:OPTION]=PATH")
    name, _, kind_opt = head.rpartition("@")
    kind, _, option = kind_opt.partition(":")
    return name or kind, kind, option or None, path


def parse_set(spec: str, *, check: bool = False, split: str = "test", kinds: Sequence[str] | None = None):
    """Any labelled set spec -> its set: a ``SET_KINDS`` kind, else a folder layout (``EvalSet``).
    ``check``: the kind is known and its data exists. ``split``: the split a kind that has splits reads
    when the spec names none (``wds``). ``kinds``: the only kinds accepted (e.g. ``("shards",)``)."""
    name, kind, option, path = split_spec(spec)
    if kinds is not None and kind not in kinds:
        raise ValueError(f"data set {spec!r} must look like [NAME@]{'|'.join(kinds)}[:OPTION]=PATH here")
    if kind in SET_KINDS:
        return SET_KINDS.build(kind, name, option, path, split=split, check=check)
    return folder_set(name, kind, option, path, spec=spec, check=check)


def parse_source(spec: str, *, check: bool = False, split: str = "test"):
    """A set spec (``parse_set``), or a plain shard spec with captions (no ``=``), returned as it is:
    what caption retrieval and captioning read."""
    return parse_set(spec, check=check, split=split) if "=" in spec else spec


def folder_set(name: str, layout: str, option: str | None, path: str, *, spec: str, check: bool = False) -> EvalSet:
    """An image folder of a ``datasets.LAYOUTS`` layout (``check``: registered, and the folder exists)."""

    if check and layout not in LAYOUTS:
        known = sorted([*LAYOUTS.names(), *SET_KINDS.names()])
        raise ValueError(f"{spec}: " + unknown_name_message(LAYOUTS.kind, layout, known))
    if option is not None:
        raise ValueError(f"{spec}: a folder layout takes no ':{option}' ([NAME@]LAYOUT=DIR)")
    if check and not Path(path).is_dir():
        raise FileNotFoundError(f"{spec}: no folder {path}")
    return EvalSet(name, layout, Path(path))


def _read_lines(path: Path) -> list[str] | None:
    return (
        [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else None
    )


@dataclass(frozen=True)
class WdsSet:
    """A CLIP_benchmark webdataset folder (``clip_benchmark_export_wds`` writes them), one split."""

    name: str
    root: Path
    split: str
    has_files = False
    layout = "wds"

    @property
    def kind(self) -> str:
        """``classification`` (``cls`` labels), ``retrieval`` (``txt`` captions) or ``multilabel``."""
        return (_read_lines(self.root / "dataset_type.txt") or ["classification"])[0].lower()

    def shards(self) -> list[str]:
        folder = self.root / self.split
        nshards = _read_lines(folder / "nshards.txt")
        if nshards:
            paths = [folder / f"{i}.tar" for i in range(int(nshards[0]))]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{self.name}: {len(missing)} shard(s) of {folder}/nshards.txt missing")
            return [str(p) for p in paths]
        paths = sorted(folder.glob("*.tar"), key=lambda p: (len(p.name), p.name))
        if not paths:
            raise FileNotFoundError(f"{self.name}: no {folder}/nshards.txt and no .tar shards in {folder}")
        log.warning("%s: no nshards.txt in %s; reading its %d .tar files", self.name, folder, len(paths))
        return [str(p) for p in paths]

    def classes(self) -> list[str]:
        names = _read_lines(self.root / "classnames.txt")
        if not names:
            raise FileNotFoundError(f"{self.name}: {self.root}/classnames.txt is missing or empty")
        return names

    def templates(self) -> tuple[str, ...] | None:
        """The set's templates with ``{c}`` read as our ``<>``; None when it ships none."""
        lines = _read_lines(self.root / "zeroshot_classification_templates.txt")
        return tuple(t.replace("{c}", PLACEHOLDER) for t in lines) if lines else None

    def fingerprint(self) -> str:
        return f"wds-{self.split}-" + file_fingerprint(
            [Path(s) for s in self.shards()] + [self.root / "classnames.txt"]
        )

    def caption_source(self):
        """``(shards, captions)`` of a retrieval folder (``dataset_type.txt``: retrieval), else None."""
        return (self.shards(), self.captions) if self.kind == "retrieval" else None

    @staticmethod
    def captions(sample: dict) -> list[str]:
        """A retrieval sample's captions: its ``txt`` lines (CLIP_benchmark's ``str.splitlines``), by the one
        caption reader."""
        return read_captions(sample, ("txt/lines",), strict=False)

    def embed(self, model, modality="image", *, views=Views(), batch_size=64, workers=0, progress=True) -> Labelled:
        if self.kind != "classification":
            raise ValueError(
                f"{self.name}: a {self.kind} set; classification needs cls labels (eval retrieval reads it)"
            )
        classes = self.classes()

        def label(sample: dict) -> int | None:
            raw = sample.get("cls")
            try:
                value = int(raw.decode() if isinstance(raw, bytes) else raw)
            except (TypeError, ValueError):
                return None
            return value if 0 <= value < len(classes) else None

        run = embed_shards(
            model, self.shards(), [modality], label,
            name=self.name, views=views, batch_size=batch_size, workers=workers, progress=progress,
        )  # fmt: skip
        labels = torch.tensor(run.labels, dtype=torch.long)
        return Labelled(run.emb[modality], labels, classes, run.refs, run.skipped, self.templates())


def _wds_example(folder: Path) -> tuple[str, int, int]:
    """Three classes x two images in CLIP_benchmark's layout (one shard)."""

    (folder / "test").mkdir(parents=True)
    (folder / "classnames.txt").write_text("red\ngreen\nblue\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    (folder / "test" / "nshards.txt").write_text("1\n")
    with TarWriter(str(folder / "test" / "0.tar")) as w:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), [(200, 0, 0), (0, 200, 0), (0, 0, 200)][i % 3]).save(buf, format="webp")
            w.write({"__key__": f"s{i:07d}", "webp": buf.getvalue(), "cls": i % 3})
    return f"tiny@wds={folder}", 6, 3


@SET_KINDS.register("wds", example=_wds_example)
def wds_set(name: str, option: str | None, path: str, *, split: str = "test", check: bool = False) -> WdsSet:
    """CLIP_benchmark's webdataset layout: ``wds[:SPLIT]=DIR`` (classnames.txt, templates, SPLIT/N.tar)."""
    s = WdsSet(name, Path(path), option or split)
    if check and not (s.root / s.split).is_dir():
        raise FileNotFoundError(f"{name}@wds: no split folder {s.root / s.split}")
    return s


@dataclass(frozen=True)
class ShardSet:
    """A labelled shard set: a display name, the json label fields and a shard spec."""

    name: str
    fields: tuple[str, ...]
    spec: str
    has_files = False
    layout = "shards"

    @classmethod
    def parse(cls, spec: str) -> ShardSet:
        """``[NAME@]shards[:FIELD[,FIELD]]=SPEC``, e.g.
        ``heldout@shards:concept,motion=data/motion/eval/heldout_combos``."""
        return parse_set(spec, kinds=("shards",))

    def shards(self) -> list[str]:
        return expand_shards(self.spec)

    def caption_source(self) -> None:
        return None

    def fingerprint(self) -> str:
        local = [Path(s) for s in self.shards() if Path(s).is_file()]
        return f"shards-{','.join(self.fields)}-" + file_fingerprint(local)

    def embed(self, model, modality="image", *, views=Views(), batch_size=64, workers=0, progress=True) -> Labelled:
        """Classification by the one label field (``shards:FIELD``); classes: its values present, sorted."""
        if len(self.fields) != 1:
            raise ValueError(f"{self.name}: name one json label field for classification (shards:FIELD=...)")
        key, seen = self.fields[0], {}

        def label(sample: dict) -> int | None:  # strings, indexed in order of appearance, sorted below
            value = sample_meta(sample).get(key)
            return seen.setdefault(value, len(seen)) if isinstance(value, str) else None

        if workers:
            raise ValueError(f"{self.name}: shards sets read in one process (--workers 0)")
        run = embed_shards(
            model, self.shards(), [modality], label,
            name=self.name, views=views, batch_size=batch_size, workers=0, progress=progress,
        )  # fmt: skip
        names = sorted(seen)
        remap = torch.tensor([names.index(v) for v in seen])  # appearance order -> sorted order
        labels = remap[torch.tensor(run.labels, dtype=torch.long)]
        return Labelled(run.emb[modality], labels, names, run.refs, run.skipped)


def _shards_example(folder: Path) -> tuple[str, int, int]:
    folder.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(folder / "s-000000.tar")) as w:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(buf, format="png")
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "json": json.dumps({"concept": "ab"[i % 2]})})
    return f"tiny@shards:concept={folder}", 6, 2


@SET_KINDS.register("shards", example=_shards_example)
def shards_set(name: str, option: str | None, path: str, *, split: str = "test", check: bool = False) -> ShardSet:
    """Our labelled shards, any modality: ``shards:FIELD=SHARDS`` (labels in each sample's json[FIELD]).
    ``check``: the spec's local shards exist (a pattern matching no file is a ``ConfigError``, as for
    training data), so a typo fails when the config loads or the job is built, not after the model."""
    if check:
        expand_shards(path, f"{name}@shards")
    return ShardSet(name, tuple(f for f in (option or "").split(",") if f), path)
