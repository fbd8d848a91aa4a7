#!/usr/bin/env python
"""Every GPU figure of docs/performance.md in one run (prepared for the device machine's 15 minutes).

    python benchmarks/gpu_figures.py --out runs/gpu_figures           # on a CUDA machine
    python benchmarks/gpu_figures.py --smoke --out runs/gpu_smoke     # the same code on the CPU, tiny

Sections (``--only`` picks some), each a table row per variant, all also written to OUT/figures.json:

  train   ViT-B/16 at 224 px on synthetic JPEG shards, bf16: images/s and data-wait of our trainer
          with the GPU-fed path (jpeg_bytes -> decode_jpeg on the device) and with CPU decoding,
          vs a plain open_clip loop (open_clip.create_model + ClipLoss + AdamW, a webdataset +
          PIL DataLoader with the same workers, data-wait timed the same way). Batch: --batch,
          halved until it fits.
  vatt    the VATT motion config's data-wait on synthetic clips at its frame/audio settings.
  fsdp    DDP vs FSDP2 (and FSDP2 with CPU offload) on --fsdp-model: peak CUDA memory and images/s
          (one rank: what sharding saves is the optimizer state and gradients layout; with W ranks
          each holds 1/W).
  faiss   faiss-cpu vs faiss-gpu IVF training and search at --faiss-n x 512 (skipped, saying why,
          where faiss has no GPU).

Each section catches its own failure and prints it as the row, so one broken part costs only itself.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from tests.conftest import TINY_MODEL  # noqa: E402  (the tests' tiny open_clip model: --smoke)

VIT_B16 = {
    "embed_dim": 512,
    "towers": {
        "image": {"encoder": "openclip_vision", "params": {"model_name": "ViT-B-16"}},
        "text": {"encoder": "openclip_text", "params": {"model_name": "ViT-B-16"}},
    },
}
GPU_OPS = [{"op": "jpeg_bytes"}, {"op": "caption"}, {"op": "tokenize"}]


# ------------------------------------------------------------------ synthetic JPEG shards
def jpeg_shards(out: Path, count: int, size: int, per_shard: int = 500) -> Path:
    """``count`` smooth random RGB JPEGs (``size`` px, quality 90: ~web-like sizes) with captions."""
    from PIL import Image
    from webdataset import TarWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(math.ceil(count / per_shard)):
        with TarWriter(str(out / f"shard-{s:06d}.tar")) as w:
            for i in range(s * per_shard, min(count, (s + 1) * per_shard)):
                small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": f"a photo of thing {i % 1000}".encode()})
    return out


def _tail(run_dir: Path, skip: int) -> dict:
    """The mean of the metrics rows after the first ``skip`` (warm-up) rows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][skip:]
    keys = ("samples_per_s", "data_wait_frac", "cuda_max_mem_gib")
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys if any(k in r for r in rows)}


def ours(shards: Path, model: dict, args, work: Path, name: str, gpu_decode: bool, **train) -> dict:
    from mmpretrain import api
    from mmpretrain.training.validate import experiment_from_tree

    data = {"train": str(shards), "batch_size": args.batch, "num_workers": args.workers, "shuffle_buffer": 1000}
    if gpu_decode:
        data |= {"ops": GPU_OPS, "device_ops": [{"op": "decode_jpeg"}]}
    tree = {
        "model": model,
        "data": data,
        "optim": {"lr": 5e-4, "warmup_steps": 10},
        "train": {
            "run_dir": str(work / name),
            "steps": args.steps,
            "log_every": max(1, args.steps // 10),
            "ckpt_every": 10**9,
            "overwrite": True,
            "progress": False,
            "precision": args.precision,
            **train,
        },
    }
    run_dir = api.train(experiment_from_tree(tree))
    return _tail(run_dir, skip=2)


def open_clip_loop(shards: Path, args) -> dict:
    """open_clip's own recipe: webdataset + PIL decode + RandomResizedCrop in DataLoader workers, the
    model in bf16 autocast, ClipLoss, AdamW, grad clipping; data-wait = time blocked on next()."""
    import open_clip
    import webdataset as wds

    name = "ViT-B-16" if not args.smoke else None
    if name:
        model, preprocess, _ = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        t = TINY_MODEL["towers"]
        model = open_clip.CLIP(32, t["image"]["params"]["vision_cfg"], t["text"]["params"]["text_cfg"])
        preprocess = open_clip.image_transform(32, is_train=True)
        tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=12)
    device = torch.device(args.device)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2)
    loss_fn = open_clip.ClipLoss()
    ds = (
        wds.WebDataset(
            sorted(str(f) for f in shards.glob("*.tar")),
            shardshuffle=False,
            empty_check=False,
        )
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(preprocess, lambda t: tokenizer([t])[0])
        .batched(args.batch)
        .repeat()
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda"
    )
    it, wait, n = iter(loader), 0.0, 0
    bf16 = args.precision == "bf16"
    for step in range(args.steps):
        t0 = time.perf_counter()
        images, texts = next(it)
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        if step == 2:
            wait, n, start = 0.0, 0, time.perf_counter()
        wait += time.perf_counter() - t0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        n += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": n / elapsed, "data_wait_frac": wait / elapsed}


