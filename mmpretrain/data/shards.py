"""Write webdataset shards from an image folder + a captions file (CSV, TSV or JSONL).

Samples follow img2dataset's layout: ``<key>.jpg|png|webp`` (original bytes), ``<key>.txt``
(caption), ``<key>.json`` (caption, source path, extra columns). Each shard is written to
a temp file and renamed, so a crash never leaves a truncated ``.tar`` under its final name.
``manifest.json`` lists every shard with its sample count and size.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from mmpretrain.data.loader import expand_shards
from mmpretrain.data.stream import ErrorCounter, read_samples
from mmpretrain.registry import Registry
from mmpretrain.utils.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PATH_COLUMNS = ("file", "filepath", "path", "image", "filename")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
NATIVE_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass(frozen=True)
class ShardWriterConfig:
    max_count: int = 1000  # samples per shard
    max_bytes: int = 1_000_000_000  # bytes per shard (a shard closes before it would exceed this)
    prefix: str = "shard"
    verify_images: bool = True  # decode each image/clip and skip unreadable ones (counted)
    media: str = "image"  # image | video | audio: what the path column points at (SHARD_MEDIA)


@dataclass
class Manifest:
    format: str = "mmpretrain-shards/1"
    shards: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def pattern(self) -> str:
        """A brace pattern naming all shards (what ``data.train`` takes)."""
        names = [s["name"] for s in self.shards]
        if len(names) == 1:
            return names[0]
        stem, width = names[0].rsplit("-", 1)[0], len(names[0].rsplit("-", 1)[1]) - len(".tar")
        return f"{stem}-{{{0:0{width}d}..{len(names) - 1:0{width}d}}}.tar"


def read_captions(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV/TSV (with a header) or JSONL captions file, as dicts."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        elif suffix in (".csv", ".tsv"):
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise ValueError(f"{path}: captions must be .csv, .tsv or .jsonl")


def _column(row: dict[str, Any], names: tuple[str, ...], what: str, path: Path) -> str:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise ValueError(f"{path}: no {what} column; expected one of {', '.join(names)} (have {', '.join(row)})")


SHARD_MEDIA: Registry = Registry("shard media")  # name -> fn(path, verify) -> (member extension, bytes)


@SHARD_MEDIA.register("image", example={"member": "png"})
def _encode(image_path: Path, verify: bool) -> tuple[str, bytes]:
    """(extension, bytes) for a shard member; formats other than jpg/png/webp become png."""
    data = image_path.read_bytes()
    ext = NATIVE_EXT.get(image_path.suffix.lower())
    if verify or ext is None:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if ext is None:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                return "png", buf.getvalue()
    return ext, data  # type: ignore[return-value]


def _frames(data: bytes) -> int:
    import decord  # loaded by the process that reads (pyproject.toml's deferred imports)

    return len(decord.VideoReader(io.BytesIO(data)))


def _samples(data: bytes) -> int:
    import decord

    return decord.AudioReader(io.BytesIO(data)).shape[-1]


def _media_encoder(kind: str, exts: tuple[str, ...], length: Callable[[bytes], int]):
    """A stored-as-is media file's encoder: its extension checked, and (``verify``) its ``length``
    (frames, samples) read by decord, where an empty or unreadable file fails."""

    def encode(path: Path, verify: bool) -> tuple[str, bytes]:
        ext = path.suffix.lower().lstrip(".")
        if ext not in exts:
            raise ValueError(f"{path.name}: not a {kind} file ({', '.join(exts)})")
        data = path.read_bytes()
        if verify and not length(data):
            raise ValueError(f"{path.name}: no {kind} content")
        return ext, data

    return encode


SHARD_MEDIA.register(
    "video", example={"member": "mp4"}, doc="a video file (mp4, webm, avi, mkv, mov), stored as it is"
)(_media_encoder("video", ("mp4", "webm", "avi", "mkv", "mov"), _frames))
SHARD_MEDIA.register("audio", example={"member": "wav"}, doc="an audio file (wav, flac, mp3, ogg), stored as it is")(
    _media_encoder("audio", ("wav", "flac", "mp3", "ogg"), _samples)
)


class _ShardSink:
    """Rolls over shards by count/size; each shard is atomic."""

    def __init__(self, out_dir: Path, cfg: ShardWriterConfig):
        self.out_dir, self.cfg = out_dir, cfg
        self.shards: list[dict[str, Any]] = []
        self._ctx = self._writer = None
        self._count = self._bytes = 0

    def write(self, sample: dict[str, Any], size: int) -> None:
        if self._writer is not None and (self._count >= self.cfg.max_count or self._bytes + size > self.cfg.max_bytes):
            self.close()
        if self._writer is None:
            name = f"{self.cfg.prefix}-{len(self.shards):06d}.tar"
            self._ctx = atomic_open(self.out_dir / name, "wb")
            self._writer = TarWriter(self._ctx.__enter__())
            self.shards.append({"name": name, "samples": 0, "bytes": 0})
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # closes the tar stream but not our temp file
        self._ctx.__exit__(None, None, None)  # fsync + rename into place
        self.shards[-1].update(samples=self._count, bytes=(self.out_dir / self.shards[-1]["name"]).stat().st_size)
        self._writer = self._ctx = None
        self._count = self._bytes = 0

    def abort(self) -> None:
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file
            self.shards.pop()


def make_shards(
    images: str | Path,
    captions: str | Path,
    out_dir: str | Path,
    cfg: ShardWriterConfig = ShardWriterConfig(),
    *,
    progress: bool = True,
) -> Manifest:
    """Write shards + manifest; rows whose image is missing/unreadable or caption empty are skipped and counted."""

    images, captions, out_dir = Path(images), Path(captions), Path(out_dir)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(source={"images": str(images), "captions": str(captions)})
    sink = _ShardSink(out_dir, cfg)
    try:
        for row in tqdm(list(read_captions(captions)), desc="shards", unit="img", disable=not progress):
            _add_row(row, images, captions, sink, manifest, cfg)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    manifest.shards, manifest.created = sink.shards, time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(out_dir / MANIFEST, json.dumps(asdict(manifest), indent=2))
    return manifest


def _add_row(
    row: dict[str, Any], images: Path, captions: Path, sink: _ShardSink, manifest: Manifest, cfg: ShardWriterConfig
) -> None:
    rel = _column(row, PATH_COLUMNS, "image path", captions)
    caption = _column(row, CAPTION_COLUMNS, "caption", captions).strip()
    kind = None
    if not caption:
        kind = "empty_caption"
    elif not (images / rel).is_file():
        kind = f"missing_{cfg.media}"
    if kind is None:
        try:
            ext, data = SHARD_MEDIA.get(cfg.media).builder(images / rel, cfg.verify_images)
        except Exception as exc:  # unreadable media: PIL and decord raise many types
            log.warning("skipping %s: %s", rel, exc)
            kind = f"bad_{cfg.media}"
    if kind is not None:
        manifest.skipped[kind] = manifest.skipped.get(kind, 0) + 1
        return
    extra = {k: v for k, v in row.items() if k not in PATH_COLUMNS + CAPTION_COLUMNS}
    meta = json.dumps({"caption": caption, "source": rel, **extra}).encode()
    key = f"{manifest.samples:09d}"
    sink.write({"__key__": key, ext: data, "txt": caption.encode(), "json": meta}, len(data) + len(meta) + 1536)
    manifest.samples += 1


def load_manifest(out_dir: str | Path) -> Manifest:
    with open(Path(out_dir) / MANIFEST, encoding="utf-8") as f:
        return Manifest(**json.load(f))


SHARD_NAME = re.compile(r"[^/\s]+\.tar\b")


def shard_name(url: str) -> str:
    """A shard's identity across spellings: its ``*.tar`` file name (``/data/s/shard-000003.tar``,
    ``pipe:aws s3 cp s3://b/shard-000003.tar -`` -> ``shard-000003.tar``); the URL itself otherwise."""
    found = SHARD_NAME.findall(str(url))
    return found[-1] if found else str(url)


