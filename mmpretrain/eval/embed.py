"""The one read -> decode -> embed loop of evaluation, with a label hook.

Every labelled evaluation goes through ``embed_shards``: labelled sets (``sets``: image folders by
their layout, CLIP_benchmark ``wds`` folders, our ``shards:FIELD``), the media evaluation (several
modalities of each sample) and caption retrieval. A reader turns the sources into raw samples (shards:
``read_shards``; media files: ``FileReader``); the hook reads what a sample is labelled with (a class
index, json fields, its captions); a sample it returns None for is skipped and counted, as is one that
does not decode or is over the member cap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from mmpretrain.data.stream import ErrorCounter, process_sample, read_samples
from mmpretrain.eval.inputs import EvalInput, Views, capped_file_sample, collate, embed_views

Label = Callable[[dict], Any]  # raw sample -> its label (anything), or None: skip it
Reader = Callable[[list[str], ErrorCounter], Iterator[dict]]  # sources -> raw samples, failures counted


def read_shards(shards: list[str], errors: ErrorCounter) -> Iterator[dict]:
    """The samples of webdataset shards (``read_samples``: bounded members, failures counted)."""
    return read_samples(shards, errors.handler)


@dataclass(frozen=True)
class FileReader:
    """Media files of ``modality`` as raw samples (``__ref__``: the path); a file over the member cap
    is skipped as ``oversized_member``, one that cannot be read as ``read_error``."""

    modality: str = "image"

    def __call__(self, paths: list[str], errors: ErrorCounter) -> Iterator[dict]:
        for path in paths:
            try:
                sample = capped_file_sample(Path(path), self.modality, errors)
            except OSError as exc:
                errors.record("read_error", exc)
                continue
            if sample is not None:
                yield {**sample, "__ref__": path}


@dataclass
class ShardPass:
    """One pass over shards: ``emb[m]`` (N, E) float32 on CPU, L2-normalised (views averaged) per
    modality; ``labels[i]``, what the hook gave sample i; ``refs[i]``: ``shard#key``; ``skipped``:
    samples left out, by kind."""

    emb: dict[str, torch.Tensor]
    labels: list[Any]
    refs: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


class _Items(IterableDataset):
    """(decoded sample, label, ref) of ``shards``, every modality of ``inputs`` decoded; DataLoader
    workers take every num_workers-th shard. The skip counts come last, as ``("__skipped__", counts)``."""

    def __init__(self, shards: list[str], inputs: dict[str, EvalInput], label: Label, skip_kind: str, read: Reader):
        self.shards, self.inputs, self.label, self.skip_kind, self.read = shards, inputs, label, skip_kind, read

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        errors = ErrorCounter("skip", None)
        for sample in self.read(mine, errors):
            label = self.label(sample)
            if label is None:
                errors.note(self.skip_kind)
                continue
            out = self._decode(sample, errors)
            if out is not None:
                yield out, label, sample.get("__ref__") or f"{sample.get('__url__')}#{sample.get('__key__')}"
        yield "__skipped__", dict(errors.counts), None

    def _decode(self, sample: dict, errors: ErrorCounter) -> dict | None:
        """Each modality's ops on its own copy of ``sample``, merged; None (counted once) if any fails."""
        out: dict = {}
        for inputs in self.inputs.values():
            part = process_sample(inputs.ops, dict(sample), errors)
            if part is None:
                return None
            out.update(part)
        return out


def embed_shards(
    model,
    shards: list[str],
    modalities: Sequence[str],
    label: Label,
    *,
    name: str = "shards",
    skip_kind: str = "missing_label",
    views: Views = Views(),
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    read: Reader = read_shards,
) -> ShardPass:
    """Read, decode (the evaluation inputs of each of ``modalities``) and embed every sample of
    ``shards`` (the sources ``read`` reads: shards by default, or media files) that ``label`` labels; one
    it returns None for is counted as ``skip_kind``. ``workers`` decoding processes (a hook with state
    needs 0). ``ValueError`` when no sample is usable."""
    inputs = {m: EvalInput(model, m, views) for m in modalities}
    items = _Items(shards, inputs, label, skip_kind, read)
    loader = DataLoader(items, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    out, pending = ShardPass({}, [], []), []

    def flush() -> None:
        for m in modalities:  # metrics run on CPU, in float32, whatever device the model is on
            chunks[m].append(embed_views(model, m, collate([p[0] for p in pending], [m])).float().cpu())
        out.labels.extend(p[1] for p in pending)
        out.refs.extend(p[2] for p in pending)
        pending.clear()

    for item in tqdm(loader, desc=f"embed {name}", unit="item", disable=not progress):
        if isinstance(item[0], str):  # a worker's skip counts, after its items
            for kind, count in item[1].items():
                out.skipped[kind] = out.skipped.get(kind, 0) + count
            continue
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not out.labels:
        raise ValueError(f"{name}: no usable item in {len(shards)} source(s) ({out.skipped or 'none'} skipped)")
    out.emb = {m: torch.cat(c) for m, c in chunks.items()}
    return out
