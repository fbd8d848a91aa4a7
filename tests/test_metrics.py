"""Metric functions: hand-computed cases, and a numpy reference on random matrices with ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpretrain.eval.metrics import (
    classification_metrics,
    effective_robustness,
    fit_logit_linear,
    image_text_recall,
    mean_per_class_recall,
    recall_at_k,
    recall_row,
    topk_accuracy,
    true_rank,
)


def test_topk_hand_computed():
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # true 0: rank 0
            [0.5, 0.4, 0.1],  # true 1: rank 1
            [0.3, 0.3, 0.3],
        ]
    )  # true 2: tied with 0 and 1, which have lower index: rank 2
    labels = np.array([0, 1, 2])
    assert list(true_rank(scores, labels)) == [0, 1, 2]
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(torch.tensor(scores), torch.tensor(labels), 3) == 1.0


def test_mean_per_class_recall_hand_computed():
    scores = np.eye(3)[[0, 0, 1, 2, 2]]  # predictions 0 0 1 2 2
    labels = np.array([0, 1, 1, 2, 2])  # class 0: 1/1, class 1: 1/2, class 2: 2/2
    assert mean_per_class_recall(scores, labels) == pytest.approx((1 + 0.5 + 1) / 3)
    assert topk_accuracy(scores, labels) == pytest.approx(4 / 5)


def test_retrieval_hand_computed():
    # 2 images, 4 captions: captions 0,1 -> image 0; 2,3 -> image 1
    sim = np.array([[0.1, 0.9, 0.2, 0.3], [0.8, 0.0, 0.4, 0.1]])
    r = image_text_recall(sim, [0, 0, 1, 1], ks=(1, 2))
    assert r["image_to_text_R@1"] == 0.5  # image 0 top caption 1 (hit); image 1 top caption 0 (miss)
    assert r["image_to_text_R@2"] == 1.0  # image 1's second best is caption 2 (hit)
    assert r["text_to_image_R@1"] == pytest.approx(2 / 4)  # captions 1 and 2 rank their image first
    assert r["text_to_image_R@2"] == 1.0
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(sim, np.zeros_like(sim, dtype=bool), 1)


@pytest.mark.parametrize("seed", range(5))
def test_against_numpy_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(60, 12)).astype(float)  # many ties
    labels = rng.integers(0, 12, size=60)
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in (1, 3, 5):
        ref = np.mean([labels[i] in order[i, :k] for i in range(60)])
        assert topk_accuracy(scores, labels, k) == pytest.approx(ref)
    pos = rng.random((60, 12)) < 0.2
    pos[np.arange(60), labels] = True
    for k in (1, 5, 10):
        ref = np.mean([pos[i, order[i, :k]].any() for i in range(60)])
        assert recall_at_k(scores, pos, k) == pytest.approx(ref)
    # on continuous scores (no ties) torch.topk agrees too
    cont = torch.tensor(rng.random((60, 12)))
    ref = (cont.topk(5, dim=1).indices == torch.tensor(labels)[:, None]).any(1).float().mean().item()
    assert topk_accuracy(cont, labels, 5) == pytest.approx(ref)


def test_effective_robustness():
    points = [(0.5, 0.3), (0.6, 0.38), (0.7, 0.48), (0.8, 0.6)]
    fit = fit_logit_linear(points)
    assert effective_robustness(0.7, 0.48, fit) == pytest.approx(0.0, abs=0.02)  # on the line
    assert effective_robustness(0.7, 0.60, fit) > 0.1  # above it
    with pytest.raises(ValueError):
        fit_logit_linear([(0.5, 0.3)])


def test_classification_metrics_hand_computed_chance_is_one_over_classes_scored():
    # 4 classes scored, only classes 0 and 1 present: chance is 1/4, not 1/2
    scores = np.array([[0.9, 0.1, 0.0, 0.0], [0.2, 0.7, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0]])
    labels = np.array([0, 1, 1])
    m = classification_metrics(scores, labels, 4)
    assert m["top1"] == pytest.approx(2 / 3) and m["top5"] == 1.0  # top-5 is top-4 here
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2) and m["chance_top1"] == 0.25


def test_recall_row_hand_computed():
    sim = np.array([[0.9, 0.1, 0.5], [0.1, 0.2, 0.8]])
    pos = np.array([[False, False, True], [False, False, True]])
    row = recall_row(sim, pos, (1, 2), prefix="t_")
    assert row == {
        "t_R@1": 0.5,
        "t_R@1_chance": pytest.approx(1 / 3),
        "t_R@2": 1.0,
        "t_R@2_chance": pytest.approx(2 / 3),
    }
