"""Embedding jobs: a collection -> embedding parts + parquet metadata + thumbnails.

Output folder::

    embeddings.json            model id, dimension, dtype, modality, the sources (one per part)
    parts/part-00042.npy       (n, E) float16/float32, L2-normalised, for source 42
    parts/part-00042.thumbs    concatenated JPEG thumbnails
    parts/part-00042.parquet   key, caption, source, modality, thumb_offset, thumb_len, width, height
                               (an image's decoded size; 0 for video and audio; written last:
                               the part's "done" marker); its schema metadata ``mmpretrain`` holds
                               the part's source, item count and skipped-item counts by kind
    parts/part-00042.failed.json  a source that could not be read to its end (missing, truncated,
                               stalled): why, and the counts; no parquet, so a re-run retries it

One part per source (shard or image folder). A part is done only when its whole source was read:
unreadable *items* are skipped and counted in the part, but a source that ends early leaves no
parquet. Under ``torchrun`` rank r embeds sources r, r + world, ... with no communication; a killed
job re-run with the same arguments skips finished parts and retries failed ones. Every file is
written to a temp name, fsynced and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmpretrain import api
from mmpretrain.types import MODALITIES
from retrieval.errors import EmbedError
from retrieval.options import RAY_ADDRESS, option

log = logging.getLogger(__name__)
FORMAT = "mmpretrain-embeddings/1"
META_COLUMNS = ("key", "caption", "source", "modality", "thumb_offset", "thumb_len", "width", "height")
# name -> fn(cfg, progress) -> stats; "local" here, "ray" in retrieval.jobs.engines. Example: the extra it needs.
EMBED_ENGINES = api.Registry("embed engine")


@dataclass(frozen=True)
class EmbedConfig:
    model: str
    data: str = option(help="shard spec or image folder")
    out: str = option(help="output folder")
    backend: str = "torch"  # the encoding backend (api.list_backends()): torch, or onnxruntime with an ONNX export
    batch_size: int = option(64, help="items per encoder call")
    dtype: str = option("float16", help="stored vector type", choices=("float16", "float32"))
    thumb_size: int = option(128, help="thumbnail side in pixels (0: none)")
    device: str = option("auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:0, ...")
    modality: str = option(
        "image",
        help="what to embed from each item (video/audio: shards); text queries then search it (text->video, "
        "text->audio)",
        choices=lambda: [m for m in MODALITIES if m != "text"],
    )
    strict: bool = option(False, help="stop at the first skipped item or unreadable shard")
    engine: str = option(
        "local",
        help="local: this process (torchrun ranks split the sources); ray: a Ray cluster (pip install -e '.[ray]')",
        choices=lambda: EMBED_ENGINES.names(),
    )
    address: str | None = option(None, help=RAY_ADDRESS)
    actors: int = option(0, help="ray: model actors (0: one per GPU of the cluster, else one CPU actor)")
    actor_cpus: int = option(1, help="ray: CPUs reserved per CPU model actor")
    actor_threads: int = option(
        0, help="ray: torch threads per CPU model actor (0: its node's cores, shared by its actors)"
    )
    decoders: int = option(0, help="ray: decoding tasks in flight (0: the CPUs the actors leave, >= 2)")
    retries: int = option(3, help="ray: retries of a task or actor call whose worker died")

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise EmbedError(f"dtype must be float16 or float32, not {self.dtype!r}")
        if self.batch_size < 1:
            raise EmbedError("batch_size must be >= 1")
        if self.modality not in MODALITIES or self.modality == "text":
            media = ", ".join(m for m in MODALITIES if m != "text")
            raise EmbedError(f"modality {self.modality!r}: collections of {media} can be embedded")
        if self.backend not in api.list_backends():
            raise EmbedError(f"backend {self.backend!r}: one of {', '.join(api.list_backends())}")
        if self.engine not in EMBED_ENGINES:
            raise EmbedError(f"engine {self.engine!r}: one of {', '.join(EMBED_ENGINES.names())}")
        if min(self.actors, self.actor_threads, self.decoders, self.retries) < 0 or self.actor_cpus < 1:
            raise EmbedError("actors, actor_threads, decoders and retries must be >= 0, actor_cpus >= 1")


def part_name(i: int) -> str:
    return f"part-{i:05d}"


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _device(cfg: EmbedConfig) -> torch.device:
    return api.resolve_device(cfg.device, what="--device")  # auto: this rank's GPU, else the CPU (says why)


def stored_model_ref(ref: str) -> str:
    """The model reference as the header keeps it: a path made absolute (``runs/x``, ``local-dir:rel``), so
    that an index searched from another directory finds it; a model name as given."""
    prefix = "local-dir:" if ref.startswith("local-dir:") else ""
    path = Path(ref[len(prefix) :])
    return prefix + str(path.resolve()) if path.exists() else ref


def _write_header(cfg: EmbedConfig, out: Path, model_id: str, dim: int, sources: list[str]) -> None:
    header = {
        "format": FORMAT,
        "model": stored_model_ref(cfg.model),
        "backend": cfg.backend,
        "model_id": model_id,
        "dim": dim,
        "dtype": cfg.dtype,
        "modality": cfg.modality,
        "data": cfg.data,
        "sources": sources,
        "thumb_size": cfg.thumb_size,
    }
    path = out / "embeddings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("model_id", "dtype", "sources"):
            if old.get(key) != header[key]:
                raise EmbedError(
                    f"{out} holds a job with a different {key} ({str(old.get(key))[:80]!r}); "
                    f"use another --out or delete it"
                )
        return
    api.files.atomic_write_text(path, json.dumps(header, indent=2))


PART_META = b"mmpretrain"  # parquet schema metadata key of a part's summary


class PartWriter:
    """One part's rows, thumbnails and vectors as its batches are embedded (in source order), then
    its files: the part, or ``part.failed.json`` when the source was not read to its end."""

    def __init__(self, cfg: EmbedConfig, source: str, part: Path, dim: int):
        self.cfg, self.source, self.part, self.dim = cfg, source, part, dim
        self.vectors: list[np.ndarray] = []
        self.rows: dict[str, list] = {c: [] for c in META_COLUMNS}
        self.thumbs: list[bytes] = []
        self.offset = 0

    @property
    def items(self) -> int:
        return len(self.rows["key"])

    def add(self, batch, vectors: np.ndarray) -> None:
        """A batch (``ItemBatch``) and its (B, E) embeddings."""
        self.vectors.append(vectors)
        sizes = batch.sizes or [(0, 0)] * len(batch.keys)
        for key, caption, src, thumb, (w, h) in zip(batch.keys, batch.captions, batch.sources, batch.thumbnails, sizes):
            values = (key, caption, src, self.cfg.modality, self.offset, len(thumb), w, h)
            for col, val in zip(META_COLUMNS, values):
                self.rows[col].append(val)
            self.thumbs.append(thumb)
            self.offset += len(thumb)

    def finish(self, last) -> dict:
        """Write the part (``last``: the source's last batch, with its counts); returns its summary."""
        summary = {"source": self.source, "items": self.items, "skipped": dict(last.skipped), "complete": last.complete}
        if self.cfg.strict and (summary["skipped"] or not summary["complete"]):
            raise EmbedError(
                f"{self.source}: {json.dumps(summary['skipped'])} skipped (--strict); nothing written for it"
            )
        if not summary["complete"]:
            api.files.atomic_write_text(self.part.with_suffix(".failed.json"), json.dumps(summary, indent=1))
            return summary
        emb = np.concatenate(self.vectors) if self.vectors else np.zeros((0, self.dim), np.float32)
        _write_part(self.part, emb, self.rows, b"".join(self.thumbs), self.cfg.dtype, summary)
        self.part.with_suffix(".failed.json").unlink(missing_ok=True)
        return summary


def embed_part(model, cfg: EmbedConfig, source: str, part: Path, on_batch=None) -> dict:
    """Embed one source into ``part``.{npy,thumbs,parquet}; returns its summary (``items``,
    ``skipped`` by kind, ``complete``). An incomplete source writes ``part.failed.json`` instead.
    ``on_batch(n)`` is called with each batch's item count (a progress bar's ``update``)."""
    writer, last = PartWriter(cfg, source, part, model.embed_dim), None
    for batch in api.item_batches(
        model, source, batch_size=cfg.batch_size, thumb_size=cfg.thumb_size, modality=cfg.modality
    ):
        last = batch
        if batch.keys:
            writer.add(batch, api.encode(model, cfg.modality, batch.inputs).float().cpu().numpy())
            if on_batch is not None:
                on_batch(len(batch.keys))
    return writer.finish(last)


def _write_part(part: Path, emb: np.ndarray, rows: dict[str, list], thumbs: bytes, dtype: str, summary: dict) -> None:
    """The part's files, each atomic and durable; the parquet (the done marker) last."""

    with api.files.atomic_open(part.with_suffix(".thumbs"), "wb") as f:
        f.write(thumbs)
    with api.files.atomic_open(part.with_suffix(".npy"), "wb") as f:
        np.save(f, emb.astype(dtype))
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("source", pa.string()),
            ("modality", pa.string()),
            ("thumb_offset", pa.int64()),
            ("thumb_len", pa.int32()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ],
        metadata={PART_META: json.dumps(summary).encode()},
    )
    with api.files.atomic_open(part.with_suffix(".parquet"), "wb") as f:
        pq.write_table(pa.table(rows, schema=schema), f)


