"""Pure metric functions over arrays (numpy or torch), tested on hand-computed cases.

Ties: a score equal to the true item's ranks *ahead* of it only if its index is lower, i.e.
ranks follow a stable descending sort (``np.argsort(-s, kind="stable")``). So results are
deterministic and independent of a top-k kernel's tie order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def true_rank(scores, labels) -> np.ndarray:
    """0-based rank of each row's true column. scores: (N, C); labels: (N,) -> (N,)."""
    s, y = _np(scores), _np(labels).astype(np.int64)
    true = s[np.arange(len(y)), y][:, None]
    cols = np.arange(s.shape[1])[None, :]
    return ((s > true) | ((s == true) & (cols < y[:, None]))).sum(1)


def topk_accuracy(scores, labels, k: int = 1) -> float:
    """Fraction of rows whose true class is among the k best. scores: (N, C); labels: (N,)."""
    if len(_np(labels)) == 0:
        raise ValueError("topk_accuracy: no samples")
    return float((true_rank(scores, labels) < k).mean())


def predictions(scores) -> np.ndarray:
    """Arg-max with ties to the lowest index. scores: (N, C) -> (N,)."""
    return np.argmax(_np(scores), axis=1)


def mean_per_class_recall(scores, labels, num_classes: int | None = None) -> float:
    """Mean over classes *present in labels* of the fraction of their samples predicted right."""
    pred, y = predictions(scores), _np(labels).astype(np.int64)
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes]))


def classification_metrics(scores, labels, n_classes: int) -> dict[str, float]:
    """Top-1, top-5, mean per-class recall and the chance top-1 of one classification.

    scores: (N, C); labels: (N,) class indices; ``n_classes``: C, the size of the label set scored
    against (top-5 becomes top-C below five classes). Chance is 1 / ``n_classes``: a random guess
    among the classes scored, whether or not each class has a sample in ``labels``.
    """
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, min(5, n_classes)),
        "mean_per_class_recall": mean_per_class_recall(scores, labels),
        "chance_top1": 1.0 / n_classes,
    }


def recall_row(sim, positives, ks: Sequence[int], *, prefix: str = "") -> dict[str, float]:
    """``{prefix}R@k`` and its chance level under random ranking ``{prefix}R@k_chance`` for each k.

    sim: (Q, D) similarities of queries to items; positives: (Q, D) bool.
    """
    row: dict[str, float] = {}
    for k in ks:
        row[f"{prefix}R@{k}"] = recall_at_k(sim, positives, k)
        row[f"{prefix}R@{k}_chance"] = chance_recall_at_k(positives, k)
    return row


def chance_recall_at_k(positives, k: int) -> float:
    """Expected recall@k of a random ranking: per query, 1 - P(k random picks miss all its positives)."""
    pos = _np(positives).astype(bool)
    n = pos.shape[1]

    def hit(p: int) -> float:
        return 1.0 - (math.comb(n - p, k) / math.comb(n, k) if k <= n - p else 0.0)

    return float(np.mean([hit(int(p)) for p in pos.sum(1)]))


def recall_at_k(sim, positives, k: int) -> float:
    """Fraction of queries with at least one positive among their k best items.

    sim: (Q, D) similarities; positives: (Q, D) bool (True = a correct item for that query).
    Ties follow the stable order (lower item index first).
    """
    s, pos = _np(sim), _np(positives).astype(bool)
    if s.shape != pos.shape:
        raise ValueError(f"recall_at_k: sim {s.shape} and positives {pos.shape} differ")
    if not pos.any(1).all():
        raise ValueError("recall_at_k: every query needs at least one positive")
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(pos, order, axis=1).any(1).mean())


def image_text_recall(sim, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall@k both ways for images with several captions each.

    sim: (I, T) image-text similarities; text_to_image: (T,) index of each caption's image.
    image->text counts a hit when *any* of the image's captions is in the top k.
    """
    t2i = _np(text_to_image).astype(np.int64)
    pos = np.zeros(_np(sim).shape, dtype=bool)
    pos[t2i, np.arange(len(t2i))] = True
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = recall_at_k(sim, pos, k)
        out[f"text_to_image_R@{k}"] = recall_at_k(_np(sim).T, pos.T, k)
    return out


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def fit_logit_linear(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fit of logit(ood_acc) = a * logit(id_acc) + b over baseline models' (id, ood) accuracies."""
    if len(points) < 2:
        raise ValueError("fit_logit_linear: need at least two baseline (id, ood) points")
    x = np.array([logit(i) for i, _ in points])
    y = np.array([logit(o) for _, o in points])
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def effective_robustness(id_acc: float, ood_acc: float, fit: tuple[float, float]) -> float:
    """OOD accuracy above the baseline fit's prediction (Taori et al., 2020), in accuracy points."""
    a, b = fit
    predicted = 1.0 / (1.0 + math.exp(-(a * logit(id_acc) + b)))
    return ood_acc - predicted
