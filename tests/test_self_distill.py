"""The EMA-teacher objectives: self-distillation over crops (SILC / DINO) and masked prediction of the
teacher's patch features (TIPS / iBOT): the losses, the schedule, the EMA and centre updates, patch
tokens with a mask, accumulation, the checkpointed teachers and an exact resume."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.config.schema import LossConfig, ObjectiveConfig
from mmpretrain.models import build_model
from mmpretrain.training.masked_prediction import masked_loss
from mmpretrain.training.objectives import build_objectives
from mmpretrain.training.self_distill import dino_loss, momentum_at
from mmpretrain.training.task import ContrastiveTask

PARAMS = {"global_crops": 2, "prototypes": 16, "hidden": 16, "bottleneck": 8}
MASKED = {"prototypes": 16, "hidden": 16, "bottleneck": 8}
KINDS = {"self_distill": PARAMS, "masked_prediction": MASKED}


def test_dino_loss_is_the_mean_over_teacher_global_and_other_student_crops():
    g = torch.Generator().manual_seed(0)
    s, t, center = torch.randn(4, 3, 5, generator=g), torch.randn(4, 2, 5, generator=g), torch.randn(5, generator=g)
    want = []
    for gi in range(2):
        p = F.softmax((t[:, gi] - center) / 0.04, dim=-1)
        for v in range(3):
            if v != gi:
                want.append((-(p * F.log_softmax(s[:, v] / 0.1, dim=-1)).sum(-1)).mean())
    torch.testing.assert_close(dino_loss(s, t, center, 0.1, 0.04), torch.stack(want).mean())
    assert len(want) == 4  # (g0: v1, v2), (g1: v0, v2)


def test_momentum_follows_dinos_cosine_schedule():
    assert momentum_at(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert momentum_at(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.996, 1.0) == pytest.approx(1.0 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)


def setup(tiny_model_cfg, start_frac=0.0, steps=10, kind="self_distill"):
    cfg = LossConfig(objectives=[ObjectiveConfig(kind, start_frac=start_frac, params=KINDS[kind])])
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).train()
    objectives = build_objectives(cfg, model, steps=steps)
    objectives[0].term.init(model)
    return cfg, model, objectives


def batch_for(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "image_crops": torch.randn(n, 4, 3, 32, 32, generator=g),
        "patch_mask": torch.rand(n, 16, generator=g) < 0.5,  # the tiny tower's 4 x 4 patches
        **model.tokenizer()([f"caption {i}" for i in range(n)]),
    }


def test_the_teacher_starts_as_the_student_and_moves_by_ema(tiny_model_cfg):
    cfg, model, objectives = setup(tiny_model_cfg)
    teacher = model.extras["objective0"].teacher
    assert torch.equal(
        teacher.tower.state_dict()["visual.conv1.weight"], model.towers["image"].state_dict()["visual.conv1.weight"]
    )
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.extras["objective0"].proto.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.towers["image"].parameters():
            p.add_(1.0)
    task = ContrastiveTask(cfg, objectives=objectives)
    task.losses(task.outputs(model, batch_for(model), step=0), step=0)  # computes the batch centre
    task.after_step(model, 0)
    m = momentum_at(0, 10, 0.996, 1.0)
    w = "tower.visual.conv1.weight"
    torch.testing.assert_close(teacher.state_dict()[w], before[w] * m + (before[w] + 1.0) * (1 - m))
    assert teacher.center.abs().sum() > 0  # 0.9 * 0 + 0.1 * the batch's mean teacher output
    assert not teacher.training  # model.train() leaves the teacher in evaluation mode


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_is_exact_under_accumulation(tiny_model_cfg, kind):
    cfg, model, objectives = setup(tiny_model_cfg, kind=kind)
    _, other, other_objectives = setup(tiny_model_cfg, kind=kind)  # the same seed: the same model, heads, teacher
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    task = ContrastiveTask(cfg, objectives=objectives)
    full = batch_for(model, 16)
    micro = [{k: v[i : i + 4] for k, v in full.items()} for i in range(0, 16, 4)]
    big = task.forward_backward(model, [full], autocast=contextlib.nullcontext)
    acc = ContrastiveTask(cfg, objectives=other_objectives).forward_backward(
        other, micro, autocast=contextlib.nullcontext
    )
    assert big[f"loss/{kind}"] > 0 and acc["loss"].item() == pytest.approx(big["loss"].item(), abs=1e-5)
    g_big = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("extras.objective0.") and "teacher" not in n for n in g_big)
    for n, p in other.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g_big[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_inactive_it_still_gives_its_head_a_zero_gradient(tiny_model_cfg):
    """DDP needs a gradient for every trainable parameter every step: before its start the prototype
    head gets zeros, and the student's crops are not encoded."""
    cfg, model, objectives = setup(tiny_model_cfg, start_frac=0.5)
    task = ContrastiveTask(cfg, objectives=objectives)
    out = task.outputs(model, batch_for(model), step=0)
    assert not any(k.startswith("teacher[0]/") for k in out)
    task.losses(out, step=0)["loss"].backward()
    head = model.extras["objective0"].proto
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