def part_summary(part: Path) -> dict:
    """A finished part's summary (source, items, skipped counts) from its parquet metadata."""

    meta = pq.read_schema(part.with_suffix(".parquet")).metadata or {}
    return json.loads(meta[PART_META]) if PART_META in meta else {}


def run_embed(cfg: EmbedConfig, *, progress: bool = True) -> dict:
    """Embed ``cfg.data`` into ``cfg.out`` with ``cfg.engine``, skipping finished parts and retrying
    failed ones. Returns counts over the finished parts of this process's share (``items``; ``bad``:
    skipped items by kind), the sources that could not be read to their end (``failed``), and this
    run's ``embedded`` items, ``seconds`` and ``items_per_s``."""
    return EMBED_ENGINES.get(cfg.engine).builder(cfg, progress)


@dataclass
class Job:
    """An embedding job opened for writing: its folder, sources, and what the header records."""

    out: Path
    sources: list[str]
    model_id: str
    dim: int

    def part(self, i: int) -> Path:
        return self.out / "parts" / part_name(i)

    def todo(self, mine: list[int]) -> list[int]:
        """The parts of ``mine`` not finished yet (no parquet)."""
        return [i for i in mine if not self.part(i).with_suffix(".parquet").is_file()]


def open_job(cfg: EmbedConfig, model) -> Job:
    """Create (or check, when resuming) ``cfg.out`` for ``model``'s embeddings of ``cfg.data``."""
    if cfg.modality not in model.modalities:
        raise EmbedError(f"{cfg.model} has no {cfg.modality} tower (towers: {', '.join(model.modalities)})")
    out = Path(cfg.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    sources = api.expand_sources(cfg.data)
    job = Job(out, sources, api.model_id(model), model.embed_dim)
    _write_header(cfg, out, job.model_id, job.dim, sources)
    return job


def note_part(stats: dict, job: Job, i: int, summary: dict) -> None:
    """Count a part just embedded; a source not read to its end is logged and listed in ``failed``."""
    stats["embedded"] += summary["items"]
    if not summary["complete"]:
        stats["failed"][job.sources[i]] = summary["skipped"]
        log.warning(
            "%s was not read to its end (%s): part %s not written; re-run to retry",
            job.sources[i],
            json.dumps(summary["skipped"]),
            part_name(i),
        )


def job_stats(job: Job, mine: list[int], todo: list[int], **extra) -> dict:
    return {
        **extra,
        "parts": len(mine),
        "skipped_parts": len(mine) - len(todo),
        "items": 0,
        "embedded": 0,
        "bad": {},
        "failed": {},
    }


def finish_stats(stats: dict, job: Job, mine: list[int], seconds: float) -> dict:
    """Totals over the finished parts of ``mine`` (from their parquet metadata) and this run's rate."""
    stats["seconds"] = round(seconds, 2)
    for i in mine:
        if job.part(i).with_suffix(".parquet").is_file():
            summary = part_summary(job.part(i))
            stats["items"] += summary.get("items", 0)
            for kind, n in summary.get("skipped", {}).items():
                stats["bad"][kind] = stats["bad"].get(kind, 0) + n
    stats["items_per_s"] = round(stats["embedded"] / max(seconds, 1e-9), 1)
    log.info("embedded %s", json.dumps(stats))
    return stats


@EMBED_ENGINES.register("local", example={"extra": None})
def embed_local(cfg: EmbedConfig, progress: bool = True) -> dict:
    """This process (one device); under ``torchrun`` rank r takes sources r, r + world, ... with no
    communication."""

    rank, world = rank_world()
    model = api.load_model(cfg.model, backend=cfg.backend).to(_device(cfg))
    job = open_job(cfg, model)
    mine = [i for i in range(len(job.sources)) if i % world == rank]
    todo = job.todo(mine)
    stats, start = job_stats(job, mine, todo, rank=rank), time.perf_counter()
    bar = tqdm(total=None, desc=f"embed (rank {rank})", unit="item", disable=not progress or rank != 0)
    for i in todo:
        note_part(stats, job, i, embed_part(model, cfg, job.sources[i], job.part(i), on_batch=bar.update))
    bar.close()
    return finish_stats(stats, job, mine, time.perf_counter() - start)


@dataclass
class Embeddings:
    """A finished embedding job, read lazily part by part (memory-mapped): ids are row numbers
    across the parts in source order."""

    folder: Path
    header: dict
    parts: list[Path]  # part paths without suffix
    counts: list[int]

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, (n_i, E) float32) per part."""
        start = 0
        for part, count in zip(self.parts, self.counts):
            yield start, np.ascontiguousarray(np.load(part.with_suffix(".npy"), mmap_mode="r"), dtype=np.float32)
            start += count

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order) as (len(ids), E) float32."""
        bounds = np.cumsum([0, *self.counts])
        out = np.empty((len(ids), self.dim), np.float32)
        for j, part in enumerate(self.parts):
            sel = np.nonzero((ids >= bounds[j]) & (ids < bounds[j + 1]))[0]
            if len(sel):
                out[sel] = np.load(part.with_suffix(".npy"), mmap_mode="r")[ids[sel] - bounds[j]]
        return out

    def array(self) -> np.ndarray:
        return np.concatenate([c for _, c in self.chunks()]) if self.parts else np.zeros((0, self.dim), np.float32)

    def meta(self, relative_to: Path | None = None):
        """pyarrow.Table of META_COLUMNS + ``part`` (the part the thumbnails live in: its absolute path, or
        relative to ``relative_to``, as an index stores it so the two folders can move together)."""

        tables = [pq.read_table(p.with_suffix(".parquet")) for p in self.parts]
        tables = [
            t.append_column("part", pa.array([relative_path(p, relative_to)] * t.num_rows, pa.string()))
            for t, p in zip(tables, self.parts)
        ]
        return pa.concat_tables(tables, promote_options="default") if tables else None  # older parts: no width/height


