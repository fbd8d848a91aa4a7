"""Inputs that are not the service's HTTP (issue 27, items 1, 7 and 9): resize bombs, the decoder's
memory limit, audio and tar caps, and sharded checkpoints whose metadata is a pickle."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import pickle
import tarfile
import time
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from mmpretrain import api
from mmpretrain.data.ops import MAX_RESIZE_ASPECT, aspect_capped
from tests.conftest import experiment_tree, png_bytes, write_shard


# ---------------------------------------------------------------- 1. resize bombs
@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return api.load_checkpoint(tiny_ckpt)


def test_the_eval_transform_never_resizes_to_more_than_a_bounded_image(model, monkeypatch):
    """A thin image passes any pixel cap; resizing its short side asked for ~5 G pixels (a 4.9 KB PNG)."""
    sizes = []
    real = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or real(self, size, *a, **k)
    )
    out = api.image_transform(model)(Image.new("RGB", (40_000, 10), (200, 30, 30)))
    side = model.cfg.towers["image"].params["vision_cfg"]["image_size"]
    assert out.shape == (3, side, side)
    assert max(w * h for w, h in sizes) <= MAX_RESIZE_ASPECT * side * side * 1.05, sizes


def test_images_within_the_aspect_cap_are_preprocessed_exactly_as_before(model):
    from torchvision.transforms import v2 as T

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 300, 3), dtype=np.uint8))  # 2.5:1
    side = 32
    old = T.Compose([T.Resize(side, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(side)])
    transform = api.image_transform(model)
    ours = transform.ops[1]({"image": img})["image"]  # decode_image, resize_center_crop, normalise
    assert np.array_equal(np.asarray(ours), np.asarray(old(img)))


def test_aspect_capped_cuts_the_long_side_of_tensors_and_images_centred():
    x = torch.arange(8 * 100).view(1, 8, 100)
    cut = aspect_capped(x, 4.0)
    assert cut.shape == (1, 8, 32) and torch.equal(cut, x[..., 34:66])
    assert aspect_capped(x[..., :30]) is not None and aspect_capped(x[..., :30]).shape == (1, 8, 30)
    tall = Image.new("RGB", (10, 1000))
    assert aspect_capped(tall, 4.0).size == (10, 40)


def test_a_video_as_thin_as_a_resize_bomb_is_resized_within_bounds():
    from mmpretrain.data.av_ops import _resize

    frames = torch.zeros(2, 3, 8, 20_000, dtype=torch.uint8)  # short side 8 -> 64 would make 160,000 columns
    out = _resize(frames, 64)
    assert out.shape[-2] == 64 and out.shape[-1] <= MAX_RESIZE_ASPECT * 64


def _bomb_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_resize_bomb_upload_is_decoded_at_once(model):
    """What the service's decoder process runs for an upload, on a 2,000,000 x 8 PNG (16 MP, under the
    40 MP cap): its short side to 32 px asked for 256 M pixels (seconds and GBs)."""
    from retrieval.serve.uploads import _decode

    bomb = _bomb_png(2_000_000, 8)
    assert len(bomb) < 100_000
    t0 = time.perf_counter()
    assert _decode(api.image_transform(model), bomb, 40_000_000).shape == (3, 32, 32)
    assert time.perf_counter() - t0 < 2


def test_the_decoder_runs_under_a_memory_limit_and_is_recycled(model):
    from retrieval.jobs.search import QueryError
    from retrieval.serve.uploads import Decoder

    big = io.BytesIO()
    Image.new("RGB", (3000, 3000), (9, 9, 9)).save(big, "PNG")  # a few KB that decode to 27 MB
    transform = api.image_transform(model)

    async def go():
        small = Decoder(memory_mb=16, recycle_after=2)
        try:
            with pytest.raises(QueryError, match="more memory"):  # 27 MB of pixels need more than 16 MB
                await small(transform, big.getvalue(), 40_000_000)
            pids = [await small(_decoder_pid, png_bytes(), 40_000_000) for _ in range(2)]
        finally:
            small.close()
        return pids

    assert len(set(asyncio.run(go()))) == 2  # a fresh process after two uploads (recycle_after=2)


def _decoder_pid(image) -> int:  # a "transform" the decoder process runs: which process it is
    return os.getpid()


# ---------------------------------------------------------------- 9. audio and tar caps
def _wav(seconds: float, rate: int = 8000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (np.sin(2 * np.pi * 440 * t) * 10_000).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(x[:, None], channels, 1).tobytes())
    return buf.getvalue()


def test_audio_is_capped_by_duration_and_channels_and_stereo_downmixes_exactly():
    from mmpretrain.data.av_ops import read_audio

    with pytest.raises(ValueError, match="s of audio"):
        read_audio(_wav(2.0), 8000, max_seconds=1.0)
    with pytest.raises(ValueError, match="channels"):
        read_audio(_wav(0.2, channels=10), 8000)
    mono, stereo = read_audio(_wav(0.5), 8000), read_audio(_wav(0.5, channels=2), 8000)
    assert torch.allclose(mono, stereo)  # packed (interleaved) stereo used to be split in halves, not channels


def _shard_with(path, member: tarfile.TarInfo, data: bytes, *, fmt=tarfile.PAX_FORMAT) -> str:
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(member, io.BytesIO(data))
    return str(path)


def _read(url: str):
    from mmpretrain.data.stream import read_samples

    problems = []
    samples = list(read_samples([url], lambda exc: problems.append(exc) or True))
    return samples, problems


def test_tar_extended_headers_are_capped_and_compressed_shards_refused(tmp_path):
    info = tarfile.TarInfo("a.txt")
    info.size, info.pax_headers = 2, {"comment": "x" * 200_000}  # a 200 KB pax header, read whole before
    samples, problems = _read(_shard_with(tmp_path / "pax.tar", info, b"hi"))
    assert not samples and [p.kind for p in problems] == ["corrupt_shard"] and "extended header" in str(problems[0])
    long = tarfile.TarInfo("x" * 100_000 + ".txt")
    long.size = 2
    samples, problems = _read(_shard_with(tmp_path / "gnu.tar", long, b"hi", fmt=tarfile.GNU_FORMAT))
    assert not samples and [p.kind for p in problems] == ["corrupt_shard"]
    plain = write_shard(tmp_path / "ok.tar", [{"__key__": "k", "txt": b"a caption", "png": png_bytes()}])
    (tmp_path / "ok.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))  # a decompression bomb's carrier
    samples, problems = _read(str(tmp_path / "ok.tar.gz"))
    assert not samples and [p.kind for p in problems] == ["corrupt_shard"]
    assert len(_read(str(plain))[0]) == 1  # a raw tar still reads


# ---------------------------------------------------------------- 7. sharded checkpoints are data, not code
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_sharded_checkpoint_whose_metadata_runs_code_is_refused(toy_shards, tmp_path):
    from mmpretrain.models.layout import list_checkpoints, write_checksums
    from mmpretrain.training.validate import experiment_from_tree

    tree = experiment_tree(toy_shards, tmp_path / "run", train={"steps": 1, "ckpt_every": 1, "strategy": "fsdp"})
    api.train(experiment_from_tree(tree))
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert api.load_checkpoint(ckpt) is not None  # the real metadata loads through the allow-list
    marker = tmp_path / "pwned"
    (ckpt / "sharded" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    write_checksums(ckpt, 1)  # an attacker rewrites the checksums too
    with pytest.raises(Exception, match="never writes: refused"):
        api.load_checkpoint(ckpt)
    assert not marker.exists()
