"""The GPU-fed image path: jpeg_bytes on the CPU workers, decode_jpeg as a device op (here on the
CPU device, which runs the same code with libjpeg-turbo; the CUDA comparison runs where CUDA is)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmpretrain import api
from mmpretrain.config.schema import OpSpec
from mmpretrain.config.strict import ConfigError
from mmpretrain.data.device import DeviceFeed, build_device_ops, decode_batch
from mmpretrain.data.ops import OpContext, SampleError, build_ops
from mmpretrain.data.stream import DataError, Position, WorkerBatch
from mmpretrain.models.layout import list_checkpoints
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import experiment_tree, write_shard

GPU_OPS = [{"op": "jpeg_bytes"}, {"op": "caption"}, {"op": "tokenize"}]


def jpeg(size=(48, 40), seed=0, quality=90) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=g) * 255).to(torch.uint8)
    img = Image.fromarray(pixels.numpy()).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """4 shards x 8 JPEGs of varied sizes (one PNG among them: transcoded)."""
    out = tmp_path_factory.mktemp("jpeg_shards")
    rng = random.Random(0)
    for s in range(4):
        samples = []
        for i in range(8):
            size = (rng.randint(24, 64), rng.randint(24, 64))
            member = {"jpg": jpeg(size, seed=s * 8 + i)}
            if s == 1 and i == 3:
                buf = io.BytesIO()
                Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
                member = {"png": buf.getvalue()}
            samples.append({"__key__": f"{s:02d}{i:02d}", **member, "txt": f"sample {s} {i}".encode()})
        write_shard(out / f"shard-{s:06d}.tar", samples)
    return out


def ops(specs, ctx=OpContext()):
    return build_ops([OpSpec(**s) for s in specs], ctx)


def collated(samples: list[dict]) -> dict[str, torch.Tensor]:
    from mmpretrain.data.stream import ShardStream

    return ShardStream._collate(samples, 0, Position()).data


def test_jpeg_bytes_keeps_jpegs_as_they_are_and_refuses_what_it_must():
    raw = jpeg()
    (op,) = ops([{"op": "jpeg_bytes"}])
    out = op({"__key__": "k", "jpg": raw})
    assert bytes(out["image_jpeg"].numpy()) == raw  # not re-encoded
    png = io.BytesIO()
    Image.new("RGB", (20, 10)).save(png, format="PNG")
    moved = op({"__key__": "k", "png": png.getvalue()})["image_jpeg"]
    assert Image.open(io.BytesIO(bytes(moved.numpy()))).format == "JPEG"  # transcoded
    (strict,) = ops([{"op": "jpeg_bytes", "params": {"transcode": False}}])
    with pytest.raises(SampleError) as info:
        strict({"__key__": "k", "png": png.getvalue()})
    assert info.value.kind == "not_jpeg"
    with pytest.raises(SampleError, match="end marker") as info:
        strict({"__key__": "k", "jpg": raw[:-2]})  # cut short: the header parses, the end marker is gone
    assert info.value.kind == "bad_image"
    (small,) = ops([{"op": "jpeg_bytes", "params": {"max_pixels": 100}}])
    with pytest.raises(SampleError, match="too large"):
        small({"__key__": "k", "jpg": raw})  # refused from the header


def test_ragged_bytes_collate_with_offsets_and_decode_as_pil_does():
    chain = ops([{"op": "jpeg_bytes"}])
    raws = [jpeg((30 + 7 * i, 40), seed=i) for i in range(3)]
    batch = collated([chain[0]({"__key__": str(i), "jpg": r}) for i, r in enumerate(raws)])
    assert batch["image_jpeg"].shape == (sum(map(len, raws)),) and batch["image_jpeg_offsets"].tolist()[-1] == len(
        batch["image_jpeg"]
    )
    images = decode_batch(batch["image_jpeg"], batch["image_jpeg_offsets"], torch.device("cpu"))
    for img, raw in zip(images, raws):
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(raw)).convert("RGB"))).permute(2, 0, 1)
        assert img.shape == ref.shape and (img.int() - ref.int()).abs().max() <= 2  # libjpeg-turbo both


def test_a_batch_the_jpeg_decoder_refuses_falls_back_image_by_image():
    png = io.BytesIO()
    Image.new("RGB", (16, 12), (0, 255, 0)).save(png, format="PNG")
    parts = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (jpeg((16, 12)), png.getvalue())]
    offsets = torch.tensor([0, len(parts[0]), len(parts[0]) + len(parts[1])])
    images = decode_batch(torch.cat(parts), offsets, torch.device("cpu"))  # PIL decodes the PNG
    assert [tuple(i.shape) for i in images] == [(3, 12, 16), (3, 12, 16)] and images[1][1].min() == 255
    bad = torch.tensor(list(b"\xff\xd8\x00garbage\xff\xd9"), dtype=torch.uint8)
    with pytest.raises(DataError, match="cannot be decoded"):
        decode_batch(
            torch.cat([parts[0], bad]), torch.tensor([0, len(parts[0]), len(parts[0]) + len(bad)]), torch.device("cpu")
        )


def _feed(batches, specs, ctx, seed=0):
    return DeviceFeed(
        iter(batches), torch.device("cpu"), build_device_ops([OpSpec(**s) for s in specs], ctx), seed=seed, rank=0
    )


def test_device_decode_matches_the_cpu_path_and_its_crops_are_seeded_per_batch(tiny_model_cfg):
    from mmpretrain.models import build_model

    ctx = build_model(tiny_model_cfg).data_context()
    raws = [jpeg((40 + 4 * i, 36), seed=i) for i in range(4)]
    cpu = ops([{"op": "decode_image"}, {"op": "resize_center_crop"}, {"op": "to_tensor_normalize"}], ctx)
    ref = torch.stack([cpu[2](cpu[1](cpu[0]({"__key__": "k", "jpg": r})))["image"] for r in raws])
    feed_in = ops([{"op": "jpeg_bytes"}], ctx)

    def batch(emitted):
        data = collated([feed_in[0]({"__key__": str(i), "jpg": r}) for i, r in enumerate(raws)])
        return WorkerBatch(data, [str(i) for i in range(4)], 0, Position(0, emitted))

    (out,) = _feed([batch(4)], [{"op": "decode_jpeg", "params": {"train": False}}], ctx)
    assert out.data["image"].shape == ref.shape == (4, 3, 32, 32)
    assert "image_jpeg" not in out.data and (out.data["image"] - ref).abs().mean() < 0.05  # tensor vs PIL resize
    train = [{"op": "decode_jpeg", "params": {"scale": [0.3, 1.0], "hflip": 0.5}}]
    before = torch.random.get_rng_state()
    a, b = list(_feed([batch(4), batch(8)], train, ctx))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    (again,) = _feed([batch(4)], train, ctx)
    assert torch.equal(a.data["image"], again.data["image"])  # same position, same crops (exact resume)
    assert not torch.equal(a.data["image"], b.data["image"])  # another batch, other crops


def test_config_names_the_missing_half_of_the_gpu_path(toy_shards, tmp_path):
    tree = experiment_tree(toy_shards, tmp_path / "run", data={"device_ops": [{"op": "decode_jpeg"}]})
    with pytest.raises(ConfigError, match="jpeg_bytes"):
        experiment_from_tree(tree)
    tree = experiment_tree(toy_shards, tmp_path / "run", data={"ops": GPU_OPS}, train={"steps": 1})
    with pytest.raises(DataError, match="undecoded.*decode_jpeg"):
        api.train(experiment_from_tree(tree))


def test_training_on_device_decoded_jpegs_resumes_exactly(jpeg_shards, tmp_path):
    data = {
        "train": str(jpeg_shards),
        "ops": GPU_OPS,
        "batch_size": 4,
        "device_ops": [{"op": "decode_jpeg", "params": {"scale": [0.5, 1.0], "hflip": 0.5}}],
    }

    def run(name, **train):
        tree = experiment_tree(jpeg_shards, tmp_path / name, data=data, train={"steps": 8, "ckpt_every": 4, **train})
        return api.train(experiment_from_tree(tree))

    whole = run("whole")
    run("parts", stop_after=4)
    parts = run("parts", resume="latest")
    a, b = (load_file(list_checkpoints(d)[-1] / "model.safetensors") for d in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg); the CPU device runs the same op above")
def test_nvjpeg_decode_matches_the_cpu_decoder():
    raws = [jpeg((64 + 8 * i, 48), seed=i) for i in range(8)]
    parts = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws]
    offsets = torch.tensor([0, *torch.tensor([len(p) for p in parts]).cumsum(0).tolist()])
    flat = torch.cat(parts).pin_memory()
    gpu = decode_batch(flat, offsets, torch.device("cuda"))
    cpu = decode_batch(flat, offsets, torch.device("cpu"))
    for g, c in zip(gpu, cpu):
        assert g.is_cuda and (g.cpu().int() - c.int()).abs().float().mean() < 2.0  # IDCT rounding differs
