"""Curating a collection with its embeddings: near-duplicate removal and CLIP-score filtering.

Both read an embedding folder (``retrieval embed``) and write a *keep-list*: a parquet of the items
to keep (``id``, ``key``, ``shard`` (the source the item was embedded from), ``source``,
``caption``, and the job's own columns), which ``mmpretrain shards filter SHARDS --keep KEEP``
applies to write cleaned shards. Beside it go ``<keep>.report.json`` (counts, settings, timing),
for dedup ``<keep>.groups.parquet`` (every member of a group: id, key, shard, group, kept), and for
filtering ``<keep>.hist.png``, a histogram of the scores with the threshold drawn.

    dedup    near-duplicate pairs are the pairs with cosine similarity >= ``threshold`` (clip-retrieval's
             0.94): found by exact range search (FAISS ``IndexFlatIP``, every pair) or, with an index
             over the same embeddings (``--index``, any type, on-disk too), by its k nearest neighbours
             per item kept above the threshold. Groups are the connected components of those pairs
             (scipy); one keeper per group by a rule of ``KEEP_RULES`` (``first``: first in source
             order; ``resolution``: most pixels, then first).
    filter   an item's CLIP score is the cosine similarity of its embedding and its caption's under
             the model that embedded it (LAION kept >= 0.28 with ViT-B/32); items without a caption are
             dropped and counted; ``exclude`` text queries drop the items whose embedding is within
             ``exclude_threshold`` of any of them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmpretrain import api
from retrieval.jobs.dedup import NEAR_DUPLICATE, components, range_pairs
from retrieval.jobs.embed import EmbedError, load_embeddings, part_name
from retrieval.jobs.index import open_index
from retrieval.jobs.models import header_model
from retrieval.options import option

log = logging.getLogger(__name__)
# name -> fn(member ids (sorted), meta) -> the keeper's id. Example: a group and the keeper it picks.
KEEP_RULES = api.Registry("dedup keep rule")


@KEEP_RULES.register("first", example={"group": [3, 7, 9], "width": [10, 40, 40], "height": [10, 40, 40], "keeps": 3})
def keep_first(ids: np.ndarray, meta: dict) -> int:
    """The first item in source order (the lowest id)."""
    return int(ids[0])


@KEEP_RULES.register(
    "resolution",
    example={"group": [3, 7, 9], "width": [10, 40, 40], "height": [10, 40, 40], "keeps": 7},
    needs_sizes=True,
)
def keep_resolution(ids: np.ndarray, meta: dict) -> int:
    """The item with the most pixels (width x height, as decoded); ties go to the first."""
    pixels = meta["width"][ids].astype(np.int64) * meta["height"][ids]
    return int(ids[int(np.argmax(pixels))])  # argmax takes the first maximum


def item_table(emb):
    """The embeddings' metadata with ``id`` and ``shard`` (the source each item's part was embedded from)."""

    table = emb.meta()
    names = {part_name(i): src for i, src in enumerate(emb.header["sources"])}
    shards = np.concatenate([[names[p.name]] * c for p, c in zip(emb.parts, emb.counts)]) if emb.parts else []
    table = table.append_column("shard", pa.array(list(shards), pa.string()))
    return table.add_column(0, "id", pa.array(np.arange(emb.n, dtype=np.int64)))


def write_keep(table, ids: np.ndarray, out: Path, extra: dict[str, np.ndarray], report: dict) -> dict:
    """The keep-list (``table``'s rows ``ids`` plus ``extra`` columns) and its report, atomically."""

    keep_cols = [c for c in ("id", "key", "shard", "source", "caption", "width", "height") if c in table.column_names]
    kept = table.select(keep_cols).take(pa.array(ids))
    for name, values in extra.items():
        kept = kept.append_column(name, pa.array(values))
    out.parent.mkdir(parents=True, exist_ok=True)
    with api.files.atomic_open(out, "wb") as f:
        pq.write_table(kept, f)
    api.files.atomic_write_text(report_path(out), json.dumps(report, indent=2))
    return report


def report_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.report.json")


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = option(NEAR_DUPLICATE, help="cosine similarity at or above which two items are near-duplicates")
    keep: str = option("first", help="which item of a group stays", choices=lambda: KEEP_RULES.names())
    index: str | None = option(None, help="index folder over these embeddings: search its kNN instead of every pair")
    k: int = option(32, help="neighbours per item with --index", flag="-k")
    batch: int = 4096  # queries per search call

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], not {self.threshold}")
        KEEP_RULES.get(self.keep)
        if self.k < 2 or self.batch < 1:
            raise ValueError("k must be >= 2 and batch >= 1")


