#!/usr/bin/env python
"""Zero-shot classification throughput: our API vs open_clip's own loop, same model and inputs.

    python benchmarks/zero_shot.py                  # ViT-B-32 (random init), 128 images, 20 classes x 80 templates
    python benchmarks/zero_shot.py --model tiny     # a tiny model, fast

Both sides start from the same PIL images and the same weights (open_clip's model saved to a
file and loaded into ours). open_clip side: ``build_zero_shot_classifier`` + its eval
transform + ``encode_image`` + matmul, as CLIP_benchmark does. Ours: ``zero_shot(...)`` then
``clf.logits(images)``. Prints images/s for both, the ratio, and the class-embedding time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import open_clip
import torch
from logs import header
from PIL import Image

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description="Zero-shot images/s: mmpretrain API vs open_clip loop.")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, or 'tiny'")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(header(), flush=True)
    torch.set_num_threads(2)
    from safetensors.torch import save_file

    from mmpretrain import api
    from mmpretrain.eval.zeroshot import TEMPLATE_SETS
    from mmpretrain.models.formats import open_clip_model_config

    cfg = TINY if args.model == "tiny" else open_clip.get_model_config(args.model)
    torch.manual_seed(0)
    theirs = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    size = cfg["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, f"{tmp}/w.safetensors")
        ours = api.create_model(open_clip_model_config(cfg), pretrained=f"{tmp}/w.safetensors")
    classes = [f"class number {i}" for i in range(args.classes)]
    templates = TEMPLATE_SETS["imagenet80"]
    pics = images(args.images)
    print(
        f"model {args.model}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, {args.images} images "
        f"(320x256 -> {size}), {args.classes} classes x {len(templates)} templates, batch {args.batch}, 2 threads"
    )

    t0 = time.perf_counter()
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            theirs,
            tokenizer,
            classes,
            [lambda c, t=t: t.replace("<>", c) for t in templates],
            num_classes_per_batch=max(1, args.batch // len(templates) or 1),
            use_tqdm=False,
        )
    t_cls_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf = api.zero_shot(list(templates), classes, model=ours, batch_size=args.batch, progress=False)
    _ = clf.weights
    t_cls_ours = time.perf_counter() - t0

    def run_theirs() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(pics), args.batch):
                x = torch.stack([preprocess(im) for im in pics[i : i + args.batch]])
                out.append(100.0 * theirs.encode_image(x, normalize=True) @ weights)
        return torch.cat(out)

    def run_ours() -> torch.Tensor:
        return clf.logits(pics)

    a, b = [], []
    for r in range(args.rounds):
        for fn, acc in [(run_ours, a), (run_theirs, b)] if r % 2 == 0 else [(run_theirs, b), (run_ours, a)]:
            t0 = time.perf_counter()
            fn()
            acc.append(len(pics) / (time.perf_counter() - t0))
    agree = (run_ours().argmax(1) == run_theirs().argmax(1)).float().mean().item()
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"class embeddings: ours {t_cls_ours:.2f} s | open_clip {t_cls_theirs:.2f} s")
    print(
        f"zero-shot (median of {args.rounds}): ours {ma:.1f} images/s | open_clip {mb:.1f} images/s"
        f" | ratio ours/open_clip {ma / mb:.3f}"
    )
    print(f"top-1 agreement between the two: {100 * agree:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
