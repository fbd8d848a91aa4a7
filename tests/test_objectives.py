"""Multi-positive contrastive pairs, the group_id op, and the registered objectives (distillation)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.config.schema import LossConfig, LossPair, ObjectiveConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.data.ops import DATA_OPS, OpContext, SampleError, stable_id
from mmpretrain.losses import LOSSES, DistContext, check_pairs
from mmpretrain.losses.contrastive import takes_groups
from mmpretrain.models import build_model
from mmpretrain.training.distill import distill_loss
from mmpretrain.training.objectives import OBJECTIVES, build_objectives, check_objectives
from mmpretrain.training.task import ContrastiveTask

MULTI = [k for k in LOSSES.names() if takes_groups(k)]


def embeddings(n=8, e=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return a, b


def test_the_multi_positive_kinds_are_clip_and_siglip():
    assert MULTI == ["clip", "siglip"]


@pytest.mark.parametrize("kind", MULTI)
@pytest.mark.parametrize("masked", [False, True])
def test_unique_groups_give_the_one_positive_loss(kind, masked):
    """Every row its own group: the multi-positive loss equals the kind's own, value and gradients."""
    fn = LOSSES.get(kind).builder
    a, b = embeddings()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, True, False, True, True]) if masked else None
    plain = fn(a, b, scale, bias, DistContext(), valid)
    ga = torch.autograd.grad(plain, a)[0]
    many = fn(a, b, scale, bias, DistContext(), valid, groups=torch.arange(8) * 7 + 3)
    torch.testing.assert_close(many, plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(many, a)[0], ga, atol=1e-12, rtol=0)


def test_clip_multi_positive_is_the_uniform_target_cross_entropy():
    """Per row: -mean over its positives of log_softmax, both directions halved (StableRep's form)."""
    a, b = embeddings()
    groups = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4])
    scale = torch.tensor(7.0, dtype=torch.float64)
    got = LOSSES.get("clip").builder(a, b, scale, None, DistContext(), groups=groups)
    logits = scale * a @ b.T
    same = (groups[:, None] == groups[None, :]).double()
    want = 0.0
    for lg in (logits, logits.T):
        want = want + (-(same * lg.log_softmax(1)).sum(1) / same.sum(1)).mean() / 2
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_siglip_multi_positive_signs_every_same_group_pair():
    a, b = embeddings()
    groups = torch.tensor([5, 5, 1, 2, 1, 3, 0, 5])
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = LOSSES.get("siglip").builder(a, b, scale, bias, DistContext(), groups=groups)
    signs = (groups[:, None] == groups[None, :]).double() * 2 - 1
    want = -F.logsigmoid(signs * (scale * a @ b.T + bias)).sum() / 8
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_positives_need_a_kind_that_takes_them():
    check_pairs(LossConfig(pairs=[LossPair("image", "text", "siglip", positives="group")]))
    with pytest.raises(ConfigError, match=r"loss.pairs\[0\].positives: .*'clip_blockwise'.*clip, siglip"):
        check_pairs(LossConfig(pairs=[LossPair("image", "text", "clip_blockwise", positives="group")]))


