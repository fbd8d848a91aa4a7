#!/usr/bin/env python
"""Synthetic captioned video clips with sound, for tests and the video-audio-text smoke run.

A coloured shape moves (left, right, up, down) or grows on a plain background; its soundtrack
is a tone whose pitch names the colour and whose rhythm names the motion. Captions say both:
"a red circle moving left". Clips are H.264 + AAC in MP4 (PyAV), ~3 KB each at 32 px.

    python scripts/make_toy_clips.py --out data/toy_clips --count 200
    mmpretrain shards make --video --images data/toy_clips --captions data/toy_clips/captions.csv --out ...
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import numpy as np

from mmpretrain.corpora.av_encode import encode_mp4

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
PITCH = {"red": 330.0, "green": 440.0, "blue": 550.0, "yellow": 660.0}
SHAPES = ("square", "circle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing")


def frames(color: str, shape: str, motion: str, n: int, size: int, rng: random.Random) -> np.ndarray:
    """(n, size, size, 3) uint8 frames of the shape in motion."""
    out = np.full((n, size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2), size / 6
    for t in range(n):
        f = t / max(n - 1, 1)
        dx = {"moving left": -1, "moving right": 1}.get(motion, 0) * (f - 0.5) * size / 2
        dy = {"moving up": -1, "moving down": 1}.get(motion, 0) * (f - 0.5) * size / 2
        rr = r * (0.5 + f) if motion == "growing" else r
        x, y = xx - (cx + dx), yy - (cy + dy)
        inside = (x**2 + y**2 <= rr**2) if shape == "circle" else (np.abs(x) <= rr) & (np.abs(y) <= rr)
        out[t][inside] = COLORS[color]
    return out


def tone(color: str, motion: str, seconds: float, rate: int) -> np.ndarray:
    """(samples,) float32 tone: pitch from the colour, beat pattern from the motion."""
    t = np.arange(int(seconds * rate)) / rate
    beats = 2 + MOTIONS.index(motion)
    env = 0.5 * (1 + np.sign(np.sin(2 * np.pi * beats * t)))
    return (0.3 * env * np.sin(2 * np.pi * PITCH[color] * t)).astype(np.float32)


def make_clip(
    rng: random.Random, *, size: int = 32, n_frames: int = 16, fps: int = 8, rate: int = 16000, audio: bool = True
) -> tuple[bytes, str]:
    color, shape, motion = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(MOTIONS)
    video = frames(color, shape, motion, n_frames, size, rng)
    sound = tone(color, motion, n_frames / fps, rate) if audio else None
    return encode_mp4(video, fps, sound, rate), f"a {color} {shape} {motion}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    (args.out / "clips").mkdir(parents=True, exist_ok=True)
    with open(args.out / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for i in range(args.count):
            data, caption = make_clip(rng, size=args.size, n_frames=args.frames)
            name = f"clips/{i:05d}.mp4"
            (args.out / name).write_bytes(data)
            w.writerow([name, caption])
    print(f"wrote {args.count} clips and captions.csv to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