def relative_path(path: Path, folder: Path | None) -> str:
    """``path`` relative to ``folder`` (``..`` allowed), or absolute when ``folder`` is None."""
    return (
        os.path.relpath(Path(path).resolve(), Path(folder).resolve())
        if folder is not None
        else str(Path(path).resolve())
    )


def load_embeddings(folder: str | Path, *, allow_partial: bool = False) -> Embeddings:
    """Open a job's finished parts in source order; missing parts are an error unless ``allow_partial``."""

    folder = Path(folder)
    if not (folder / "embeddings.json").is_file():
        raise EmbedError(f"{folder}: not an embedding job folder (no embeddings.json)")
    header = json.loads((folder / "embeddings.json").read_text())
    names = [part_name(i) for i in range(len(header["sources"]))]
    done = [folder / "parts" / n for n in names if (folder / "parts" / f"{n}.parquet").is_file()]
    if len(done) < len(names) and not allow_partial:
        failed = sorted((folder / "parts").glob("*.failed.json"))
        why = (
            (
                f"; {len(failed)} source(s) could not be read to their end (first: "
                f"{json.loads(failed[0].read_text()).get('source')}, see {failed[0].name})"
            )
            if failed
            else ""
        )
        raise EmbedError(
            f"{folder}: {len(names) - len(done)} of {len(names)} parts are not embedded yet{why}; re-run "
            f"`retrieval embed` with the same arguments to finish (finished parts are skipped, "
            f"failed ones retried)"
        )
    counts = []
    for part in done:
        n_vec = np.load(part.with_suffix(".npy"), mmap_mode="r").shape[0]
        n_rows = pq.ParquetFile(part.with_suffix(".parquet")).metadata.num_rows
        if n_vec != n_rows:
            raise EmbedError(
                f"{part}: {n_vec} vectors but {n_rows} metadata rows (corrupt part: delete its files "
                f"and re-run the embedding job)"
            )
        counts.append(n_vec)
    return Embeddings(folder, header, done, counts)