def test_a_run_with_ema_teachers_resumes_exactly_and_its_checkpoint_loads_for_use(toy_shards, tmp_path):
    """multi_crop, self_distill and masked_prediction from step 3 of 6: stopped at 3 and resumed, the
    weights, the teachers, their centres and the mask token end identical to an uninterrupted run's;
    the checkpoint loads as a plain model (the teachers left out) whose model_id ignores them."""

    from mmpretrain import api
    from tests.test_objectives import stopped_and_resumed

    ops = [{"op": "decode_image"}, {"op": "multi_crop", "params": {"local_crops": 1}}, {"op": "resize_center_crop"}]
    ops += [{"op": "to_tensor_normalize"}, {"op": "caption"}, {"op": "tokenize"}, {"op": "patch_mask"}]
    objectives = [{"kind": k, "start_frac": 0.5, "params": p} for k, p in KINDS.items()]  # SigLIP 2's last terms
    sections = {
        "data": {"ops": ops, "batch_size": 8},
        "loss": {"objectives": objectives},
        "train": {"steps": 6, "ckpt_every": 3, "accum_steps": 2},
    }
    ref, a, b = stopped_and_resumed(toy_shards, tmp_path, sections)
    assert {
        "extras.objective0.teacher.center",
        "extras.objective1.teacher.center",
        "extras.objective1.mask_token",
    } <= a.keys()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = api.load_checkpoint(ref / "checkpoints")
    assert not list(model.extras.keys())
    fresh = build_model(model.cfg)
    fresh.load_state_dict({k: v for k, v in a.items() if not k.startswith("extras.")})
    assert api.model_id(model) == api.model_id(fresh)


def test_masked_loss_is_the_mean_over_masked_patches():
    g = torch.Generator().manual_seed(1)
    s, t, c = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g), torch.randn(6, generator=g)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    per = -(F.softmax((t - c) / 0.04, -1) * F.log_softmax(s / 0.1, -1)).sum(-1)
    torch.testing.assert_close(masked_loss(s, t, mask, c, 0.1, 0.04), per[mask].mean())


def tiny_towers():
    from mmpretrain.encoders import build_encoder
    from mmpretrain.encoders.openclip import TINY_VISION

    torch.manual_seed(0)
    timm_params = {"model_name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": {"depth": 2, "patch_size": 8}}
    return {
        "openclip_vision": build_encoder("image", "openclip_vision", TINY_VISION, embed_dim=16),
        "timm_vision": build_encoder("image", "timm_vision", timm_params, embed_dim=16),
    }


@pytest.mark.parametrize("name", ["openclip_vision", "timm_vision"])
def test_patch_tokens_are_the_towers_own_and_a_mask_replaces_only_what_it_masks(name):
    """Unmasked: the library's own output tokens (open_clip's output_tokens, timm's forward_features);
    a mask changes the tokens (the token reaches the transformer) and leaves no hook behind."""
    tower = tiny_towers()[name].eval()
    x = torch.randn(2, 3, 32, 32)
    plain = tower.patch_tokens({"image": x})
    assert plain.shape == (2, tower.num_patches, tower.token_dim)
    if name == "openclip_vision":
        tower.visual.output_tokens = True
        want = tower.visual(x)[1]
        tower.visual.output_tokens = False
    else:
        want = tower.trunk.forward_features(x)[:, tower.trunk.num_prefix_tokens :]
    torch.testing.assert_close(plain, want)
    none = torch.zeros(2, tower.num_patches, dtype=torch.bool)
    torch.testing.assert_close(tower.patch_tokens({"image": x}, none, torch.randn(tower.token_dim)), plain)
    mask = none.clone()
    mask[0, :3] = True
    masked = tower.patch_tokens({"image": x}, mask, torch.randn(tower.token_dim))
    assert not torch.allclose(masked[0], plain[0]) and torch.allclose(masked[1], plain[1])
    torch.testing.assert_close(tower.patch_tokens({"image": x}), plain)  # the hook is gone