def test_a_pair_with_positives_and_no_field_in_the_batch_says_which_op_writes_it(tiny_model_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    task = ContrastiveTask(LossConfig(pairs=[LossPair("image", "text", "clip", positives="group")]))
    batch = {"image": torch.randn(4, 3, 32, 32), **model.tokenizer()(["a", "b", "c", "d"])}
    with pytest.raises(ValueError, match="no 'group'.*group_id"):
        task.losses(task.outputs(model, batch))


# ------------------------------------------------------------------ the group_id op
def run_op(params: dict, sample: dict) -> dict:
    from mmpretrain.config.strict import from_dict

    entry = DATA_OPS.get("group_id")
    return entry.builder(from_dict(entry.config_cls, params, "p"), OpContext())(sample)


def test_group_id_reads_a_json_field_a_key_or_a_pattern():
    concept = {"__key__": "7", "json": b'{"source": "noto/dog-face.png", "concept": 12}'}
    assert run_op({"key": "json:concept"}, dict(concept))["group"].item() == stable_id("12")
    by_source = run_op({"key": "json:source", "pattern": r"([^/]+)\.png$"}, dict(concept))["group"]
    other = {"__key__": "8", "json": b'{"source": "twemoji/dog-face.png"}'}
    assert run_op({"key": "json:source", "pattern": r"([^/]+)\.png$"}, other)["group"] == by_source
    assert by_source.dtype == torch.int64 and by_source.item() == stable_id("dog-face")
    assert run_op({"key": "__key__"}, {"__key__": "abc"})["group"].item() == stable_id("abc")
    assert stable_id("dog-face") == int.from_bytes(
        __import__("hashlib").blake2b(b"dog-face", digest_size=8).digest(), "little", signed=True
    )  # the same in every process (Python's hash() is salted per process)
    for bad in ({"__key__": "9", "json": b"{}"}, {"__key__": "9", "json": b'{"concept": true}'}):
        with pytest.raises(SampleError) as err:
            run_op({"key": "json:concept"}, bad)
        assert err.value.kind == "no_group"


# ------------------------------------------------------------------ distillation
def test_distill_equals_open_clips_distill_clip_loss():
    """Our clip pair + the distill objective's term == open_clip's DistillClipLoss (contrastive, distill)."""
    from open_clip.loss import DistillClipLoss

    a, b = embeddings(seed=1)
    ta, tb = embeddings(e=10, seed=2)
    scale, tscale = torch.tensor(12.0, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64)
    ref = DistillClipLoss()(a, b, scale, ta, tb, tscale, output_dict=True)
    ours = distill_loss(a, b, scale, ta, tb, tscale, DistContext())
    torch.testing.assert_close(ours, ref["distill_loss"], atol=1e-12, rtol=0)
    clip = LOSSES.get("clip").builder(a, b, scale, None, DistContext())
    torch.testing.assert_close(clip, ref["contrastive_loss"], atol=1e-12, rtol=0)


def distill_cfg(tmp_path, start_frac=0.0, pairs=None):
    params = OBJECTIVES.get("distill").example(tmp_path)["params"]
    return LossConfig(
        pairs=pairs or [LossPair("image", "text", "clip")],
        objectives=[ObjectiveConfig("distill", weight=0.5, start_frac=start_frac, params=params)],
    )


def test_objective_params_are_checked_at_load(tmp_path):
    check_objectives(distill_cfg(tmp_path))
    with pytest.raises(ConfigError, match="unknown objective 'distil'. Did you mean 'distill'"):
        check_objectives(LossConfig(objectives=[ObjectiveConfig("distil")]))
    with pytest.raises(ConfigError, match=r"loss.objectives\[0\].params"):
        check_objectives(LossConfig(objectives=[ObjectiveConfig("distill", params={"techer": "x"})]))
    with pytest.raises(ConfigError, match="start_frac"):
        check_objectives(LossConfig(objectives=[ObjectiveConfig("distill", start_frac=1.0)]))


def batch_for(model, n=8, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    texts = [f"caption {i} of {seed}" for i in range(n)]
    return {"image": torch.randn(n, 3, size, size, generator=g), **model.tokenizer()(texts)}


def test_distill_is_exact_under_accumulation_and_starts_at_its_step(tiny_model_cfg, tmp_path):
    """4 micro-batches give the gradients of one batch with the teacher term in (it is batch-global);
    before start_frac * steps the term is absent; the teacher never gets a gradient."""
    cfg = distill_cfg(tmp_path, start_frac=0.5)
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).train()
    other = copy.deepcopy(model)
    objectives = build_objectives(cfg, model, steps=10)
    task = ContrastiveTask(cfg, objectives=objectives)
    full = batch_for(model, 16)
    micro = [{k: v[i : i + 4] for k, v in full.items()} for i in range(0, 16, 4)]
    early = task.forward_backward(model, [full], autocast=contextlib.nullcontext, step=4)
    assert "loss/distill" not in early
    model.zero_grad()
    big = task.forward_backward(model, [full], autocast=contextlib.nullcontext, step=5)
    acc = task.forward_backward(other, micro, autocast=contextlib.nullcontext, step=5)
    assert big["loss/distill"] > 0 and acc["loss"].item() == pytest.approx(big["loss"].item(), abs=1e-5)
    g_big = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, p in other.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g_big[n], atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad or p.grad is not None for p in objectives[0].term.frozen.parameters())


