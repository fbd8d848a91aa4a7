"""The motion corpus: video-audio-text triples of emoji in motion with spoken soundtracks.

Each clip shows one emoji concept (drawn in one of the emoji corpus's styles) moving left, right,
up or down, growing or shrinking on a white canvas (``frames`` frames at ``fps``, H.264 through
PyAV); its soundtrack is the concept's name spoken by an espeak-ng voice (AAC, in the same MP4).
Every clip has several captions ("a dog face moving left", "the dog face emoji slides to the
left", ...) for MIL-NCE, and json labels (``concept``, ``motion``, ``voice``, ``style``).

Sources: the emoji corpus's npm packages and raster cache (``emoji.resolve_sources``), and
Debian's ``espeak-ng`` (used from PATH, else fetched with ``apt-get download`` and run from the
cache without installing, as the icon corpus does).

Splits (all as webdataset shards; evaluation ones under ``eval/<split>/``):
    train              seen concepts x all motions but each concept's held-out one x training
                       voices, ``repeats`` renderings per (concept, motion, style);
    seen               one fresh rendering of each training (concept, motion), training voices;
    heldout_combos     each seen concept with its held-out motion (a composition never trained)
                       spoken by held-out voices: the held-out split for zero-shot and retrieval;
    unseen_concepts    concepts never trained, every motion, held-out voices.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tempfile
import wave
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio
from PIL import Image
from tqdm import tqdm

from mmpretrain.corpora.av_encode import encode_mp4
from mmpretrain.corpora.base import CORPORA, CorpusError, seeded_split
from mmpretrain.corpora.debian import fetch_debs
from mmpretrain.corpora.emoji import (
    Concept,
    EmojiCorpusConfig,
    drawn_concepts,
    example_sources,
)
from mmpretrain.data.shards import ShardWriterConfig, make_shards
from mmpretrain.utils.io import atomic_write_text

MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
SYNONYMS = {
    "moving left": ("sliding to the left", "going left"),
    "moving right": ("sliding to the right", "going right"),
    "moving up": ("rising", "going up"),
    "moving down": ("falling", "going down"),
    "growing": ("getting bigger", "zooming in"),
    "shrinking": ("getting smaller", "zooming out"),
}
ESPEAK_PACKAGES = ("espeak-ng", "espeak-ng-data", "libespeak-ng1", "libpcaudio0", "libsonic0")


@dataclass(frozen=True)
class MotionCorpusConfig:
    styles: tuple[str, ...] = ("noto", "twemoji", "fluent-emoji-flat", "emojione")  # emoji styles drawn
    concepts: int | None = 40  # concepts sampled (seeded; names of at most 3 words); None: all usable
    unseen_fraction: float = 0.2  # of the sampled concepts, never trained on
    motions: tuple[str, ...] = MOTIONS
    voices: tuple[str, ...] = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-us+f2", "en-gb+m3")
    heldout_voices: tuple[str, ...] = ("en-029+f4", "en-us-nyc+m5")
    size: int = 64  # canvas side in pixels
    sprite: float = 0.45  # emoji side as a fraction of the canvas
    frames: int = 16
    fps: int = 8
    sample_rate: int = 16000
    repeats: int = 2  # training renderings per (concept, motion, style)
    seed: int = 0
    shard_count: int = 400
    rasterizer: str = "rsvg"
    speech: str = "espeak-ng"  # espeak-ng, or "tone": a tone per name (no espeak-ng; offline examples and tests)


@dataclass(frozen=True)
class ClipSpec:
    concept: Concept
    motion: str
    style: str
    voice: str
    seed: int


def espeak_source(cache: Path) -> dict:
    """Where espeak-ng comes from (for the manifest): the system's, or the Debian package in the cache."""
    if shutil.which("espeak-ng"):
        return {"name": "espeak-ng", "path": shutil.which("espeak-ng")}
    info = cache / "root" / "espeak-ng" / ".unpacked"
    return json.loads(info.read_text()) if info.is_file() else {"name": "espeak-ng"}


def espeak_command(cache: Path) -> tuple[list[str], dict[str, str]]:
    """The espeak-ng command and environment: from PATH, or unpacked from Debian packages into the cache."""
    found = shutil.which("espeak-ng")
    if found:
        return [found], dict(os.environ)
    fetch_debs(ESPEAK_PACKAGES, cache)
    roots = [cache / "root" / pkg for pkg in ESPEAK_PACKAGES]
    libs = [str(d) for r in roots for d in (r / "usr" / "lib").glob("*-linux-gnu*") if d.is_dir()]
    data = next((d for d in libs if (Path(d) / "espeak-ng-data").is_dir()), None)
    binary = roots[0] / "usr" / "bin" / "espeak-ng"
    if not binary.is_file() or data is None:
        raise CorpusError(
            "espeak-ng could not be unpacked from Debian packages; install it (apt-get install espeak-ng)"
        )
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]),
        "ESPEAK_DATA_PATH": data,
    }
    return [str(binary)], env