def write_vectors(
    folder: str | Path,
    vectors: np.ndarray,
    *,
    model: str = "external",
    model_id: str = "external",
    keys: list[str] | None = None,
    captions: list[str] | None = None,
    part_size: int = 100_000,
    dtype: str = "float32",
    modality: str = "vector",
) -> Embeddings:
    """Store vectors computed elsewhere (or synthetic ones) as an embedding job, so that
    ``retrieval index build`` can index them; rows are L2-normalised here. Vectors of a model's
    ``modality`` tower (``model``: its checkpoint, ``model_id``: ``api.model_id``) make an index
    that ``retrieval serve`` can query by text."""

    folder = Path(folder)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    keys = keys or [str(i) for i in range(n)]
    captions = captions or [""] * n
    starts = list(range(0, n, part_size)) or [0]
    for j, a in enumerate(starts):
        b = min(a + part_size, n)
        v = np.asarray(vectors[a:b], dtype=np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        part = folder / "parts" / part_name(j)
        with api.files.atomic_open(part.with_suffix(".npy"), "wb") as f:
            np.save(f, v.astype(dtype))
        api.files.atomic_write_bytes(part.with_suffix(".thumbs"), b"")
        table = pa.table(
            {
                "key": keys[a:b],
                "caption": captions[a:b],
                "source": [""] * (b - a),
                "modality": [modality] * (b - a),
                "thumb_offset": pa.array([0] * (b - a), pa.int64()),
                "thumb_len": pa.array([0] * (b - a), pa.int32()),
                "width": pa.array([0] * (b - a), pa.int32()),
                "height": pa.array([0] * (b - a), pa.int32()),
            }
        )
        with api.files.atomic_open(part.with_suffix(".parquet"), "wb") as f:
            pq.write_table(table, f)
    header = {
        "format": FORMAT,
        "model": stored_model_ref(model),
        "model_id": model_id,
        "dim": dim,
        "dtype": dtype,
        "modality": modality,
        "data": "vectors",
        "sources": [f"vectors[{a}:{min(a + part_size, n)}]" for a in starts],
        "thumb_size": 0,
    }
    api.files.atomic_write_text(folder / "embeddings.json", json.dumps(header, indent=2))
    return load_embeddings(folder)