def test_a_teacher_with_other_image_size_and_context_reads_the_students_batch(tiny_model_cfg, tmp_path):
    """The teacher takes 48 px images and 16 tokens; the student's 32 px, 12-token batch is adapted:
    its term equals the teacher run on the batch made for it."""
    import dataclasses

    from mmpretrain.models.pretrained import load_pretrained
    from mmpretrain.training import distill as obj

    cfg = distill_cfg(tmp_path)
    teacher_ref = cfg.objectives[0].params["teacher"]
    teacher = load_pretrained(teacher_ref)
    towers = dict(teacher.cfg.towers)
    img, txt = towers["image"], towers["text"]
    towers["image"] = dataclasses.replace(img, params={"vision_cfg": {**img.params["vision_cfg"], "image_size": 48}})
    towers["text"] = dataclasses.replace(txt, params={"text_cfg": {**txt.params["text_cfg"], "context_length": 16}})
    big = build_model(dataclasses.replace(teacher.cfg, towers=towers))
    torch.manual_seed(0)
    student = build_model(tiny_model_cfg)
    [active] = build_objectives(cfg, student, steps=1)
    adapt = {**obj._adapters("image", student, big), **obj._adapters("text", student, big)}
    teacher = obj.AdaptedTeacher(big.eval(), ("image", "text"), adapt)
    active.term.teacher = lambda _, batch: teacher(batch)  # in place of the file's
    batch = batch_for(student, 4)
    out = active.teacher_outputs(student, batch)
    spec = big.input_spec("image")
    raw = batch["image"] * torch.tensor(student.input_spec("image").std).view(1, 3, 1, 1) + torch.tensor(
        student.input_spec("image").mean
    ).view(1, 3, 1, 1)
    resized = F.interpolate(raw, size=(48, 48), mode="bicubic", antialias=True, align_corners=False)
    made = (resized - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    texts = [f"caption {i} of 0" for i in range(4)]
    want = big({"image": made, **big.tokenizer()(texts)})
    torch.testing.assert_close(out["teacher[0]/image"], want["image"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["teacher[0]/text"], want["text"], atol=1e-5, rtol=1e-4)


def test_a_teacher_with_another_tokenizer_is_refused(tiny_model_cfg, tmp_path):
    from mmpretrain.models.pretrained import load_pretrained
    from mmpretrain.training import distill as obj

    teacher = load_pretrained(distill_cfg(tmp_path).objectives[0].params["teacher"])
    student = build_model(tiny_model_cfg)

    class Other:
        def __call__(self, texts):
            out = student.tokenizer()(texts)
            return {"text": out["text"] + 1, "text_mask": out["text_mask"]}

    teacher.__dict__["_input_specs"] = {"text": type(teacher.input_spec("text"))(Other())}
    with pytest.raises(ConfigError, match="tokenizer gives other tokens"):
        obj._adapters("text", student, teacher)


def test_a_run_with_positives_and_a_teacher_resumes_exactly(toy_shards, tmp_path):
    """Group ids from the sample keys, a distillation term from step 3 of 6, two micro-batches a step:
    a run stopped at step 3 and resumed ends with the weights of an uninterrupted one; the distill term
    is logged from its start step on."""

    from mmpretrain.training.metrics import read_jsonl

    teacher = OBJECTIVES.get("distill").example(tmp_path / "teacher")["params"]
    ops = [{"op": "decode_image"}, {"op": "resize_center_crop"}, {"op": "to_tensor_normalize"}, {"op": "caption"}]
    ops += [{"op": "tokenize"}, {"op": "group_id", "params": {"key": "__key__", "pattern": r"(\d)$"}}]
    sections = {
        "data": {"ops": ops, "batch_size": 8},
        "loss": {
            "pairs": [{"a": "image", "b": "text", "kind": "siglip", "positives": "group"}],
            "objectives": [{"kind": "distill", "weight": 0.5, "start_frac": 0.5, "params": teacher}],
        },
        "model": {"logit_bias_init": -10.0},
        "train": {"steps": 6, "ckpt_every": 3, "accum_steps": 2},
    }
    ref, a, b = stopped_and_resumed(toy_shards, tmp_path, sections)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_jsonl(ref / "metrics.jsonl") if "loss/image-text" in r]
    assert [("loss/distill" in r) for r in rows] == [r["step"] > 3 for r in rows] and len(rows) == 6


def stopped_and_resumed(shards, tmp_path, sections: dict) -> tuple:
    """A 6-step run straight through (``ref``), and one stopped at step 3 and resumed: (the reference's
    run folder, its last weights, the resumed run's last weights)."""
    from safetensors.torch import load_file

    from mmpretrain import api
    from tests.conftest import experiment_tree

    ref = api.train(_cfg(experiment_tree(shards, tmp_path / "ref", **sections)))
    tree = experiment_tree(shards, tmp_path / "run", **sections)
    api.train(_cfg(tree, {"train": {"stop_after": 3}}))
    api.train(_cfg(tree, {"train": {"resume": "latest"}}))
    last = "checkpoints/step_00000006/model.safetensors"
    return ref, load_file(ref / last), load_file(tmp_path / "run" / last)


def _cfg(tree: dict, extra: dict | None = None):
    from mmpretrain.config.loader import deep_merge
    from mmpretrain.training.validate import experiment_from_tree

    return experiment_from_tree(deep_merge(copy.deepcopy(tree), extra or {}))
