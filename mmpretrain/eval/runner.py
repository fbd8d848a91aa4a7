"""Evaluation jobs: zero-shot classification, image-text retrieval, robustness reports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpretrain.data.loader import expand_shards
from mmpretrain.data.ops import EVAL_CAPTION_KEYS, read_captions
from mmpretrain.eval.embed import embed_shards
from mmpretrain.eval.inputs import encode_texts
from mmpretrain.eval.metrics import (
    classification_metrics,
    effective_robustness,
    fit_logit_linear,
    image_text_recall,
    recall_row,
)
from mmpretrain.eval.sets import EvalSet, parse_set  # noqa: F401  (EvalSet: re-exported)
from mmpretrain.eval.zeroshot import ZeroShotClassifier
from mmpretrain.utils.io import atomic_write_text


@dataclass
class FolderEmbeddings:
    """One pass over a labelled set: the classifier, image embeddings (N, E), labels (N,) and where
    the N images came from (files, or ``shard#key``; unreadable ones skipped and counted)."""

    data: Any  # a labelled set (sets.parse_set)
    clf: ZeroShotClassifier
    images: torch.Tensor
    labels: torch.Tensor
    skipped: int
    paths: list[str]


def embed_folder(
    model,
    data,
    *,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> FolderEmbeddings:
    """Encode every image of a labelled set (``sets.parse_set``: a folder layout, a CLIP_benchmark
    ``wds`` folder, labelled shards) once; unreadable images are skipped and counted. ``templates``:
    None takes the set's own (a ``wds`` folder's), else ``imagenet80``."""
    lab = data.embed(model, "image", batch_size=batch_size, workers=workers, progress=progress)
    clf = ZeroShotClassifier(
        model,
        lab.classes,
        templates if templates is not None else (lab.templates or "imagenet80"),
        batch_size=batch_size,
        progress=progress,
        allow_duplicates=True,
    )  # labels are indices; CLIP's ImageNet names repeat two
    return FolderEmbeddings(data, clf, lab.emb, lab.labels, sum(lab.skipped.values()), lab.refs)


def _weights(fe: FolderEmbeddings) -> torch.Tensor:
    """The class embeddings (C, E) as float32 on CPU, beside the image embeddings."""
    return fe.clf.weights.float().cpu()


def zeroshot_metrics(fe: FolderEmbeddings) -> dict[str, Any]:
    """Top-1, top-5 and mean per-class recall of zero-shot classification."""
    y, n_classes = fe.labels, len(fe.clf.classes)
    scores = fe.clf.model.logit_scale.exp().detach().cpu() * fe.images @ _weights(fe).T  # (N, C), as clf.logits
    return {
        "dataset": fe.data.name,
        "layout": fe.data.layout,
        "n": len(y),
        "skipped": fe.skipped,
        "classes": n_classes,
        **classification_metrics(scores, y, n_classes),
    }


def predictions(fe: FolderEmbeddings) -> torch.Tensor:
    """Top-1 zero-shot class index per image, (N,)."""
    return (fe.images @ _weights(fe).T).argmax(dim=1)


def hard_subset(fes: Sequence[FolderEmbeddings], out: str | Path, reference: str) -> dict[str, Any]:
    """ImageNet-A analogue: copy the images that the reference model (the one ``fes`` were embedded
    with) classifies wrongly into ``out/<class folder>/<split>__<file>``, keeping every class folder
    of the sources (empty ones too, so the label set and chance stay those of the sources).

    Writes ``out/hard_subset.json`` naming ``reference``; the subset is only meaningful with it.
    """
    out = Path(out)
    no_files = [fe.data.name for fe in fes if not fe.data.has_files]
    if no_files:
        raise ValueError(f"a hard subset copies image files: {', '.join(no_files)} is not an image folder")
    if out.exists():
        shutil.rmtree(out)
    per_split = {}
    for fe in fes:
        wrong = (predictions(fe) != fe.labels).nonzero().flatten().tolist()
        for folder in (p for p in fe.data.root.iterdir() if p.is_dir()):
            (out / folder.name).mkdir(parents=True, exist_ok=True)
        for i in wrong:
            src = Path(fe.paths[i])
            shutil.copyfile(src, out / src.parent.name / f"{fe.data.name}__{src.name}")
        per_split[fe.data.name] = {"images": len(fe.labels), "hard": len(wrong)}
    info = {
        "reference_model": reference,
        "sources": {fe.data.name: str(fe.data.root) for fe in fes},
        "counts": per_split,
        "hard": sum(v["hard"] for v in per_split.values()),
        "classes": len({p.name for p in out.iterdir() if p.is_dir()}),
    }
    atomic_write_text(out / "hard_subset.json", json.dumps(info, indent=2))
    return info


def zeroshot_eval(model, data, **kwargs: Any) -> dict[str, Any]:
    """Zero-shot metrics on ``data`` (keyword arguments as ``embed_folder``)."""
    return zeroshot_metrics(embed_folder(model, data, **kwargs))


def retrieval_eval(
    model,
    shards: str | list[str],
    *,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
    captions=None,
    name: str | None = None,
) -> dict[str, Any]:
    """Image<->text recall@k over shards (a spec or a list); an image's captions are ``captions(sample)``,
    by default ``json["captions"]`` if present, else ``txt``."""

    urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
    read = captions or (lambda sample: read_captions(sample, EVAL_CAPTION_KEYS, strict=False))
    run = embed_shards(
        model, urls, ["image"], lambda sample: read(sample) or None,
        name=name or "retrieval", skip_kind="empty_caption", batch_size=batch_size, progress=progress,
    )  # fmt: skip
    owner = [i for i, texts in enumerate(run.labels) for _ in texts]  # each caption's image index
    captions = [t for texts in run.labels for t in texts]
    txt_emb = encode_texts(model, captions, batch_size=batch_size).float().cpu()
    sim = run.emb["image"] @ txt_emb.T
    return {
        "dataset": name or shards,
        "images": sim.shape[0],
        "captions": sim.shape[1],
        "skipped": run.skipped,
        **image_text_recall(sim, owner, ks),
    }


def folder_retrieval_metrics(fe: FolderEmbeddings, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Text->image recall@k on a labelled folder: each class's prompt (ensemble) is a query and
    any image of that class is a hit; image->text recall@k equals top-k accuracy."""
    y = fe.labels.numpy()
    present = np.unique(y)  # classes with at least one image are the queries
    sim = (_weights(fe)[present] @ fe.images.T).numpy()
    positives = present[:, None] == y[None, :]
    head = {"dataset": fe.data.name, "images": len(y), "queries": len(present)}
    return {**head, **recall_row(sim, positives, ks, prefix="text_to_image_")}


def folder_retrieval_eval(model, data, *, ks: Sequence[int] = (1, 5, 10), **kwargs: Any) -> dict[str, Any]:
    """Text->image recall@k on ``data`` (keyword arguments as ``embed_folder``)."""
    return folder_retrieval_metrics(embed_folder(model, data, **kwargs), ks)


def set_retrieval_eval(model, data, *, templates=None, **kwargs: Any) -> dict[str, Any]:
    """Recall@k on any set: shards with captions (a spec, or a set whose ``caption_source`` gives
    shards and a caption reader: a CLIP_benchmark retrieval folder) both ways; a labelled set
    text->image with class prompts as the queries (``folder_retrieval_eval``)."""
    source = data.caption_source() if not isinstance(data, str) else (data, None)
    if source is not None:
        shards, captions = source
        return retrieval_eval(model, shards, captions=captions, name=getattr(data, "name", None), **kwargs)
    return folder_retrieval_eval(model, data, templates=templates, **kwargs)


def robustness_eval(
    model, id_set, ood_sets: Sequence, *, baseline: dict | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Accuracy on the in-distribution set and each shifted set, the drop, and effective robustness.

    ``baseline``: ``{"<set name>" or "all": [[id_acc, ood_acc], ...]}`` of reference models; the
    effective robustness of a set is its top-1 above the logit-linear fit through those points.
    """
    id_result = zeroshot_eval(model, id_set, **kwargs)
    rows = []
    for s in ood_sets:
        r = zeroshot_eval(model, s, **kwargs)
        r["drop_top1"] = id_result["top1"] - r["top1"]
        points = (baseline or {}).get(s.name) or (baseline or {}).get("all")
        r["effective_robustness"] = (
            effective_robustness(id_result["top1"], r["top1"], fit_logit_linear(points)) if points else None
        )
        rows.append(r)
    return {"in_distribution": id_result, "shifts": rows}


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` for ``rows`` (floats as percentages)."""

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{100 * v:.2f}" if isinstance(v, float) else str(v))

    cells = [[c for c in columns]] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    atomic_write_text(path, json.dumps(report, indent=2))
    return Path(path)


def periodic_eval(model, cfg) -> dict[str, float]:
    """The ``eval:`` section's sets as flat metrics: ``eval/<name>/top1``, ``eval/<shards>/image_to_text_R@1``..."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for spec in cfg.zeroshot:
            r = zeroshot_eval(
                model, parse_set(spec), templates=cfg.templates, batch_size=cfg.batch_size, progress=False
            )
            out.update({f"eval/{r['dataset']}/{k}": r[k] for k in ("top1", "top5", "mean_per_class_recall")})
        for i, shards in enumerate(cfg.retrieval):
            r = retrieval_eval(model, shards, batch_size=cfg.batch_size, progress=False)
            out.update({f"eval/retrieval{i}/{k}": v for k, v in r.items() if "R@" in k})
    finally:
        model.train(was_training)
    return out