def section_train(args, work: Path) -> list[dict]:
    shards = jpeg_shards(work / "jpeg", args.images, 64 if args.smoke else 256)
    model = TINY_MODEL if args.smoke else VIT_B16
    rows = []
    while True:
        try:
            rows = [
                {"variant": "ours, GPU decode", **ours(shards, model, args, work, "gpu", True)},
                {"variant": "ours, CPU decode", **ours(shards, model, args, work, "cpu", False)},
                {"variant": "open_clip loop", **open_clip_loop(shards, args)},
            ]
            break
        except torch.OutOfMemoryError:
            args.batch //= 2
            print(f"  out of memory: batch -> {args.batch}", flush=True)
            torch.cuda.empty_cache()
    base = rows[-1]["samples_per_s"]
    for r in rows:
        r |= {"batch": args.batch, "vs_open_clip": r["samples_per_s"] / base}
    return rows


def section_vatt(args, work: Path) -> list[dict]:
    from mmpretrain import api
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    clips = work / "clips"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/make_toy_clips.py"),
            "--out",
            str(clips),
            "--count",
            str(64 if args.smoke else 2000),
            "--size",
            "64",
        ],
        check=True,
        capture_output=True,
    )
    make_shards(
        clips, clips / "captions.csv", clips / "shards", ShardWriterConfig(max_count=100, media="video"), progress=False
    )
    overrides = [
        f"data.train={clips / 'shards'}",
        f"data.num_workers={args.workers}",
        "train.progress=false",
        f"train.steps={args.steps}",
        f"train.log_every={max(1, args.steps // 10)}",
        "train.ckpt_every=1000000000",
        f"train.run_dir={work / 'vatt'}",
        f"train.precision={args.precision}",
    ]
    run_dir = api.train(ROOT / "configs/experiment/motion_vat.yaml", overrides)
    return [{"variant": f"motion_vat, {args.workers} workers", **_tail(run_dir, skip=2)}]


def section_fsdp(args, work: Path) -> list[dict]:
    if not (work / "jpeg").is_dir():  # the children read the train section's shards
        jpeg_shards(work / "jpeg", args.images, 64 if args.smoke else 256)
    rows = []
    for name, train in (
        ("ddp", {"strategy": "ddp"}),
        ("fsdp", {"strategy": "fsdp"}),
        ("fsdp + cpu offload", {"strategy": "fsdp", "fsdp": {"cpu_offload": True}}),
    ):
        if "cpu_offload" in str(train) and args.device != "cuda":
            continue  # offload is CUDA-only
        tree = json.dumps({"model": TINY_MODEL if args.smoke else args.fsdp_model, "train": train})
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            __file__,
            "--child-fsdp",
            tree,
            "--child-dir",
            str(work / name.replace(" ", "_")),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--workers",
            str(args.workers),
            "--precision",
            args.precision,
            "--images",
            str(args.images),
        ]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        result = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        rows.append({"variant": name, **(result[-1] if result else {"error": proc.stderr.strip()[-300:]})})
    return rows


def fsdp_child(args) -> None:
    spec = json.loads(args.child_fsdp)
    model = VIT_B16 if spec["model"] == "ViT-B-16" else spec["model"]
    if isinstance(model, str):
        model = {
            "embed_dim": 768,
            "towers": {
                m: {"encoder": f"openclip_{k}", "params": {"model_name": model}}
                for m, k in (("image", "vision"), ("text", "text"))
            },
        }
    out = ours(
        Path(args.child_dir).parent / "jpeg",
        model,
        args,
        Path(args.child_dir).parent,
        Path(args.child_dir).name,
        True,
        **spec["train"],
    )
    print(json.dumps(out), flush=True)


def section_faiss(args, work: Path) -> list[dict]:
    import faiss

    from retrieval.jobs.gpu import gpu_count, gpu_training, to_gpu
    from tests.conftest import clustered

    n, d = (20_000, 64) if args.smoke else (args.faiss_n, 512)
    x = clustered(n, d, 64).astype(np.float32)
    q = x[np.random.default_rng(1).choice(n, 10_000 if not args.smoke else 500, replace=False)]
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    rows = []
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and gpu_count() == 0:
            rows.append({"variant": "faiss-gpu", "error": "this faiss sees no GPU (install the gpu extra)"})
            continue
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        with gpu_training(index, dev == "cuda"):
            index.train(x[: 50 * nlist])
        train_s, t0 = time.perf_counter() - t0, time.perf_counter()
        index.add(x)
        add_s = time.perf_counter() - t0
        index.nprobe = 32
        searcher = to_gpu(index, dev == "cuda")
        searcher.search(q[:100], 10)
        t0 = time.perf_counter()
        searcher.search(q, 10)
        rows.append(
            {
                "variant": f"faiss-{dev}",
                "n": n,
                "train_s": train_s,
                "add_s": add_s,
                "qps_nprobe32": len(q) / (time.perf_counter() - t0),
            }
        )
    return rows


SECTIONS = {"train": section_train, "vatt": section_vatt, "fsdp": section_fsdp, "faiss": section_faiss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_figures")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--smoke", action="store_true", help="tiny model and data on the CPU (checks the script)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--images", type=int, default=40_000)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--fsdp-model", default="ViT-L-14")
    p.add_argument("--faiss-n", type=int, default=1_000_000)
    p.add_argument("--child-fsdp", help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.batch, args.steps, args.workers, args.images, args.precision = 8, 6, 1, 64, "fp32"
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.child_fsdp:
        fsdp_child(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"batch {args.batch}, {args.steps} steps, {args.workers} workers, {args.precision}",
        flush=True,
    )
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            start = time.perf_counter()
            try:
                rows = SECTIONS[name](args, Path(tmp))
            except Exception as exc:  # one broken section costs only itself
                rows = [{"variant": name, "error": f"{type(exc).__name__}: {exc}"}]
                traceback.print_exc()
            figures[name] = rows
            print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
            for r in rows:
                print(
                    "  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                    flush=True,
                )
            (out / "figures.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