def speak(cmd: tuple[list[str], dict[str, str]], text: str, voice: str, speed: int, rate: int) -> np.ndarray:
    """``text`` spoken by espeak-ng ``voice`` -> mono float32 (S,) at ``rate``."""

    proc = subprocess.run([*cmd[0], "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, env=cmd[1])
    if proc.returncode != 0 or not proc.stdout:
        raise CorpusError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace')[-300:]}")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        native, pcm = w.getframerate(), w.readframes(w.getnframes())
    x = torch.from_numpy(np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0)
    return torchaudio.functional.resample(x, native, rate).numpy()


def render_frames(sprite, motion: str, cfg: MotionCorpusConfig, rng: random.Random) -> np.ndarray:
    """(T, size, size, 3) uint8: the sprite (a PIL image) moving on a white canvas, with jittered path."""

    n, size = cfg.frames, cfg.size
    base = cfg.sprite * size * rng.uniform(0.85, 1.15)
    travel = rng.uniform(0.45, 0.6) * size
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    out = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        f = t / max(n - 1, 1) - 0.5  # -0.5 .. 0.5
        dx = {"moving left": -1, "moving right": 1}.get(motion, 0) * f * travel
        dy = {"moving up": -1, "moving down": 1}.get(motion, 0) * f * travel
        scale = {"growing": 1 + 1.2 * f, "shrinking": 1 - 1.2 * f}.get(motion, 1.0)
        side = max(4, int(round(base * scale)))
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(
            sprite.resize((side, side), Image.BICUBIC), (int(round(cx + dx - side / 2)), int(round(cy + dy - side / 2)))
        )
        out[t] = np.asarray(canvas)
    return out


def captions_for(label: str, motion: str) -> list[str]:
    """Several captions of one clip (for MIL-NCE); the first is the canonical one."""
    syn = SYNONYMS.get(motion, ())
    return [
        f"a {label} {motion}",
        *(f"the {label} emoji {s}" for s in syn),
        f"a video of a {label} {motion}",
        f"{label}, {motion}",
    ]


def make_clip(spec: ClipSpec, png: Path, cfg: MotionCorpusConfig, espeak) -> bytes:
    """One MP4 (H.264 + AAC) of ``spec``."""

    rng = random.Random(spec.seed)
    with Image.open(png) as img:
        sprite = img.convert("RGB")
    video = render_frames(sprite, spec.motion, cfg, rng)
    seconds = cfg.frames / cfg.fps
    speech = SPEECH[cfg.speech][1](espeak, spec.concept.label, spec.voice, rng.randint(150, 190), cfg.sample_rate)
    audio = np.zeros(int(seconds * cfg.sample_rate), np.float32)
    start = rng.randint(0, max(0, len(audio) - len(speech)))
    clip = speech[: len(audio) - start]
    audio[start : start + len(clip)] = clip
    return encode_mp4(video, cfg.fps, audio, cfg.sample_rate)


def plan_clips(cfg: MotionCorpusConfig, seen: list[Concept], unseen: list[Concept]) -> dict[str, list[ClipSpec]]:
    """The clips of every split (seeded): see the module docstring."""
    rng = random.Random(cfg.seed + 7)
    seeds = iter(range(cfg.seed * 10_000_000, cfg.seed * 10_000_000 + 10_000_000))
    held = {c.slug: cfg.motions[i % len(cfg.motions)] for i, c in enumerate(seen)}  # each motion held out by some

    def clip(c: Concept, m: str, style: str, voices: tuple[str, ...]) -> ClipSpec:
        return ClipSpec(c, m, style, rng.choice(voices), next(seeds))

    plan: dict[str, list[ClipSpec]] = {"train": [], "seen": [], "heldout_combos": [], "unseen_concepts": []}
    for c in seen:
        for m in cfg.motions:
            if m == held[c.slug]:
                plan["heldout_combos"] += [clip(c, m, s, cfg.heldout_voices) for s in cfg.styles]
                continue
            plan["train"] += [clip(c, m, s, cfg.voices) for s in cfg.styles for _ in range(cfg.repeats)]
            plan["seen"].append(clip(c, m, rng.choice(cfg.styles), cfg.voices))
    for c in unseen:
        plan["unseen_concepts"] += [clip(c, m, rng.choice(cfg.styles), cfg.heldout_voices) for m in cfg.motions]
    return plan


def write_split(name: str, clips: list[ClipSpec], pngs: dict, cfg: MotionCorpusConfig, espeak, out: Path) -> int:
    """Render ``clips`` and write them as video shards under ``out`` (json: captions and labels)."""

    with tempfile.TemporaryDirectory(prefix=f"motion-{name}-") as tmp:
        rows = []
        for i, spec in enumerate(tqdm(clips, desc=f"render {name}", unit="clip")):
            rel = f"{i:06d}.mp4"
            (Path(tmp) / rel).write_bytes(make_clip(spec, pngs[(spec.style, spec.concept.slug)], cfg, espeak))
            caps = captions_for(spec.concept.label, spec.motion)
            rows.append(
                {
                    "file": rel,
                    "caption": caps[0],
                    "captions": caps,
                    "concept": spec.concept.label,
                    "motion": spec.motion,
                    "voice": spec.voice,
                    "style": spec.style,
                }
            )
        (Path(tmp) / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifest = make_shards(
            tmp,
            Path(tmp) / "captions.jsonl",
            out,
            ShardWriterConfig(max_count=cfg.shard_count, media="video", prefix=name),
            progress=False,
        )
    if manifest.skipped:
        raise CorpusError(f"{name}: {manifest.skipped} clips could not be written")
    return manifest.samples


def select_concepts(
    cfg: MotionCorpusConfig, concepts: list[Concept], styles: dict
) -> tuple[list[Concept], list[Concept]]:
    """(seen, unseen): short names (<= 3 words, so the speech fits the clip) drawn in every style."""
    usable = [c for c in concepts if len(c.label.split()) <= 3 and all(c.slug in styles[s].svgs for s in cfg.styles)]
    return seeded_split(
        usable, seed=cfg.seed, limit=cfg.concepts, unseen_fraction=cfg.unseen_fraction, key=lambda c: c.slug
    )


def tone(cmd: None, text: str, voice: str, speed: int, rate: int) -> np.ndarray:
    """A stand-in for speech: half a second of a tone whose pitch follows the text and the voice."""
    t = np.arange(int(0.5 * rate)) / rate
    pitch = 200 + zlib.crc32(f"{text}|{voice}".encode()) % 400
    return (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


# cfg.speech -> (setup(cache) -> handle, speak(handle, text, voice, speed, rate) -> (S,) float32)
SPEECH = {"espeak-ng": (espeak_command, speak), "tone": (lambda cache: None, tone)}


def _example() -> dict:
    """The corpus example: small config overrides and ``offline(folder) -> builder keyword arguments``."""

    return {
        "config": {
            "styles": ("s1", "s2"),
            "concepts": None,
            "unseen_fraction": 0.25,
            "size": 16,
            "frames": 4,
            "fps": 4,
            "sample_rate": 8000,
            "repeats": 1,
            "rasterizer": "placeholder",
            "shard_count": 20,
            "motions": ("moving left", "moving right", "growing"),
            "speech": "tone",
        },
        "offline": lambda folder: {"sources": example_sources(folder, ("s1", "s2"))},
    }


@CORPORA.register("motion", config=MotionCorpusConfig, example=_example)
def build_motion_corpus(
    cfg: MotionCorpusConfig, cache: str | Path, out: str | Path, sources: dict[str, Path] | None = None
) -> dict:
    """Fetch (or take) the sources, render every split and write shards + manifest.json; ``out`` is rebuilt."""
    cache, out = Path(cache), Path(out)
    emoji_cfg = EmojiCorpusConfig(
        train_styles=cfg.styles, rendition_styles=(), sketch_styles=(), size=cfg.size, rasterizer=cfg.rasterizer
    )
    folders, styles, seen, unseen, pngs = drawn_concepts(
        emoji_cfg,
        cache,
        sources,
        lambda concepts, drawn: select_concepts(cfg, concepts, drawn),
        "no concept with a short name is drawn in every configured style",
    )
    if cfg.speech not in SPEECH:
        raise CorpusError(f"speech {cfg.speech!r}: one of {', '.join(SPEECH)}")
    espeak = SPEECH[cfg.speech][0](cache)
    if out.exists():
        shutil.rmtree(out)
    counts = {}
    for split, clips in plan_clips(cfg, seen, unseen).items():
        target = out / "shards" if split == "train" else out / "eval" / split
        counts[split] = write_split(split, clips, pngs, cfg, espeak, target)
    manifest = {
        "format": "mmpretrain-motion-corpus/1",
        "config": asdict(cfg),
        "counts": counts,
        "concepts": {"seen": [c.label for c in seen], "unseen": [c.label for c in unseen]},
        "motions": list(cfg.motions),
        "sources": {
            **{name: s.package for name, s in styles.items()},
            **({"espeak-ng": espeak_source(cache)} if cfg.speech == "espeak-ng" else {"speech": cfg.speech}),
        },
        "next": f"train with: mmpretrain train configs/experiment/motion_vat.yaml data.train={out}/shards   "
        f"evaluate: mmpretrain eval media --model CKPT --modalities video audio "
        f"--data heldout@shards:concept,motion={out}/eval/heldout_combos",
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