def read_keep_list(path: str | Path) -> tuple[set, bool]:
    """A keep-list parquet (``retrieval dedup`` / ``retrieval filter``) -> (wanted, by_shard): the
    ``(shard name, key)`` pairs when it has a ``shard`` column, else its keys (which must be unique)."""

    table = pq.read_table(path)
    if "key" not in table.column_names:
        raise ValueError(f"{path}: a keep-list needs a 'key' column (have {', '.join(table.column_names)})")
    keys = [str(k) for k in table.column("key").to_pylist()]
    if "shard" in table.column_names:
        return {(shard_name(s), k) for s, k in zip(table.column("shard").to_pylist(), keys)}, True
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: keys repeat and there is no 'shard' column to tell them apart")
    return set(keys), False


def filter_shards(
    spec: str,
    keep: str | Path,
    out_dir: str | Path,
    cfg: ShardWriterConfig = ShardWriterConfig(),
    *,
    progress: bool = True,
) -> Manifest:
    """Copy the samples of ``spec`` that the keep-list names, every member unchanged, into new shards
    (each atomic) and ``manifest.json`` (written last: the folder's done marker). Kept entries that no
    shard holds are counted (``missing``); unreadable shards and unsafe members are skipped and counted."""

    wanted, by_shard = read_keep_list(keep)
    out_dir = Path(out_dir)
    _clear_filtered(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(source={"shards": spec, "keep": str(keep)})
    errors, sink, found = ErrorCounter("skip", None), _ShardSink(out_dir, cfg), set()
    try:
        samples = read_samples(expand_shards(spec, "shards"), errors.handler)
        for sample in tqdm(samples, desc="filter", unit="sample", disable=not progress):
            ident = (shard_name(sample.get("__url__", "")), sample["__key__"]) if by_shard else sample["__key__"]
            if ident not in wanted or ident in found:
                errors.note("not_kept" if ident not in wanted else "repeated_key")
                continue
            found.add(ident)
            members = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            sink.write(members, sum(len(v) for v in members.values() if isinstance(v, bytes)) + 1536)
            manifest.samples += 1
        sink.close()
    except BaseException:
        sink.abort()
        raise
    manifest.skipped.update(errors.counts)
    if len(found) < len(wanted):
        manifest.skipped["missing"] = len(wanted) - len(found)
    manifest.shards, manifest.created = sink.shards, time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(out_dir / MANIFEST, json.dumps(asdict(manifest), indent=2))
    return manifest


def _clear_filtered(out_dir: Path) -> None:
    """An earlier ``filter_shards`` output is replaced (manifest first: the folder stops being done);
    any other non-empty folder is refused, untouched."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    try:
        old = load_manifest(out_dir)
    except (OSError, ValueError, TypeError):
        old = None
    if old is None or "keep" not in old.source:
        raise FileExistsError(f"{out_dir} is not empty and not an earlier `shards filter` output; choose another --out")
    (out_dir / MANIFEST).unlink()
    for shard in old.shards:
        (out_dir / shard["name"]).unlink(missing_ok=True)
