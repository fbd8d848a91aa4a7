#!/usr/bin/env python
"""Write a folder of synthetic captioned images (coloured shapes) and a captions file.

    python scripts/make_toy_images.py --out data/toy --count 500

Writes ``OUT/images/*.png`` and ``OUT/captions.csv`` (columns: file, caption). The captions
name the shape, colour and background, so a contrastive model has something to learn.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
TEMPLATES = ("a {c} {s}", "a {c} {s} on a {b} background", "a photo of a {c} {s}", "{c} {s}, {b} background")


def draw(shape: str, color: tuple, bg: tuple, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        w = max(2, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    return img


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(args.count):
            c, b, s = rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS)), rng.choice(SHAPES)
            if COLORS[c] == BACKGROUNDS[b]:
                continue
            name = f"images/{i:05d}.png"
            draw(s, COLORS[c], BACKGROUNDS[b], args.size, rng).save(out / name)
            writer.writerow([name, rng.choice(TEMPLATES).format(c=c, s=s, b=b)])
    print(f"wrote {args.count} images and captions.csv to {out}")


if __name__ == "__main__":
    main()
