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


MEMORY_EFFICIENT = {"clip_blockwise": "clip", "siglip_chunked": "siglip"}


@pytest.mark.parametrize("kind", sorted(MEMORY_EFFICIENT))
@pytest.mark.parametrize("block", [1, 3, 7, 64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [None, -2.5])
def test_memory_efficient_losses_equal_the_dense_ones(kind, block, masked, bias):
    """Value and gradients (embeddings, scale, bias) equal the dense kind's to 1e-6 in float64, for
    block sizes that do and do not divide the batch, with samples lacking a modality masked out."""
    from mmpretrain.losses import LOSSES, DistContext

    g = torch.Generator().manual_seed(7)
    a0, b0 = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(10, 6, generator=g, dtype=torch.float64)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool) if masked else None
    out = {}
    for name in (kind, MEMORY_EFFICIENT[kind]):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
        loss = LOSSES.get(name).builder(F.normalize(a, dim=1), F.normalize(b, dim=1), scale, bias_t,
                                        DistContext(block=block), valid)  # fmt: skip
        loss.backward()
        out[name] = (loss.detach(), a.grad, b.grad, scale.grad, None if bias_t is None else bias_t.grad)
    for ours, dense in zip(out[kind], out[MEMORY_EFFICIENT[kind]]):
        if dense is not None:
            assert torch.allclose(ours, dense, atol=1e-6, rtol=1e-6), (ours, dense)


def test_memory_efficient_loss_never_holds_the_logits():
    """At B = 2048 the dense clip loss's autograd graph keeps (B, B) logits for backward; the blockwise
    one keeps the features (B, E) and nothing of size B x B (bytes saved for backward, counted by hook)."""
    from mmpretrain.losses import LOSSES, DistContext

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 32, generator=g), torch.randn(2048, 32, generator=g)
    saved = {}
    for name in ("clip", "clip_blockwise", "siglip", "siglip_chunked"):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = LOSSES.get(name).builder(F.normalize(x, dim=1), F.normalize(y, dim=1), torch.tensor(10.0),
                                            torch.tensor(-5.0), DistContext(block=256))  # fmt: skip
        loss.backward()
        saved[name] = total[0]
    logits = 2048 * 2048 * 4
    assert saved["clip"] > logits and saved["siglip"] > logits
    assert saved["clip_blockwise"] < min(logits / 4, saved["clip"] / 20), saved  # the features, a few times
    assert saved["siglip_chunked"] < min(logits / 4, saved["siglip"] / 20), saved
