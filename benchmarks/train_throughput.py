#!/usr/bin/env python
"""Training throughput: our trainer vs a plain open_clip loop, and the data pipeline alone.

    python benchmarks/train_throughput.py                      # tiny model, batch 64
    python benchmarks/train_throughput.py --model configs/model/vit_b32.yaml --batch 16 --steps 5

Part 1 trains the same architecture (open_clip's CLIP built from the same vision/text
config), same batch size, same in-memory batches, same optimizer settings, in the same
process, alternating rounds, and prints samples/s for both and the ratio ours/open_clip.
Checkpoint writes are excluded from our trainer's timing (the plain loop writes none).
Part 2 streams the same shards through our pipeline (decode, random crop, normalise,
tokenise, batch) and through a plain webdataset pipeline doing the same work.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from logs import header

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def toy_shards(tmp: Path, count: int) -> Path:
    import subprocess

    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_toy_images.py"), "--out", str(tmp), "--count", str(count)],
        check=True,
        capture_output=True,
    )
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    make_shards(tmp, tmp / "captions.csv", tmp / "shards", ShardWriterConfig(max_count=100), progress=False)
    return tmp / "shards"


class InMemoryLoader:
    """Stands in for ResumableLoader: cycles pre-built batches (no decode cost)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(itertools.cycle(self.batches))

    def state_dict(self):
        return {}

    def error_counts(self):
        return {}


def make_batches(model, n_batches: int, batch: int):
    from mmpretrain.data.stream import Position, WorkerBatch

    size = model.towers["image"].image_size
    tok = model.tokenizer()
    out = []
    for i in range(n_batches):
        g = torch.Generator().manual_seed(i)
        data = {
            "image": torch.randn(batch, 3, *size, generator=g),
            **tok([f"a photo of thing {i}-{j}" for j in range(batch)]),
        }
        out.append(WorkerBatch(data, [str(j) for j in range(batch)], 0, Position()))
    return out


def ours(cfg, batches, steps: int, warmup: int) -> float:
    from mmpretrain.training.dist import DistInfo
    from mmpretrain.training.run import build_trainer

    trainer = build_trainer(cfg, DistInfo())
    trainer.loader = InMemoryLoader(batches)
    trainer.save = lambda: None  # exclude checkpoint I/O from the timing
    trainer.cfg = replace(cfg, train=replace(cfg.train, stop_after=warmup))
    trainer.fit()
    trainer.cfg = replace(cfg, train=replace(cfg.train, stop_after=warmup + steps))
    t0 = time.perf_counter()
    trainer.fit()
    return steps * batches[0].data["image"].shape[0] / (time.perf_counter() - t0)


def open_clip_loop(cfg, batches, steps: int, warmup: int) -> float:
    """The plain loop: open_clip.CLIP + ClipLoss + AdamW + clip-grad + clamp, as open_clip_train does."""
    import math

    import open_clip

    towers = cfg.model.towers
    model = open_clip.CLIP(
        cfg.model.embed_dim,
        vision_cfg=_open_clip_section(towers["image"].params, "vision_cfg"),
        text_cfg=_open_clip_section(towers["text"].params, "text_cfg"),
    )
    loss_fn = open_clip.ClipLoss()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
    )
    model.train()

    def step(b):
        img_f, txt_f, scale = model(b.data["image"], b.data["text"])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm or float("inf"))
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    it = itertools.cycle(batches)
    for _ in range(warmup):
        step(next(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(it))
    return steps * batches[0].data["image"].shape[0] / (time.perf_counter() - t0)


def _open_clip_section(params: dict, section: str) -> dict:
    import open_clip

    base = dict(open_clip.get_model_config(params["model_name"])[section]) if params.get("model_name") else {}
    return {**base, **params.get(section, {})}


def data_pipeline(cfg, shards: Path, samples: int) -> tuple[float, float]:
    """Samples/s of our loader and of a plain webdataset pipeline doing the same work."""
    import webdataset as wds
    from torchvision.transforms import v2 as T

    from mmpretrain.data.loader import ResumableLoader
    from mmpretrain.models import build_model

    model = build_model(cfg.model)
    ctx = model.data_context()
    loader = ResumableLoader(cfg.data, ctx, seed=0)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    while n < samples:
        n += len(next(it).keys)
    ours_sps = n / (time.perf_counter() - t0)

    tf = T.Compose(
        [
            T.RandomResizedCrop(ctx.image.size, scale=(0.9, 1.0), antialias=True),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(ctx.image.mean), list(ctx.image.std)),
        ]
    )
    tok = ctx.tokenizer
    ds = (
        wds.WebDataset(cfg.data.train, shardshuffle=False, empty_check=False)
        .shuffle(cfg.data.shuffle_buffer)
        .decode("pil")
        .to_tuple("png", "txt")
        .map_tuple(tf, lambda t: tok([t])["text"][0])
        .batched(cfg.data.batch_size)
        .repeat()
    )
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.data.num_workers)
    it = iter(dl)
    next(it)
    t0, n = time.perf_counter(), 0
    while n < samples:
        n += len(next(it)[0])
    return ours_sps, n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description="Trainer vs plain open_clip loop, and data pipeline throughput.")
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"), help="model YAML (default tiny)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="data workers for part 2")
    p.add_argument("--samples", type=int, default=2000, help="samples timed in part 2")
    args = p.parse_args()
    print(header(), flush=True)
    from mmpretrain.models import build_model
    from mmpretrain.training.validate import load_experiment as load_config

    with tempfile.TemporaryDirectory() as tmp:
        shards = toy_shards(Path(tmp), 1000)
        cfg = load_config(
            args.model,
            [
                f"data.train={shards}/shard-{{000000..000009}}.tar",
                f"data.batch_size={args.batch}",
                f"data.num_workers={args.workers}",
                "train.progress=false",
                "train.log_every=1000",
                "train.threads=2",
                f"train.steps={10 * args.steps * args.rounds}",
                f"train.run_dir={tmp}/run",
            ],
        )
        torch.set_num_threads(2)
        model = build_model(cfg.model)
        batches = make_batches(model, 4, args.batch)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"model {Path(args.model).name}: {n_params / 1e6:.2f}M parameters, batch {args.batch}, "
            f"{torch.get_num_threads()} threads, device cpu"
        )
        a, b = [], []
        for r in range(args.rounds):  # alternate which goes first, to cancel order/allocator effects
            for fn, out in [(ours, a), (open_clip_loop, b)] if r % 2 == 0 else [(open_clip_loop, b), (ours, a)]:
                torch.set_num_threads(2)
                out.append(fn(cfg, batches, args.steps, warmup=3))
            print(f"  round {r + 1}: ours {a[-1]:.2f} samples/s, open_clip {b[-1]:.2f} samples/s")
        ma, mb = statistics.median(a), statistics.median(b)
        print(
            f"train step (median of {args.rounds}): ours {ma:.2f} samples/s | open_clip loop {mb:.2f} samples/s | "
            f"ratio ours/open_clip {ma / mb:.3f}"
        )
        ours_d, wds_d = data_pipeline(cfg, shards, args.samples)
        print(
            f"data pipeline ({args.workers} worker(s), 64 px PNG -> {model.towers['image'].image_size[0]} px): "
            f"ours {ours_d:.0f} samples/s | plain webdataset {wds_d:.0f} samples/s | ratio {ours_d / wds_d:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
