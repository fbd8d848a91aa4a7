"""The fault suite's poisoned corpus (``benchmarks/faults.py --sections poison``): a shard per hostile
member, read by the training loader with one worker beside 4 good samples. Each poison has the skip
reason it must be counted under (``EXPECTED``); the largest image the default caps accept is read too,
and must be trained on, not skipped."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import time
import zlib
from pathlib import Path

import yaml
from fault_common import ENV, PY, ROOT, say

from tests.conftest import raw_tar


# ------------------------------------------------------------------ poisoned corpus
def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


ACCEPTED = "accepted"  # the sample must be trained on: nothing skipped
# name -> the skip reason the poison must be counted under (ACCEPTED: none; None: the clean baseline)
EXPECTED = {
    "clean shard (baseline)": None,
    "200k-deep JSON caption": "bad_json",
    "50 MB member": "oversized_member",
    "50 MB member (cap off)": "bad_image",
    "180-megapixel PNG": "bad_image",
    "largest accepted image": ACCEPTED,
    "EPS named .jpg": "bad_image",
    "non-UTF-8 text": "bad_caption",
    "../ member names": "unsafe_name",
    "empty WAV": "bad_audio",
    "truncated MP4": "bad_video",
    "zero-byte shard": "corrupt_shard",
    "hung pipe: shard": "stalled_shard",
}


def largest_accepted_png() -> tuple[bytes, str]:
    """A PNG of exactly the default ``max_pixels`` (100 MP, 10,000 x 10,000; a pattern, so it is not one
    colour), and its size in words."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (10_000, 10_000), (40, 90, 160))
    draw = ImageDraw.Draw(img)
    for i in range(0, 10_000, 500):
        draw.rectangle([i, i // 2, i + 250, i // 2 + 4000], fill=(i % 255, 200, 255 - i % 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "10,000 x 10,000 (100 MP, the default data.max_pixels)"


def poison_cases() -> dict[str, tuple[list[tuple[str, bytes]] | str, str]]:
    """name -> (the poison sample's tar members, or a shard URL; the modality its ops decode).
    A name ending in "(cap off)" reads its case with ``data.max_member_bytes`` raised to 1 GiB: the
    contrast that shows what the cap saves."""
    from make_toy_clips import make_clip
    from PIL import Image

    clip, _ = make_clip(random.Random(0), size=32, n_frames=16)
    wav = io.BytesIO()
    import wave

    with wave.open(wav, "wb") as w:  # a header and no frames
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    img = io.BytesIO()
    Image.new("RGB", (64, 64)).save(img, format="PNG")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
    return {
        "clean shard (baseline)": ([], "image"),
        "200k-deep JSON caption": ([("p.png", img.getvalue()), ("p.json", b"[" * 200_000 + b"]" * 200_000)], "image"),
        "50 MB member": ([("p.png", os.urandom(1 << 20) * 50), ("p.txt", b"big")], "image"),
        "50 MB member (cap off)": ([("p.png", os.urandom(1 << 20) * 50), ("p.txt", b"big")], "image"),
        "180-megapixel PNG": ([("p.png", _png_header(15000, 12000)), ("p.txt", b"bomb")], "image"),
        "largest accepted image": ([("p.png", largest_accepted_png()[0]), ("p.txt", b"huge but allowed")], "image"),
        "EPS named .jpg": ([("p.jpg", eps), ("p.txt", b"postscript")], "image"),
        "non-UTF-8 text": ([("p.png", img.getvalue()), ("p.txt", b"\xff\xfe\xfa\xc3\x28 caption")], "image"),
        "../ member names": ([("../p.png", img.getvalue()), ("../p.txt", b"escape")], "image"),
        "empty WAV": ([("p.wav", wav.getvalue()), ("p.txt", b"silence")], "audio"),
        "truncated MP4": ([("p.mp4", clip[: len(clip) // 3]), ("p.txt", b"cut")], "video"),
        "zero-byte shard": ("EMPTY", "image"),
        "hung pipe: shard": ("pipe:sleep 600", "image"),
    }


POISON_RUNNER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mmpretrain.training.validate import experiment_from_tree
from mmpretrain.data.loader import ResumableLoader
from mmpretrain.data.ops import OpContext
from mmpretrain.models import build_model
tree = json.loads(sys.argv[2])
cfg = experiment_from_tree(tree)
ctx = build_model(cfg.model).data_context()
loader = ResumableLoader(cfg.data, ctx, seed=0)
it, keys = iter(loader), []
for _ in range(int(sys.argv[3])):
    keys += next(it).keys
counts = loader.error_counts()
peak = 0  # the live worker's peak resident set (VmHWM), in kB
for worker in loader.loader._iterator._workers:
    for line in open(f"/proc/{worker.pid}/status"):
        if line.startswith("VmHWM:"):
            peak = max(peak, int(line.split()[1]))
print(json.dumps({"keys": keys, "counts": counts, "worker_rss_mb": peak / 1024}))
"""

MEDIA_OPS = {
    "image": [{"op": "decode_image"}, {"op": "resize_center_crop"}, {"op": "to_tensor_normalize"}],
    "audio": [{"op": "decode_audio", "params": {"sample_rate": 16000, "seconds": 1.0, "train": False}}],
    "video": [{"op": "decode_video", "params": {"frames": 4, "fps": 4, "size": 32, "train": False}}],
}


def poison_suite(work: Path) -> dict:
    from make_toy_clips import make_clip

    rows = {}
    for name, (members, modality) in poison_cases().items():
        rng = random.Random(1)
        good = []
        for i in range(4):
            data, caption = make_clip(rng, size=32, n_frames=16)
            good += [
                (f"g{i}.mp4", data),
                (f"g{i}.wav", _wav(rng)),
                (f"g{i}.png", _png(rng)),
                (f"g{i}.txt", caption.encode()),
            ]
        folder = work / f"poison{len(rows)}"
        folder.mkdir()
        urls = [str(raw_tar(folder / "good.tar", good))]
        if isinstance(members, list) and members:
            urls.append(str(raw_tar(folder / "poison.tar", members)))
        elif members == "EMPTY":
            (folder / "poison.tar").write_bytes(b"")
            urls.append(str(folder / "poison.tar"))
        elif isinstance(members, str):
            urls.append(members)
        tree = {
            "model": yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())["model"],
            "data": {
                "train": "::".join(urls),
                "batch_size": 2,
                "num_workers": 1,
                "shuffle_buffer": 0,
                "shuffle_shards": False,
                "stall_timeout_s": 5,
                "timeout_s": 60,
                "ops": MEDIA_OPS[modality] + [{"op": "caption"}, {"op": "tokenize"}],
            },
        }
        if name.endswith("(cap off)"):
            tree["data"]["max_member_bytes"] = 1 << 30
        rows[name] = _run_poison(tree, EXPECTED[name])
        say(
            f"poison: {name:26s} {rows[name]['outcome']:26s} {rows[name]['counts']} "
            f"worker peak RSS {rows[name]['worker_rss_mb']:.0f} MB"
        )
    return rows


def _run_poison(tree: dict, expected: str | None) -> dict:
    """Read the case; its outcome: "skipped as expected" (every good sample read, the poison counted
    under its ``expected`` reason), "accepted" (every sample read, nothing skipped), "clean" (the
    baseline), or what went wrong: "counted as another reason", "samples lost", "crashed", "hung"."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [PY, "-c", POISON_RUNNER, str(ROOT), json.dumps(tree), "4"],
            capture_output=True,
            text=True,
            timeout=180,
            env=ENV,
        )
    except subprocess.TimeoutExpired:
        return {
            "outcome": "hung",
            "ok": False,
            "expected": expected,
            "counts": {},
            "worker_rss_mb": float("nan"),
            "seconds": 180,
        }
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {
            "outcome": "crashed",
            "ok": False,
            "expected": expected,
            "counts": {},
            "worker_rss_mb": float("nan"),
            "seconds": seconds,
            "error": proc.stderr.strip().splitlines()[-1][:200],
        }
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    keys, counts = set(out["keys"]), out["counts"]
    if not {f"g{i}" for i in range(4)} <= keys:
        outcome = "samples lost"
    elif expected is None:
        outcome = "clean" if not counts else "counted as another reason"
    elif expected == ACCEPTED:
        outcome = "accepted" if "p" in keys and not counts else "skipped though allowed"
    else:
        outcome = "skipped as expected" if counts.get(expected) else "counted as another reason"
    ok = outcome in ("clean", "accepted", "skipped as expected")
    return {
        "outcome": outcome,
        "ok": ok,
        "expected": expected,
        "counts": counts,
        "worker_rss_mb": out["worker_rss_mb"],
        "seconds": seconds,
    }


def _png(rng: random.Random) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return buf.getvalue()


def _wav(rng: random.Random) -> bytes:
    import wave

    import numpy as np

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) * rng.uniform(0.01, 0.1)) * 8000).astype("<i2").tobytes())
    return buf.getvalue()
