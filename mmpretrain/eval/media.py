"""Zero-shot classification and cross-modal retrieval on labelled webdataset shards, any modality.

A labelled shard set is ``[NAME@]shards[:FIELD]=SPEC``: samples carry media members (video,
audio, image), captions (``json["captions"]`` or ``txt``) and labels in ``json[FIELD]``
(e.g. ``concept``, ``motion``). One pass embeds every requested modality of every sample
(averaging evaluation views) and the captions; then

    zero-shot       per modality and label field: top-1 / top-5 / mean per-class recall against
                    prompt-ensembled class embeddings (classes: the labels present in the set);
    caption -> m    each distinct caption is a query; hits are the samples having that caption;
    class -> m      each class prompt is a query; hits are the samples of that class (for audio
                    that says only part of a caption, e.g. a spoken name);
    m -> m'         each sample's m embedding finds its own m' (video -> audio: the clip's soundtrack).
Every recall has its chance level beside it (random ranking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmpretrain.data.ops import EVAL_CAPTION_KEYS, read_captions
from mmpretrain.eval.inputs import Views, collate, embed_views, encode_texts, eval_ops
from mmpretrain.eval.metrics import classification_metrics, recall_row
from mmpretrain.eval.sets import ShardSet, sample_meta


@dataclass
class ShardEmbeddings:
    """Per-sample embeddings (N, E) by modality, captions and json labels of one shard set."""

    data: ShardSet
    emb: dict[str, torch.Tensor]
    captions: list[list[str]]
    labels: dict[str, list[str]]
    skipped: dict[str, int] = field(default_factory=dict)


def embed_shard_set(
    model,
    data: ShardSet,
    modalities: Sequence[str],
    *,
    views: Views = Views(),
    batch_size: int = 32,
    progress: bool = True,
) -> ShardEmbeddings:
    """One pass over ``data``: every modality's embedding (views averaged); bad samples skipped and counted."""
    from mmpretrain.data.loader import expand_shards
    from mmpretrain.data.stream import ErrorCounter, read_samples

    ops = {m: eval_ops(model, m, views) for m in modalities}
    errors = ErrorCounter("skip", None)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    captions, labels, pending = [], {f: [] for f in data.fields}, []

    def flush() -> None:
        for m in modalities:  # metrics run on CPU, in float32, whatever device the model is on
            chunks[m].append(embed_views(model, m, collate(pending, [m])).float().cpu())
        pending.clear()

    for sample in tqdm(
        read_samples(expand_shards(data.spec), errors.handler),
        desc=f"embed {data.name}",
        unit="sample",
        disable=not progress,
    ):
        meta, texts = sample_meta(sample), read_captions(sample, EVAL_CAPTION_KEYS, strict=False)
        missing = [f for f in data.fields if not isinstance(meta.get(f), str)]
        if missing:
            errors.record("missing_label", ValueError(f"{sample.get('__key__')}: no json field {missing[0]!r}"))
            continue
        out = _apply_all(ops, sample, modalities, errors)
        if out is None:
            continue
        pending.append(out)
        captions.append(texts)
        for f in data.fields:
            labels[f].append(meta[f])
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not captions:
        raise ValueError(f"{data.spec}: no usable sample ({dict(errors.counts)} skipped)")
    return ShardEmbeddings(data, {m: torch.cat(c) for m, c in chunks.items()}, captions, labels, dict(errors.counts))


def _apply_all(ops: dict, sample: dict, modalities: Sequence[str], errors) -> dict | None:
    """Each modality's ops on its own copy of ``sample``, merged; None (counted once) if any fails."""
    from mmpretrain.data.stream import process_sample

    out: dict = {}
    for m in modalities:
        part = process_sample(ops[m], dict(sample), errors)
        if part is None:
            return None
        out.update(part)
    return out


