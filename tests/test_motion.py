"""The motion corpus (video-audio-text clips) on the emoji fixture, with a tone for speech (no espeak-ng)."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmpretrain.corpora.motion import MotionCorpusConfig, build_motion_corpus, captions_for, render_frames
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "emoji"
SOURCES = {name: FIXTURE / name for name in ("emojibase", "noto", "twemoji")}
CFG = MotionCorpusConfig(
    styles=("noto", "twemoji"),
    concepts=None,
    unseen_fraction=0.25,
    size=32,
    frames=8,
    fps=8,
    sample_rate=8000,
    repeats=1,
    rasterizer="stub",
    shard_count=50,
    speech="tone",
    motions=("moving left", "moving right", "growing"),
)


pytestmark = pytest.mark.usefixtures("raster_calls")


def test_render_frames_move_the_sprite():
    sprite = Image.new("RGB", (16, 16), (200, 30, 30))
    cfg = MotionCorpusConfig(size=32, frames=5)
    left = render_frames(sprite, "moving left", cfg, random.Random(0))
    xs = [np.nonzero((f != 255).any(-1))[1].mean() for f in left]
    assert left.shape == (5, 32, 32, 3) and all(a > b for a, b in zip(xs, xs[1:]))
    grow = render_frames(sprite, "growing", cfg, random.Random(0))
    areas = [int((f != 255).any(-1).sum()) for f in grow]
    assert all(a < b for a, b in zip(areas, areas[1:]))


def test_captions_name_concept_and_motion():
    caps = captions_for("dog face", "moving left")
    assert caps[0] == "a dog face moving left" and len(set(caps)) == len(caps) >= 4
    assert all("dog face" in c for c in caps)


def test_build_motion_corpus(tmp_path):
    m = build_motion_corpus(CFG, tmp_path / "cache", tmp_path / "out", sources=SOURCES)
    seen, unseen = m["concepts"]["seen"], m["concepts"]["unseen"]
    assert seen and unseen and not set(seen) & set(unseen)
    n_seen, n_m, n_s = len(seen), len(CFG.motions), len(CFG.styles)
    assert m["counts"] == {
        "train": n_seen * (n_m - 1) * n_s,
        "seen": n_seen * (n_m - 1),
        "heldout_combos": n_seen * n_s,
        "unseen_concepts": len(unseen) * n_m,
    }
    train = _samples(tmp_path / "out" / "shards")
    held = _samples(tmp_path / "out" / "eval" / "heldout_combos")
    train_combos = {(j["concept"], j["motion"]) for j in train}
    assert not train_combos & {(j["concept"], j["motion"]) for j in held}  # held-out compositions never trained
    assert {j["voice"] for j in train} <= set(CFG.voices) and {j["voice"] for j in held} <= set(CFG.heldout_voices)
    assert all(j["captions"][0] == f"a {j['concept']} {j['motion']}" for j in train)
    # the clips decode with the pipeline's ops: video and its soundtrack
    from mmpretrain.data.av_ops import DecodeAudioParams, DecodeVideoParams
    from mmpretrain.data.ops import DATA_OPS, OpContext

    clip = _members(tmp_path / "out" / "shards")[0]
    s = DATA_OPS.get("decode_video").builder(DecodeVideoParams(frames=8, fps=8, size=32), OpContext())(dict(clip))
    a = DATA_OPS.get("decode_audio").builder(DecodeAudioParams(sample_rate=8000, seconds=1.0), OpContext())(dict(clip))
    assert s["video_mask"].all() and a["audio"].abs().max() > 0.05


def _members(shards):
    out = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in sorted(n for n in files if n.endswith(".mp4")):
            key = name[: -len(".mp4")]
            out.append({"__key__": key, "mp4": files[name], "json": files[key + ".json"]})
    return out


def _samples(shards):
    return [json.loads(io.BytesIO(m["json"]).read()) for m in _members(shards)]