def exact_pairs(emb, threshold: float, batch: int, bar) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) with similarity >= threshold, by exact range search (all vectors in RAM)."""
    vectors = emb.array()
    flat = faiss.IndexFlatIP(emb.dim)
    flat.add(vectors)
    rows, cols = [], []
    for start in range(0, emb.n, batch):
        pair_rows, pair_cols = range_pairs(flat, vectors[start : start + batch], threshold, start)
        rows.append(pair_rows), cols.append(pair_cols)
        bar.update(min(batch, emb.n - start))
    none = [np.zeros(0, np.int64)]  # an empty collection has no pairs
    return np.concatenate(none + rows), np.concatenate(none + cols)


def index_pairs(emb, folder: str, threshold: float, k: int, batch: int, bar) -> tuple[np.ndarray, np.ndarray]:
    """Pairs among each item's k nearest neighbours on an index over the same embeddings, >= threshold."""

    loaded = open_index(folder)
    here = [(loaded.folder / e).resolve() for e in loaded.header["embeddings"]]
    if here != [emb.folder.resolve()] or loaded.ntotal != emb.n:
        raise EmbedError(
            f"{folder} indexes {', '.join(map(str, here))} ({loaded.ntotal} vectors), not {emb.folder} ({emb.n}); "
            "dedup needs an index built over exactly these embeddings"
        )
    rows, cols = [], []
    for start, part in emb.chunks():
        for a in range(0, len(part), batch):
            q = part[a : a + batch]
            sims, ids = loaded.index.search(q, min(k, emb.n))
            owner = np.repeat(np.arange(start + a, start + a + len(q)), ids.shape[1]).reshape(ids.shape)
            hit = (sims >= threshold) & (ids >= 0) & (ids != owner)
            rows.append(np.minimum(owner, ids)[hit]), cols.append(np.maximum(owner, ids)[hit])
            bar.update(len(q))
    none = [np.zeros(0, np.int64)]  # an empty collection has no pairs
    return np.concatenate(none + rows), np.concatenate(none + cols)