def zeroshot_by_label(model, se: ShardEmbeddings, modality: str, label: str, templates) -> dict[str, Any]:
    """Zero-shot top-1/top-5/mean per-class recall of ``modality`` against ``label``'s classes."""
    from mmpretrain.eval.zeroshot import ZeroShotClassifier

    classes = sorted(set(se.labels[label]))
    clf = ZeroShotClassifier(model, classes, templates, modality=modality, progress=False)
    y = torch.tensor([classes.index(v) for v in se.labels[label]])
    scores = se.emb[modality] @ clf.weights.float().cpu().T
    return {
        "dataset": se.data.name,
        "modality": modality,
        "label": label,
        "n": len(y),
        "classes": len(classes),
        **classification_metrics(scores, y, len(classes)),
    }


def _recall_row(name: str, sim: np.ndarray, positives: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    """Recall@k of queries (rows of ``sim``) and its chance level under random ranking."""
    return {"task": name, "queries": sim.shape[0], "items": sim.shape[1], **recall_row(sim, positives, ks)}


def retrieval_rows(model, se: ShardEmbeddings, templates, ks: Sequence[int] = (1, 5, 10)) -> list[dict[str, Any]]:
    """caption -> m, class -> m (per label field) and m -> m' recall@k rows (see the module docstring)."""
    from mmpretrain.eval.zeroshot import ZeroShotClassifier

    rows = []
    queries = sorted({c for caps in se.captions for c in caps[:1]})  # each sample's first caption is canonical
    q_emb = encode_texts(model, queries).float().cpu()
    owners = np.array([[q in caps for caps in se.captions] for q in queries])
    for m, emb in se.emb.items():
        rows.append({"dataset": se.data.name, **_recall_row(f"caption->{m}", (q_emb @ emb.T).numpy(), owners, ks)})
        for label, values in se.labels.items():
            classes = sorted(set(values))
            w = ZeroShotClassifier(model, classes, templates, modality=m, progress=False).weights.float().cpu()
            pos = np.array(classes)[:, None] == np.array(values)[None, :]
            rows.append({"dataset": se.data.name, **_recall_row(f"{label}->{m}", (w @ emb.T).numpy(), pos, ks)})
    mods = list(se.emb)
    for i, a in enumerate(mods):
        for b in mods[i + 1 :]:
            eye = np.eye(len(se.captions), dtype=bool)
            rows.append(
                {"dataset": se.data.name, **_recall_row(f"{a}->{b}", (se.emb[a] @ se.emb[b].T).numpy(), eye, ks)}
            )
    return rows


def media_eval(
    model,
    data: ShardSet,
    modalities: Sequence[str],
    *,
    templates="<>",
    views: Views = Views(),
    batch_size: int = 32,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot (every modality x label field) and retrieval rows for one labelled shard set."""
    se = embed_shard_set(model, data, modalities, views=views, batch_size=batch_size, progress=progress)
    zeroshot = [zeroshot_by_label(model, se, m, f, templates) for m in modalities for f in data.fields]
    return {
        "dataset": data.name,
        "samples": len(se.captions),
        "skipped": se.skipped,
        "views": asdict(views),
        "zeroshot": zeroshot,
        "retrieval": retrieval_rows(model, se, templates, ks),
    }


def plot_media(reports: list[dict[str, Any]], path, k: int = 5) -> None:
    """One PNG: zero-shot top-1 and retrieval R@k per set, each bar beside its chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (f"{r['dataset']}\n{z['modality']} {z['label']}", z["top1"], z["chance_top1"])
        for r in reports
        for z in r["zeroshot"]
    ]
    rows += [
        (f"{r['dataset']}\n{t['task']} R@{k}", t[f"R@{k}"], t[f"R@{k}_chance"]) for r in reports for t in r["retrieval"]
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows)), 4.2))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [100 * v for _, v, _ in rows], 0.4, label="model")
    ax.bar(x + 0.2, [100 * c for _, _, c in rows], 0.4, label="chance", color="0.75")
    ax.set_xticks(x, [name for name, _, _ in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("%")
    ax.set_title(f"zero-shot top-1 and retrieval R@{k} vs chance")
    ax.legend()
    fig.tight_layout()
    from mmpretrain.utils.io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
