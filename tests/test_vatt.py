"""VATT pieces: MIL-NCE, per-sample masking of pairs, views (several captions / clips), multi-view
evaluation ops, optional modalities, and the media evaluation on generated clips."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch

from mmpretrain.config.schema import LossConfig, LossPair, ModelConfig, TowerConfig
from mmpretrain.data.av_ops import DecodeAudioParams, DecodeVideoParams
from mmpretrain.data.ops import DATA_OPS, CaptionsParams, OpContext, SampleError
from mmpretrain.encoders.audio import EXAMPLE_AST
from mmpretrain.losses import LOSSES, DistContext, clip_loss, milnce_loss
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.training.task import ContrastiveTask
from mmpretrain.types import ImageSpec
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from make_toy_clips import make_clip  # noqa: E402

CTX = OpContext({"image": ImageSpec(size=(32, 32))})
SCALE = torch.tensor(5.0)


def emb(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


# ------------------------------------------------------------------ losses
def test_milnce_with_one_caption_is_clip():
    a, b = emb(6, 8), emb(6, 8, seed=1)
    assert milnce_loss(a, b[:, None], SCALE, None, DistContext()).item() == pytest.approx(
        clip_loss(a, b, SCALE, None, DistContext()).item(), rel=1e-6
    )


def test_milnce_hand_computed():
    a, b = emb(3, 4), emb(3, 2, 4, seed=1)  # 3 clips, 2 captions each
    logits = SCALE * a @ b.flatten(0, 1).T  # (3, 6)
    own = torch.arange(6).view(3, 2)
    v2t = torch.stack([logits[i].logsumexp(0) - logits[i, own[i]].logsumexp(0) for i in range(3)])
    t2v = (
        torch.nn.functional.cross_entropy(
            SCALE * b.flatten(0, 1) @ a.T, torch.arange(3).repeat_interleave(2), reduction="none"
        )
        .view(3, 2)
        .mean(1)
    )
    expected = (0.5 * (v2t + t2v)).mean()
    assert milnce_loss(a, b, SCALE, None, DistContext()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_milnce_prefers_matching_captions():
    a = emb(8, 16)
    near = torch.nn.functional.normalize(a[:, None] + 0.1 * emb(8, 3, 16, seed=2), dim=-1)
    assert milnce_loss(a, near, SCALE, None, DistContext()) < milnce_loss(
        a, near.roll(1, 0), SCALE, None, DistContext()
    )


@pytest.mark.parametrize("entry", LOSSES.entries(), ids=LOSSES.names())
def test_masked_loss_equals_loss_on_the_valid_subset(entry):
    """Every registered loss: invalid samples are neither positives nor negatives, the loss is the one of
    the valid rows alone (the example says how many captions a sample carries and the logit bias)."""
    ex, fn = entry.make_example(), entry.builder
    views = ex["views"]
    a, b = emb(7, 8), emb(7, views, 8, seed=1) if views > 1 else emb(7, 8, seed=1)
    valid = torch.tensor([True, False, True, True, False, True, True])
    bias = torch.tensor(ex["logit_bias"]) if ex["logit_bias"] is not None else None
    masked = fn(a, b, SCALE, bias, DistContext(), valid)
    subset = fn(a[valid], b[valid], SCALE, bias, DistContext())
    assert masked.item() == pytest.approx(subset.item(), rel=1e-5)


def test_no_valid_pair_gives_zero_loss_with_a_graph():
    a = emb(4, 8).requires_grad_()
    loss = clip_loss(a, emb(4, 8, seed=1), SCALE, None, DistContext(), torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a))


def test_clip_refuses_several_captions():
    with pytest.raises(ValueError, match="milnce"):
        clip_loss(emb(4, 8), emb(4, 2, 8), SCALE, None, DistContext())


# ------------------------------------------------------------------ model: views and masking
# a tiny ViViT (factorised encoder) on 4 frames of 32 px
VIVIT = {
    "frames": 4,
    "fps": 4.0,
    "image_size": 32,
    "tubelet_frames": 2,
    "patch_size": 16,
    "width": 32,
    "heads": 2,
    "spatial_layers": 1,
    "temporal_layers": 1,
}
TINY = ModelConfig(
    embed_dim=16,
    towers={
        "video": TowerConfig(
            "vivit_fe",
            VIVIT,
        ),
        "audio": TowerConfig("ast", {**EXAMPLE_AST, "layers": 1}),
        "text": TowerConfig(
            "openclip_text",
            {"text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        ),
    },
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ContrastiveModel(TINY).eval()


def test_views_axis_encodes_each_view(model):
    video = torch.randn(2, 3, 4, 3, 32, 32)  # (B, V, T, 3, H, W)
    out = model.encode("video", {"video": video})
    assert out.shape == (2, 3, 16)
    assert torch.allclose(out[1, 2], model.encode("video", {"video": video[1, 2][None]})[0], atol=1e-5)
    with pytest.raises(ValueError, match="views axis"):
        model.encode("video", {"video": torch.randn(1, 1, 1, 4, 3, 32, 32)})


def test_data_context_carries_tower_inputs(model):
    ctx = model.data_context()
    video, audio = ctx.spec("video"), ctx.spec("audio")
    assert (video.frames, video.fps, video.size) == (4, 4.0, 32)
    assert (audio.sample_rate, audio.seconds) == (8000, 1.0)


def test_invalid_samples_get_no_gradient_from_their_pair():
    torch.manual_seed(0)
    m = ContrastiveModel(TINY).train()
    task = ContrastiveTask(LossConfig(pairs=[LossPair("video", "audio", "clip")]))
    audio = torch.randn(4, 8000, requires_grad=True)
    valid = torch.tensor([True, True, False, True])
    batch = {"video": torch.randn(4, 4, 3, 32, 32), "audio": audio, "audio_valid": valid}
    losses = task.losses(m(batch))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert audio.grad[2].abs().sum() == 0 and audio.grad[0].abs().sum() > 0


# ------------------------------------------------------------------ ops
@pytest.fixture(scope="module")
def clip():
    return make_clip(random.Random(0), size=40, n_frames=16, fps=8)[0]


def build(name, params, ctx=CTX):
    return DATA_OPS.get(name).builder(params, ctx)


def test_multi_view_video_is_deterministic_and_varied():
    import numpy as np

    from mmpretrain.corpora.av_encode import encode_mp4

    frames = np.random.default_rng(0).integers(0, 255, (16, 32, 64, 3), dtype=np.uint8)  # wide: crops differ
    wide = encode_mp4(frames, 8, None, 8000)
    op = build("decode_video", DecodeVideoParams(frames=4, fps=4, size=32, train=False, clips=2, crops=3))
    s1, s2 = op({"__key__": "k", "mp4": wide}), op({"__key__": "k", "mp4": wide})
    assert s1["video"].shape == (6, 4, 3, 32, 32) and s1["video_mask"].shape == (6, 4)
    assert torch.equal(s1["video"], s2["video"])
    assert not torch.equal(s1["video"][0], s1["video"][2])  # left vs right crop
    assert not torch.equal(s1["video"][0], s1["video"][3])  # first vs second clip
    with pytest.raises(ValueError, match="train: false"):
        build("decode_video", DecodeVideoParams(frames=4, fps=4, clips=2))


def test_video_op_defaults_to_the_tower(clip, model):
    s = build("decode_video", DecodeVideoParams(), model.data_context())({"__key__": "k", "mp4": clip})
    assert s["video"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="video tower"):
        build("decode_video", DecodeVideoParams())


def test_audio_windows(clip):
    s = build("decode_audio", DecodeAudioParams(sample_rate=8000, seconds=0.5, train=False, windows=3))({"mp4": clip})
    assert s["audio"].shape == (3, 4000) and s["audio_mask"].all()
    assert not torch.equal(s["audio"][0], s["audio"][2])


def test_optional_audio_keeps_the_sample():
    silent = make_clip(random.Random(1), size=40, n_frames=8, fps=8, audio=False)[0]
    op = build("decode_audio", DecodeAudioParams(sample_rate=8000, seconds=0.5, optional=True))
    s = op({"__key__": "k", "mp4": silent})
    assert not s["audio_valid"] and s["audio"].shape == (4000,) and not s["audio_mask"].any()
    assert s["__absent__"] == ["audio"]
    strict = build("decode_audio", DecodeAudioParams(sample_rate=8000, seconds=0.5))
    with pytest.raises(SampleError):
        strict({"__key__": "k", "mp4": silent})


def test_captions_op_draws_k(model):
    op = build("captions", CaptionsParams(k=3, train=False))
    s = op({"json": json.dumps({"captions": ["a", "b"]}).encode()})
    assert s["caption"] == ["a", "b", "a"]
    s = build("tokenize", None, model.data_context())(s)
    assert s["text"].shape == (3, 16) and s["text_mask"].shape == (3, 16)
    s = op({"__key__": "k", "txt": b"only one"})
    assert s["caption"] == ["only one"] * 3
    with pytest.raises(SampleError):
        op({"__key__": "k", "json": b"{}"})


# ------------------------------------------------------------------ evaluation on labelled shards
@pytest.fixture(scope="module")
def clip_set(tmp_path_factory):
    """10 toy clips (+1 corrupt) as video shards with json labels and several captions."""
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    root = tmp_path_factory.mktemp("clips")
    rng, rows = random.Random(3), []
    for i in range(10):
        data, caption = make_clip(rng, size=32, n_frames=16, fps=8)
        (root / f"{i}.mp4").write_bytes(data)
        colour = caption.split()[1]
        rows.append(
            {"file": f"{i}.mp4", "caption": caption, "captions": [caption, f"{caption}, on video"], "colour": colour}
        )
    (root / "bad.mp4").write_bytes(b"\x00" * 100)
    rows.append({"file": "bad.mp4", "caption": "broken", "colour": "red"})
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(
        root, root / "c.jsonl", root / "shards", ShardWriterConfig(media="video", verify_images=False), progress=False
    )
    return root


def test_shard_set_parse():
    from mmpretrain.eval.sets import ShardSet

    assert ShardSet.parse("held@shards:concept,motion=data/x") == ShardSet("held", ("concept", "motion"), "data/x")
    with pytest.raises(ValueError, match="shards"):
        ShardSet.parse("folder=data/x")


def test_media_eval_reports_zero_shot_and_retrieval(model, clip_set):
    from mmpretrain.eval.inputs import Views
    from mmpretrain.eval.media import media_eval
    from mmpretrain.eval.sets import ShardSet

    data = ShardSet.parse(f"toy@shards:colour={clip_set / 'shards'}")
    r = media_eval(model, data, ["video", "audio"], views=Views(clips=2, crops=1, windows=2), progress=False)
    assert r["samples"] == 10 and r["skipped"] == {"bad_video": 1}
    zs = {(z["modality"], z["label"]): z for z in r["zeroshot"]}
    classes = len({json.loads(line)["colour"] for line in (clip_set / "c.jsonl").read_text().splitlines()[:10]})
    assert zs[("video", "colour")]["classes"] == classes and zs[("video", "colour")]["chance_top1"] == 1 / classes
    tasks = {row["task"]: row for row in r["retrieval"]}
    assert set(tasks) == {"caption->video", "colour->video", "caption->audio", "colour->audio", "video->audio"}
    v2a = tasks["video->audio"]
    assert v2a["queries"] == v2a["items"] == 10 and v2a["R@1_chance"] == pytest.approx(0.1)
    assert v2a["R@10"] == 1.0  # every item is within the top 10 of 10
    for row in tasks.values():
        assert 0.0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= 1.0


def test_zero_shot_api_takes_video_and_audio_files(model, clip_set):
    from mmpretrain import api
    from mmpretrain.eval.inputs import Views

    files = [clip_set / "0.mp4", clip_set / "1.mp4"]
    clf = api.zero_shot("a <> shape", ["red", "green", "blue"], model=model, modality="video", views=Views(clips=2))
    preds = clf.predict(files, k=2)
    assert len(preds) == 2 and all(len(p) == 2 for p in preds)
    audio = api.zero_shot("<>", ["red", "green"], model=model, modality="audio").embed(files)
    assert audio.shape == (2, 16) and torch.allclose(audio.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="cannot use"):
        clf.predict([clip_set / "bad.mp4"])


# ------------------------------------------------------------------ mixtures of image-text and video shards
def mixture_tree(toy_shards, clip_set, run_dir, **train):
    from tests.conftest import TINY_MODEL, experiment_tree

    towers = {
        **TINY_MODEL["towers"],
        "video": {
            "encoder": "vivit_fe",
            "params": VIVIT,
        },
    }
    video_ops = [{"op": "decode_video"}, {"op": "caption"}, {"op": "tokenize"}]
    tree = experiment_tree(
        toy_shards,
        run_dir,
        model={"towers": towers},
        loss={"pairs": [{"a": "image", "b": "text"}, {"a": "video", "b": "text"}]},
        train={"steps": 8, "ckpt_every": 4, **train},
    )
    tree["data"].pop("train")
    tree["data"]["batch_size"] = 4
    tree["data"]["sources"] = [
        {"train": str(toy_shards), "weight": 1.0},
        {"train": str(clip_set / "shards"), "weight": 1.0, "ops": video_ops},
    ]
    return tree


def test_mixture_trains_both_pairs_and_resumes_its_sequence(toy_shards, clip_set, tmp_path):
    from mmpretrain import api
    from mmpretrain.data.loader import build_loader
    from mmpretrain.training.validate import experiment_from_tree

    cfg = experiment_from_tree(mixture_tree(toy_shards, clip_set, tmp_path / "run"))
    run = api.train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/image-text" in r for r in rows) and any("loss/video-text" in r for r in rows)
    # the source sequence depends only on (seed, step): the same on every rank, continued on resume
    model = ContrastiveModel(cfg.model)
    loader = build_loader(cfg.data, model.data_context(), seed=0)
    it = iter(loader)
    first = [next(it).keys for _ in range(3)]
    resumed = iter(build_loader(cfg.data, model.data_context(), seed=0, state=loader.state_dict()))
    assert [next(resumed).keys for _ in range(2)] == [next(it).keys for _ in range(2)]
    assert first and {loader.source_of(i) for i in range(20)} == {0, 1}
    import dataclasses

    other_rank = build_loader(
        dataclasses.replace(cfg.data, resampled=True), model.data_context(), seed=0, rank=1, world_size=2
    )
    assert [other_rank.source_of(i) for i in range(20)] == [loader.source_of(i) for i in range(20)]


def test_mixture_config_is_checked(toy_shards, clip_set, tmp_path):
    from mmpretrain.config.strict import ConfigError
    from mmpretrain.training.validate import experiment_from_tree

    tree = mixture_tree(toy_shards, clip_set, tmp_path)
    tree["data"]["train"] = str(toy_shards)
    with pytest.raises(ConfigError, match="not both"):
        experiment_from_tree(tree)
    tree = mixture_tree(toy_shards, clip_set, tmp_path)
    tree["data"]["sources"][1]["weight"] = 0
    with pytest.raises(ConfigError, match="weight"):
        experiment_from_tree(tree)


# ------------------------------------------------------------------ VATT-MA: one shared trunk
def shared_cfg(**extra):
    from mmpretrain.training.validate import experiment_from_tree

    common = {"width": 32, "heads": 2}
    return experiment_from_tree(
        {
            "model": {
                "embed_dim": 16,
                "shared_backbone": ["video", "audio", "text"],
                "towers": {
                    "video": {
                        "encoder": "vivit_fe",
                        "params": {
                            "frames": 4,
                            "fps": 4.0,
                            "image_size": 32,
                            "tubelet_frames": 2,
                            "patch_size": 16,
                            "spatial_layers": 2,
                            "temporal_layers": 1,
                            **common,
                        },
                    },
                    "audio": {
                        "encoder": "waveform",
                        "params": {"sample_rate": 8000, "seconds": 0.5, "layers": 2, **common},
                    },
                    "text": {"encoder": "vatt_text", "params": {"context_length": 12, "layers": 2, **common, **extra}},
                },
            },
            "loss": {"pairs": [{"a": "video", "b": "text"}, {"a": "video", "b": "audio"}]},
        }
    ).model


def test_shared_backbone_is_one_trunk_that_trains_and_round_trips(tmp_path):
    from safetensors.torch import load_model, save_model

    from mmpretrain.config.schema import OptimConfig
    from mmpretrain.training.optim import param_groups

    torch.manual_seed(0)
    m = ContrastiveModel(shared_cfg())
    assert m.towers["video"].blocks is m.towers["audio"].blocks is m.towers["text"].blocks
    separate = ContrastiveModel(dataclass_replace(shared_cfg(), shared_backbone=[]))
    n_shared = sum(p.numel() for p in m.parameters())
    assert n_shared < sum(p.numel() for p in separate.parameters())
    groups = param_groups(m, OptimConfig(), m.cfg)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))  # no parameter twice
    batch = {
        **m.towers["video"].example_batch(3),
        **m.towers["audio"].example_batch(3),
        **m.towers["text"].example_batch(3),
    }
    out = m(batch)
    ContrastiveTask(LossConfig(pairs=[LossPair("video", "text"), LossPair("video", "audio")])).losses(out)[
        "loss"
    ].backward()
    assert m.towers["text"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    save_model(m, str(tmp_path / "m.safetensors"))
    fresh = ContrastiveModel(shared_cfg())
    load_model(fresh, str(tmp_path / "m.safetensors"))
    m.eval(), fresh.eval()
    assert torch.allclose(fresh(batch)["text"], m(batch)["text"], atol=1e-6)


def test_shared_backbone_needs_matching_blocks():
    from mmpretrain.config.strict import ConfigError

    with pytest.raises(ConfigError, match="same width"):
        ContrastiveModel(shared_cfg(layers=3))


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ------------------------------------------------------------------ text -> video search through the FAISS index
def test_retrieval_embeds_video_and_searches_it_by_text(model, clip_set, tmp_path):
    from mmpretrain.config.loader import dump_config
    from mmpretrain.training.checkpoint import save_checkpoint, weights_only
    from mmpretrain.training.validate import experiment_from_tree
    from retrieval.jobs.embed import EmbedConfig, load_embeddings, run_embed
    from retrieval.jobs.index import BuildConfig, build_index
    from retrieval.jobs.search import Searcher

    tree = {
        "model": {
            "embed_dim": 16,
            "towers": {m: {"encoder": t.encoder, "params": t.params} for m, t in TINY.towers.items()},
        },
        "loss": {"pairs": [{"a": "video", "b": "text"}, {"a": "video", "b": "audio"}]},
    }
    ckpt = save_checkpoint(
        tmp_path / "run", 1, weights_only(model), {}, dump_config(experiment_from_tree(tree)), keep_last=1
    )
    stats = run_embed(
        EmbedConfig(
            model=str(ckpt), data=str(clip_set / "shards"), out=str(tmp_path / "emb"), modality="video", batch_size=4
        ),
        progress=False,
    )
    assert stats["items"] == 10 and stats["bad"] == {"bad_video": 1}
    emb = load_embeddings(tmp_path / "emb")
    meta = emb.meta()
    assert emb.header["modality"] == "video" and set(meta.column("modality").to_pylist()) == {"video"}
    assert all(n > 100 for n in meta.column("thumb_len").to_pylist())  # a JPEG of the middle frame each
    expected = model.encode(
        "video",
        {
            "video": torch.stack(
                [
                    build("decode_video", DecodeVideoParams(train=False), model.data_context())(dict(s))["video"]
                    for s in _first_clip(clip_set)
                ]
            )
        },
    )
    assert np.allclose(emb.array()[:1], expected.detach().numpy(), atol=2e-3)  # float16 storage
    build_index(tmp_path / "emb", tmp_path / "ix", BuildConfig(), progress=False)
    hits = Searcher.open(tmp_path / "ix").search(["a red circle moving left"], k=3)[0]
    assert len(hits) == 3 and all(h.modality == "video" for h in hits)
    audio = run_embed(
        EmbedConfig(
            model=str(ckpt), data=str(clip_set / "shards"), out=str(tmp_path / "aemb"), modality="audio", batch_size=4
        ),
        progress=False,
    )
    assert audio["items"] == 10


def _first_clip(clip_set):
    import tarfile

    tar = sorted((clip_set / "shards").glob("*.tar"))[0]
    with tarfile.open(tar) as tf:
        names = sorted(m.name for m in tf.getmembers() if m.name.endswith(".mp4"))
        return [{"__key__": names[0][:-4], "mp4": tf.extractfile(names[0]).read()}]


def test_init_from_applies_to_fresh_runs_only(model, clip_set, tmp_path):
    """A fresh run starts its video tower from init_from; its resume reads its own checkpoint, not init_from."""
    import copy

    from safetensors.torch import load_file, save_model

    from mmpretrain import api
    from mmpretrain.training.validate import experiment_from_tree

    marked = copy.deepcopy(model)
    with torch.no_grad():
        marked.towers["video"].tubelet.weight.add_(1.0)  # unlike any fresh init
    save_model(marked, str(tmp_path / "start.safetensors"))
    towers = {m: {"encoder": t.encoder, "params": t.params} for m, t in TINY.towers.items() if m != "audio"}
    towers["video"]["init_from"] = str(tmp_path / "start.safetensors")
    tree = {
        "model": {"embed_dim": 16, "towers": towers},
        "loss": {"pairs": [{"a": "video", "b": "text"}]},
        "data": {
            "train": str(clip_set / "shards"),
            "batch_size": 4,
            "num_workers": 0,
            "shuffle_buffer": 4,
            "ops": [{"op": "decode_video"}, {"op": "caption"}, {"op": "tokenize"}],
        },
        "optim": {"lr": 1e-9, "warmup_steps": 1},
        "train": {"steps": 4, "stop_after": 2, "ckpt_every": 2, "run_dir": str(tmp_path / "run"), "progress": False},
    }
    run = api.train(experiment_from_tree(tree))
    saved = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    start = marked.towers["video"].tubelet.weight
    assert torch.allclose(saved["towers.video.tubelet.weight"], start, atol=1e-5)  # lr ~ 0: still the init
    (tmp_path / "start.safetensors").unlink()  # a resume must not need it
    tree["train"].update(stop_after=None, resume="latest")
    api.train(experiment_from_tree(tree))
    assert (run / "checkpoints" / "step_00000004").is_dir()


def test_stream_keeps_samples_without_optional_audio_and_counts_them(tmp_path):
    from mmpretrain.config.schema import DataConfig, OpSpec
    from mmpretrain.data.loader import ResumableLoader
    from tests.conftest import write_shard

    rng = random.Random(5)
    samples = []
    for i in range(4):
        data, caption = make_clip(rng, size=32, n_frames=8, fps=8, audio=i % 2 == 0)
        samples.append({"__key__": f"{i:03d}", "mp4": data, "txt": caption.encode()})
    write_shard(tmp_path / "s.tar", samples)
    ops = [
        OpSpec("decode_video", {"frames": 4, "fps": 4.0, "size": 32}),
        OpSpec("decode_audio", {"sample_rate": 8000, "seconds": 0.5, "optional": True}),
    ]
    cfg = DataConfig(
        train=str(tmp_path / "s.tar"), batch_size=4, num_workers=0, shuffle_buffer=0, ops=ops, max_errors=0
    )  # absent modalities are not errors: max_errors=0 must not trip
    loader = ResumableLoader(cfg, CTX, seed=0)
    batch = next(iter(loader))
    valid = dict(zip(batch.keys, batch.data["audio_valid"].tolist()))
    assert valid == {"000": True, "001": False, "002": True, "003": False}
    assert batch.data["audio"].shape == (4, 4000) and batch.data["audio"][1].abs().sum() == 0
    assert loader.error_counts() == {"absent_audio": 2}
