"""Loss values: hand-computed cases and parity with open_clip's ClipLoss / SigLipLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.losses import DistContext, clip_loss, siglip_loss


def feats(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = 2 * I: each row's CE = -log(e^2 / (e^2 + 1))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert clip_loss(a, b, torch.tensor(2.0), None, DistContext()).item() == pytest.approx(expected)


def test_siglip_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = a.clone()
    s, bias = torch.tensor(3.0), torch.tensor(-1.0)
    # diagonal logits 3-1=2 (positive), off-diagonal 0-1=-1 (negative)
    expected = (
        -(2 * math.log(torch.sigmoid(torch.tensor(2.0)).item()) + 2 * math.log(torch.sigmoid(torch.tensor(1.0)).item()))
        / 2
    )
    assert siglip_loss(a, b, s, bias, DistContext()).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_equals_open_clip():
    from open_clip.loss import ClipLoss

    a, b = feats()
    scale = torch.tensor(14.3)
    ours = clip_loss(a, b, scale, None, DistContext())
    theirs = ClipLoss()(a, b, scale)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_siglip_loss_equals_open_clip():
    from open_clip.loss import SigLipLoss

    a, b = feats(seed=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = siglip_loss(a, b, scale, bias, DistContext())
    theirs = SigLipLoss()(a, b, scale, bias)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_clip_loss_prefers_matching_pairs():
    a, _ = feats()
    b_shuffled = a[torch.randperm(len(a), generator=torch.Generator().manual_seed(3))]
    scale = torch.tensor(10.0)
    assert clip_loss(a, a, scale, None, DistContext()) < clip_loss(a, b_shuffled, scale, None, DistContext())
