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

from mmpretrain.data.ops import EVAL_CAPTION_KEYS, read_captions
from mmpretrain.eval.embed import embed_shards
from mmpretrain.eval.inputs import Views, encode_texts
from mmpretrain.eval.metrics import classification_metrics, recall_row
from mmpretrain.eval.sets import ShardSet, sample_meta
from mmpretrain.eval.zeroshot import ZeroShotClassifier
from mmpretrain.utils.io import atomic_open


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
    """One pass over ``data`` (``embed.embed_shards``): every modality's embedding (views averaged), each
    sample's captions and json label fields; a sample lacking a field or not decoding is skipped and counted."""

    def label(sample: dict) -> tuple[list[str], list[str]] | None:
        meta = sample_meta(sample)
        if any(not isinstance(meta.get(f), str) for f in data.fields):
            return None
        return [meta[f] for f in data.fields], read_captions(sample, EVAL_CAPTION_KEYS, strict=False)

    run = embed_shards(
        model, data.shards(), modalities, label, name=data.name, views=views, batch_size=batch_size, progress=progress
    )
    labels = {f: [values[i] for values, _ in run.labels] for i, f in enumerate(data.fields)}
    return ShardEmbeddings(data, run.emb, [caps for _, caps in run.labels], labels, run.skipped)


def zeroshot_by_label(model, se: ShardEmbeddings, modality: str, label: str, templates) -> dict[str, Any]:
    """Zero-shot top-1/top-5/mean per-class recall of ``modality`` against ``label``'s classes."""

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

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
