"""Video and audio decoding ops on synthetic clips (PyAV-written MP4, decord-read): shapes, masks,
determinism at evaluation, and bad input as SampleError (skipped and counted by the stream)."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from mmpretrain.data.av_ops import DecodeAudioParams, DecodeVideoParams, frame_indices
from mmpretrain.data.ops import DATA_OPS, OpContext, SampleError
from mmpretrain.types import ImageSpec
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from make_toy_clips import make_clip  # noqa: E402

CTX = OpContext({"image": ImageSpec(size=(32, 32))})


@pytest.fixture(scope="module")
def clip():
    return make_clip(random.Random(0), size=40, n_frames=16, fps=8)[0]


@pytest.fixture(scope="module")
def silent_clip():
    return make_clip(random.Random(1), size=40, n_frames=8, fps=8, audio=False)[0]


def video_op(**kw):
    return DATA_OPS.get("decode_video").builder(DecodeVideoParams(**{"frames": 8, "fps": 4, **kw}), CTX)


def audio_op(**kw):
    return DATA_OPS.get("decode_audio").builder(DecodeAudioParams(**{"sample_rate": 8000, "seconds": 1.0, **kw}), CTX)


def test_decode_video_shapes_and_mask(clip):
    s = video_op()({"__key__": "k", "mp4": clip})
    assert s["video"].shape == (8, 3, 32, 32) and s["video_mask"].all()
    long = video_op(frames=24, fps=8)({"__key__": "k", "mp4": clip})  # 16 frames exist: 8 padded
    assert long["video_mask"].sum() == 16 and (long["video"][~long["video_mask"]] == 0).all()


@pytest.mark.parametrize("src", [40, 64, 100])
def test_decode_video_resizes_any_source_size(src):
    """Regression: decord's own resize (VideoReader(width=, height=)) failed for 64 px -> 48 px."""
    data = make_clip(random.Random(2), size=src, n_frames=8, fps=8)[0]
    for train in (True, False):
        s = video_op(size=48, frames=4, train=train)({"__key__": "k", "mp4": data})
        assert s["video"].shape == (4, 3, 48, 48) and s["video_mask"].all()


def test_evaluation_decoding_is_deterministic(clip):
    op = video_op(train=False)
    torch.testing.assert_close(op({"mp4": clip})["video"], op({"mp4": clip})["video"])
    a = audio_op(train=False, seconds=0.5)
    torch.testing.assert_close(a({"mp4": clip})["audio"], a({"mp4": clip})["audio"])


def test_decode_audio_from_the_video_track_and_from_wav(clip, tmp_path):
    s = audio_op()({"__key__": "k", "mp4": clip})
    assert s["audio"].shape == (8000,) and s["audio_mask"].all() and s["audio"].abs().max() > 0.05
    long = audio_op(seconds=4.0)({"__key__": "k", "mp4": clip})  # ~2 s of audio: the rest is padding
    assert 0.4 < long["audio_mask"].float().mean() < 0.7 and (long["audio"][~long["audio_mask"]] == 0).all()
    import av
    import numpy as np

    wav = tmp_path / "t.wav"
    with av.open(str(wav), "w", format="wav") as c:
        st = c.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            (np.sin(np.arange(16000) / 5) * 8000).astype(np.int16)[None], format="s16", layout="mono"
        )
        frame.sample_rate = 16000
        for pkt in [*st.encode(frame), *st.encode()]:
            c.mux(pkt)
    s = audio_op()({"__key__": "w", "wav": wav.read_bytes()})
    assert s["audio"].shape == (8000,) and s["audio_mask"].all()  # resampled 16 kHz -> 8 kHz, 1 s window


@pytest.mark.parametrize(
    "member, op, kind",
    [
        ({"mp4": b"not a video at all"}, "video", "bad_video"),
        ({"txt": b"a caption"}, "video", "missing_video"),
        ({"mp4": b""}, "video", "bad_video"),
        ({"txt": b"a caption"}, "audio", "missing_audio"),
        ({"wav": b"RIFF\x00\x00\x00\x00WAVE"}, "audio", "bad_audio"),
    ],
)
def test_bad_media_raise_sample_errors(member, op, kind):
    fn = video_op() if op == "video" else audio_op()
    with pytest.raises(SampleError) as err:
        fn({"__key__": "bad", **member})
    assert err.value.kind == kind


def test_truncated_clip_and_missing_audio_track(clip, silent_clip):
    with pytest.raises(SampleError) as err:
        video_op()({"__key__": "t", "mp4": clip[: len(clip) // 3]})
    assert err.value.kind == "bad_video"
    assert video_op()({"mp4": silent_clip})["video"].shape[0] == 8  # the picture is fine
    with pytest.raises(SampleError) as err:
        audio_op()({"__key__": "s", "mp4": silent_clip})
    assert err.value.kind == "bad_audio"


def test_decoding_has_a_time_limit(clip):
    with pytest.raises(SampleError, match="longer than"):
        video_op(timeout_s=1e-6)({"__key__": "slow", "mp4": clip})


def test_frame_indices():
    assert frame_indices(16, 8.0, 8, 4.0, 0.0).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert frame_indices(4, 8.0, 4, 4.0, 0.0).tolist() == [0, 2, -1, -1]  # past the end: padding
    assert frame_indices(100, 10.0, 2, 10.0, 1.0).tolist() == [98, 99]


def test_video_shards_and_a_video_audio_text_training_step(tmp_path):
    """--video shards (a bad clip skipped and counted) feed decode ops and a VAT model whose two
    loss pairs are config data; one step runs and logs each pair."""
    import csv

    import yaml

    from mmpretrain.data.shards import ShardWriterConfig, make_shards
    from tests.conftest import run_cli

    rng = random.Random(0)
    (tmp_path / "clips").mkdir()
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for i in range(12):
            data, caption = make_clip(rng, size=32, n_frames=8, fps=8)
            (tmp_path / "clips" / f"{i}.mp4").write_bytes(data)
            w.writerow([f"clips/{i}.mp4", caption])
        (tmp_path / "clips" / "bad.mp4").write_bytes(b"broken")
        w.writerow(["clips/bad.mp4", "a broken clip"])
    m = make_shards(
        tmp_path,
        tmp_path / "captions.csv",
        tmp_path / "shards",
        ShardWriterConfig(max_count=6, media="video"),
        progress=False,
    )
    assert m.samples == 12 and m.skipped == {"bad_video": 1}
    cfg = yaml.safe_load((ROOT / "configs/experiment/vat_smoke.yaml").read_text())
    cfg["data"].update(train=str(tmp_path / "shards"), batch_size=4, num_workers=0, shuffle_buffer=4)
    cfg["train"].update(steps=3, log_every=1, ckpt_every=3, run_dir=str(tmp_path / "run"), progress=False)
    (tmp_path / "vat.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(tmp_path / "vat.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss/video-text" in r)
    assert "loss/video-audio" in step and all(
        map(lambda v: v == v, (step["loss/video-text"], step["loss/video-audio"]))
    )
