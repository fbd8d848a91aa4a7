#!/usr/bin/env python
"""Decoding throughput on the same synthetic MP4 clips (H.264 + AAC, PyAV-written):

video: our ``decode_video`` op (T frames at an fps, short side resized, centre crop, normalised)
       vs plain decord loops doing the same frame sampling: with the same resize + crop +
       normalise in torchvision after get_batch (like for like: the headline ratio), with the
       resize done by decord (``VideoReader(width=, height=)``, the dimensions known in advance),
       and with no transforms at all (the old baseline); and PyAV (decode every frame);
audio: our ``decode_audio`` op (decord AudioReader, resampled, windowed, masked) vs plain
       PyAV decoding + torchaudio resampling of the track.

  python benchmarks/decode.py [--clips 100] [--src-size 256] [--size 112] [--frames 32]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from logs import header  # noqa: E402
from make_toy_clips import make_clip  # noqa: E402

from mmpretrain.data.av_ops import DecodeAudioParams, DecodeVideoParams, frame_indices  # noqa: E402
from mmpretrain.data.ops import DATA_OPS, OpContext  # noqa: E402
from mmpretrain.types import ImageSpec  # noqa: E402


def rate(fn, clips: list[bytes]) -> float:
    fn(clips[0])  # warm-up
    start = time.perf_counter()
    for c in clips:
        fn(c)
    return len(clips) / (time.perf_counter() - start)


def rates(fns: dict, clips: list[bytes], rounds: int) -> dict[str, float]:
    """The best of ``rounds`` interleaved runs of each (the order of a single pass biases it)."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], rate(fn, clips))
    return best


def plain_decord(frames: int, fps: float):
    import decord

    def run(data: bytes):
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        idx = frame_indices(len(vr), vr.get_avg_fps(), frames, fps, 0.5)
        return vr.get_batch(np.maximum(idx, 0).tolist()).asnumpy()

    return run


def plain_decord_transformed(frames: int, fps: float, size: int, resize_in_decord: bool):
    """A user's decord loop with the same sampling, resize (short side), centre crop and normalise."""
    import decord
    from torchvision.transforms.v2 import functional as TF

    mean, std = torch.tensor([0.45] * 3).view(1, 3, 1, 1), torch.tensor([0.225] * 3).view(1, 3, 1, 1)

    def run(data: bytes):
        dims = {"width": size, "height": size} if resize_in_decord else {}  # the square clips' size, known
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1, **dims)
        idx = frame_indices(len(vr), vr.get_avg_fps(), frames, fps, 0.5)
        x = torch.from_numpy(vr.get_batch(np.maximum(idx, 0).tolist()).asnumpy()).permute(0, 3, 1, 2)
        if not resize_in_decord:
            x = TF.resize(x, size, antialias=True)
        x = TF.center_crop(x, [size, size]).float().div_(255)
        return (x - mean) / std

    return run


def plain_pyav(frames: int, fps: float):
    import av

    def run(data: bytes):
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.video[0]
            imgs = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
            idx = frame_indices(len(imgs), float(stream.average_rate or 25), frames, fps, 0.5)
            return np.stack([imgs[max(i, 0)] for i in idx])

    return run


def plain_audio(rate_hz: int):
    import av
    import torchaudio

    def run(data: bytes):
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.audio[0]
            wave = np.concatenate([f.to_ndarray().mean(0) for f in c.decode(stream)])
            return torchaudio.functional.resample(torch.from_numpy(wave.astype(np.float32)), stream.rate, rate_hz)

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--src-size", type=int, default=256, help="the clips' frame size (square)")
    p.add_argument("--size", type=int, default=112, help="the model's input size (short side, crop)")
    p.add_argument("--frames", type=int, default=32, help="frames per source clip (at 8 fps)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    p.add_argument("--take", type=int, default=8, help="frames sampled per clip (at 4 fps)")
    args = p.parse_args()
    print(header(), flush=True)
    torch.set_num_threads(1)
    rng = random.Random(0)
    clips = [make_clip(rng, size=args.src_size, n_frames=args.frames, fps=8)[0] for _ in range(args.clips)]
    ctx = OpContext({"image": ImageSpec(size=(args.size, args.size))})
    ours_v = DATA_OPS.get("decode_video").builder(DecodeVideoParams(frames=args.take, fps=4.0, train=False), ctx)
    ours_a = DATA_OPS.get("decode_audio").builder(DecodeAudioParams(sample_rate=16000, seconds=2.0, train=False), ctx)
    v = rates(
        {
            "ours (decode_video)": lambda c: ours_v({"mp4": c}),
            "decord + torchvision resize": plain_decord_transformed(args.take, 4.0, args.size, False),
            "decord resizing (dims known)": plain_decord_transformed(args.take, 4.0, args.size, True),
            "decord, no transforms": plain_decord(args.take, 4.0),
            "PyAV (all frames)": plain_pyav(args.take, 4.0),
        },
        clips,
        args.rounds,
    )
    base = "decord + torchvision resize"
    a = rates(
        {
            "ours (decode_audio)": lambda c: ours_a({"mp4": c}),
            "PyAV + torchaudio resample": plain_audio(16000),
        },
        clips,
        args.rounds,
    )
    print(
        f"{args.clips} clips, {args.frames} frames of {args.src_size}x{args.src_size} at 8 fps + AAC audio, "
        f"{args.take} frames sampled at 4 fps -> {args.size} px; one thread, best of {args.rounds} interleaved rounds"
    )
    for name, r in v.items():
        print(f"  video {name:30s} {r:8.1f} clips/s   ({r / v[base]:.2f}x {base})")
    for name, r in a.items():
        print(f"  audio {name:28s} {r:8.1f} clips/s   ({r / a['PyAV + torchaudio resample']:.2f}x PyAV+torchaudio)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