def dedup(embeddings: str | Path, out: str | Path, cfg: DedupConfig = DedupConfig(), *, progress=True) -> dict:
    """Near-duplicate groups of an embedding folder and a keep-list with one keeper per group."""

    emb, out, start = load_embeddings(embeddings), Path(out), time.perf_counter()
    table = item_table(emb)
    meta = {c: np.asarray(table.column(c).fill_null(0)) for c in ("width", "height") if c in table.column_names}
    if KEEP_RULES.get(cfg.keep).attrs.get("needs_sizes") and not (meta and meta["width"].any()):
        raise EmbedError(f"{embeddings}: no image sizes recorded (video/audio, or embedded before sizes were kept)")
    with tqdm(total=emb.n, desc="dedup", unit="item", disable=not progress) as bar:
        pairs = (
            index_pairs(emb, cfg.index, cfg.threshold, cfg.k, cfg.batch, bar)
            if cfg.index
            else exact_pairs(emb, cfg.threshold, cfg.batch, bar)
        )
    search_s = time.perf_counter() - start
    labels = components(emb.n, *pairs)
    sizes = np.bincount(labels)
    keep = np.ones(emb.n, bool)
    rule = KEEP_RULES.get(cfg.keep).builder
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum([0, *sizes])
    for g in np.nonzero(sizes > 1)[0]:
        members = order[bounds[g] : bounds[g + 1]]
        keep[members] = False
        keep[rule(members, meta)] = True
    ids = np.nonzero(keep)[0]
    histogram = {str(s): int(c) for s, c in zip(*np.unique(sizes[sizes > 1], return_counts=True))}
    report = {
        "embeddings": str(embeddings),
        "items": emb.n,
        "kept": len(ids),
        "removed": emb.n - len(ids),
        "pairs": len(pairs[0]),
        "groups": int((sizes > 1).sum()),
        "group_sizes": histogram,
        "threshold": cfg.threshold,
        "keep_rule": cfg.keep,
        "method": f"index {cfg.index} (k={cfg.k})" if cfg.index else "exact range search",
        "search_seconds": round(search_s, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_groups(table, labels, sizes, keep, groups_path(out))
    return write_keep(table, ids, out, {"group_size": sizes[labels[ids]].astype(np.int32)}, report)


def groups_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.groups.parquet")


def write_groups(table, labels: np.ndarray, sizes: np.ndarray, keep: np.ndarray, path: Path) -> None:
    """Every item of a near-duplicate group (size > 1): id, key, shard, group, kept: what to inspect."""

    grouped = np.nonzero(sizes[labels] > 1)[0]
    rows = table.select(["id", "key", "shard"]).take(pa.array(grouped))
    rows = rows.append_column("group", pa.array(labels[grouped].astype(np.int64)))
    rows = rows.append_column("kept", pa.array(keep[grouped]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with api.files.atomic_open(path, "wb") as f:
        pq.write_table(rows, f)


@dataclass(frozen=True)
class FilterConfig:
    min_score: float = option(0.28, help="lowest CLIP score (embedding . caption embedding) kept")
    exclude: tuple[str, ...] = option((), help="drop items matching this text query", metavar="TEXT")
    exclude_threshold: float = option(0.25, help="similarity to an --exclude query at or above which an item goes")
    model: str | None = None  # the scoring model (default: the one the embeddings record; its id must match)
    backend: str | None = None  # its encoding backend (default: torch, or the one the embeddings record)
    batch_size: int = 256  # captions per text-encoder call
    device: str = option("cpu", help="torch device for the text encoder")


def scoring_model(emb, cfg: FilterConfig):
    """The model that embedded ``emb`` (or ``cfg.model``, refused unless its id matches: scores of
    another model's image and text spaces mean nothing)."""
    model = header_model(emb.header, cfg.model, cfg.backend).to(api.resolve_device(cfg.device, what="--device"))
    if "text" not in model.modalities:
        raise EmbedError(f"{cfg.model or emb.header['model']}: no text tower to score captions with")
    mid = api.model_id(model)
    if mid != emb.header["model_id"]:
        raise EmbedError(
            f"{emb.folder} was embedded by model {emb.header['model_id']}; {cfg.model or emb.header['model']} "
            f"is {mid}: score with the embedding model (or re-embed)"
        )
    return model


def clip_scores(emb, captions: list, model, cfg: FilterConfig, bar) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP score per item, NaN without a caption; best similarity to any exclude query, or -inf)."""

    scores, excl = np.full(emb.n, np.nan, np.float32), np.full(emb.n, -np.inf, np.float32)
    queries = api.encode_texts(model, list(cfg.exclude)).float().cpu().numpy() if cfg.exclude else None
    for start, part in emb.chunks():
        caps = captions[start : start + len(part)]
        for a in range(0, len(part), cfg.batch_size):
            rows = [i for i in range(a, min(a + cfg.batch_size, len(part))) if caps[i] and caps[i].strip()]
            if rows:
                with torch.no_grad():
                    text = api.encode_texts(model, [caps[i] for i in rows]).float().cpu().numpy()
                scores[start + np.array(rows)] = np.einsum("ij,ij->i", part[rows], text)
            bar.update(min(cfg.batch_size, len(part) - a))
        if queries is not None:
            excl[start : start + len(part)] = (part @ queries.T).max(1)
    return scores, excl


def filter_items(embeddings: str | Path, out: str | Path, cfg: FilterConfig = FilterConfig(), *, progress=True):
    """The keep-list of items whose CLIP score reaches ``cfg.min_score`` and that no exclude query
    matches, with their scores; the report and a score histogram (``<keep>.hist.png``) beside it."""

    emb, out, start = load_embeddings(embeddings), Path(out), time.perf_counter()
    model, table = scoring_model(emb, cfg), item_table(emb)
    with tqdm(total=emb.n, desc="CLIP scores", unit="item", disable=not progress) as bar:
        scores, excl = clip_scores(emb, table.column("caption").to_pylist(), model, cfg, bar)
    has_caption = ~np.isnan(scores)
    excluded = excl >= cfg.exclude_threshold
    keep = has_caption & ~excluded & (np.nan_to_num(scores, nan=-2.0) >= cfg.min_score)
    ids = np.nonzero(keep)[0]
    valid = scores[has_caption]
    quantiles = {f"p{q}": float(np.percentile(valid, q)) for q in (1, 5, 25, 50, 75, 95, 99)} if len(valid) else {}
    report = {
        "embeddings": str(embeddings),
        "model": str(cfg.model or emb.header["model"]),
        "items": emb.n,
        "kept": len(ids),
        "no_caption": int((~has_caption).sum()),
        "below_min_score": int((has_caption & (np.nan_to_num(scores, nan=2.0) < cfg.min_score)).sum()),
        "excluded": int(excluded.sum()),
        "min_score": cfg.min_score,
        "exclude": list(cfg.exclude),
        "exclude_threshold": cfg.exclude_threshold,
        "score_quantiles": quantiles,
        "seconds": round(time.perf_counter() - start, 3),
    }
    report["histogram"] = str(plot_scores(valid, cfg.min_score, out.with_name(f"{out.stem}.hist.png"), report))
    return write_keep(table, ids, out, {"clip_score": scores[ids]}, report)


def plot_scores(scores: np.ndarray, threshold: float, path: Path, report: dict) -> Path:
    """A histogram of the CLIP scores with the threshold drawn and the kept share named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores, bins=60, color="#4c72b0", alpha=0.85)
    ax.axvline(threshold, color="#c44e52", linewidth=2, label=f"min score {threshold:g}")
    kept = report["kept"] / max(report["items"], 1)
    ax.set_title(f"CLIP scores of {report['items']:,} items: {100 * kept:.1f}% kept")
    ax.set_xlabel("cosine similarity of the item and its caption")
    ax.set_ylabel("items")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with api.files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
