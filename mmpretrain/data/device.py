"""The device stage of the data path: batch ops that run where the model runs, after the copy.

CPU loader workers can only decode so many JPEGs a second (a 224 px ViT-B/16 on one GPU eats more
than 16 cores decode). With ``data.ops`` ending in ``jpeg_bytes`` the workers only read and check
each image's bytes; ``data.device_ops: [{op: decode_jpeg}]`` then decodes the whole batch on the
GPU (torchvision's batched nvjpeg ``decode_jpeg(device="cuda")``), crops, resizes and normalises
it there. On a CPU device the same op decodes with libjpeg-turbo in the main process (no
speed-up, the same results: what the tests run).

``DeviceFeed`` moves batches to the device with non-blocking copies from pinned memory and, on
CUDA, prepares the next batch (copy + device ops) on a side stream while the current one trains.
A device op's randomness comes from a CPU generator seeded per batch from (seed, rank, the
batch's stream position), so a resumed run draws the same crops; the global RNGs (CPU and CUDA)
are untouched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as tv_decode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from mmpretrain.config.schema import OpSpec
from mmpretrain.config.strict import ConfigError, check_params, typed_params
from mmpretrain.data.ops import MAX_RESIZE_ASPECT, OpContext, SampleError, aspect_capped, open_image
from mmpretrain.data.stream import DataError, WorkerBatch, derive_seed
from mmpretrain.registry import Registry

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]
BatchOp = Callable[[Batch, torch.Generator, torch.device], Batch]  # (batch, seeded CPU generator, device) -> batch
DEVICE_OPS: Registry[BatchOp] = Registry("device data op")
# Keys that stay in (pinned) host memory when a batch moves to the device: the device ops read them
# there (nvjpeg takes its input bytes from host memory and copies them itself).
HOST_KEYS = ("image_jpeg", "image_jpeg_offsets")


@dataclass(frozen=True)
class DeviceOpExample:
    """What the generated tests and the config check need: ``fed_by``, the CPU data op(s) that must be
    in ``data.ops`` to feed it (they produce its inputs), and the keys it must ``produce``."""

    fed_by: tuple[str, ...] = ()
    produce: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)


def build_device_ops(specs: list[OpSpec], ctx: OpContext) -> list[BatchOp]:
    ops = []
    for i, spec in enumerate(specs):
        entry = DEVICE_OPS.get(spec.op)
        ops.append(entry.builder(typed_params(entry, spec.params, f"data.device_ops[{i}]"), ctx))
    return ops


def check_device_ops(specs: list[OpSpec], cpu_ops: list[list[OpSpec]]) -> None:
    """Every device op is registered, its params fit, and the CPU op that feeds it is in some source's
    ``ops``; ``ConfigError`` naming the field otherwise."""
    names = {spec.op for ops in cpu_ops for spec in ops}
    for i, spec in enumerate(specs):
        check_params(DEVICE_OPS, spec.op, spec.params, f"data.device_ops[{i}]")
        fed_by = DEVICE_OPS.get(spec.op).make_example().fed_by
        if fed_by and not names & set(fed_by):
            raise ConfigError(
                f"data.device_ops[{i}]: {spec.op} decodes what the {' or '.join(fed_by)} data op "
                f"emits, and no data.ops list has it: end data.ops with {fed_by[0]}"
            )


# ------------------------------------------------------------------ decode_jpeg
@dataclass(frozen=True)
class DecodeJpegParams:
    train: bool = True  # random resized crop + flip; False: resize the short side and centre-crop
    scale: tuple[float, float] = (0.9, 1.0)  # random_resized_crop's area range
    ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = 0.0  # flip probability (train only)
    size: int | None = None  # None: the image tower's input size
    mean: tuple[float, float, float] | None = None  # None: the image tower's
    std: tuple[float, float, float] | None = None


@DEVICE_OPS.register(
    "decode_jpeg", config=DecodeJpegParams, example=DeviceOpExample(fed_by=("jpeg_bytes",), produce=("image",))
)
def decode_jpeg(p: DecodeJpegParams, ctx: OpContext) -> BatchOp:
    """Decode the batch's JPEG bytes on the device (nvjpeg on CUDA, batched), crop, resize and
    normalise: ``image_jpeg`` (N bytes,) + ``image_jpeg_offsets`` (B + 1,) -> ``image`` (B, 3, H, W)."""

    size = [p.size, p.size] if p.size else list(ctx.image.size)
    mode = T.InterpolationMode(ctx.image.interpolation)
    mean, std = list(p.mean or ctx.image.mean), list(p.std or ctx.image.std)
    crop = T.RandomResizedCrop(size, scale=p.scale, ratio=p.ratio)
    cap = max(MAX_RESIZE_ASPECT, 2 * max(size) / min(size))  # as resize_center_crop's

    def one(img: Tensor, flip: bool) -> Tensor:
        if p.train:
            params = crop.make_params([img])  # draws from the CPU RNG the caller has seeded
            out = TF.resized_crop(
                img,
                params["top"],
                params["left"],
                params["height"],
                params["width"],
                size,
                interpolation=mode,
                antialias=True,
            )
            return TF.horizontal_flip(out) if flip else out
        out = TF.resize(aspect_capped(img, cap), min(size), interpolation=mode, antialias=True)  # bounded
        return TF.center_crop(out, size)

    def op(batch: Batch, gen: torch.Generator, device: torch.device) -> Batch:
        if "image_jpeg" not in batch:  # another source of a mixture (video, audio): not ours
            return batch
        images = decode_batch(batch.pop("image_jpeg"), batch.pop("image_jpeg_offsets"), device)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.set_state(gen.get_state())
            flips = (torch.rand(len(images)) < p.hflip).tolist() if p.train else [False] * len(images)
            out = torch.stack([one(img, f) for img, f in zip(images, flips)])
        out = TF.to_dtype(out, torch.float32, scale=True)
        batch["image"] = TF.normalize(out, mean, std)
        return batch

    return op


def decode_batch(flat: Tensor, offsets: Tensor, device: torch.device) -> list[Tensor]:
    """JPEG bytes ``flat`` (N,) uint8 split at ``offsets`` (B + 1,) -> B RGB images (3, H, W) uint8 on
    ``device``, decoded in one batched call. An image the batched decoder refuses (nvjpeg lacks
    some JPEG variants) is decoded on its own, then by PIL on the CPU; one nothing decodes is a
    ``DataError`` (the ``jpeg_bytes`` op checked its header and end marker, so this is rare)."""

    bounds = offsets.tolist()
    parts = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    try:
        return list(tv_decode(parts, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as exc:
        log.warning("batched JPEG decode on %s failed (%s); decoding the batch's images one by one", device, exc)
    return [_decode_one(part, device, i) for i, part in enumerate(parts)]


def _decode_one(part: Tensor, device: torch.device, index: int) -> Tensor:
    try:
        return tv_decode(part, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return TF.pil_to_tensor(open_image(part.numpy().tobytes())).to(device)
    except SampleError as exc:
        raise DataError(f"image {index} of a batch cannot be decoded on {device} or by PIL: {exc}") from None


# ------------------------------------------------------------------ the feed
class DeviceFeed:
    """``WorkerBatch``es with their tensors on ``device`` and the device ops applied.

    On CUDA each batch is copied (non-blocking, from the loader's pinned memory) and processed on a
    side stream one batch ahead, so the copy and the decode overlap the previous step's compute;
    the consuming stream waits on it and the tensors are recorded to it. Elsewhere it is a plain
    synchronous copy + ops. The time ``next()`` blocks is what the loop counts as data wait.
    """

    def __init__(
        self, batches: Iterator[WorkerBatch], device: torch.device, ops: list[BatchOp], *, seed: int, rank: int
    ):
        self.batches, self.device, self.ops = batches, torch.device(device), ops
        self.seed, self.rank = seed, rank
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: WorkerBatch | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def __next__(self) -> WorkerBatch:
        if self.stream is None:
            return self._prepare(next(self.batches))
        if self._ahead is None:
            self._ahead = self._prepare(next(self.batches))
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        batch = self._ahead
        for t in batch.data.values():
            t.record_stream(current)  # the side stream's allocator must not reuse them while in use
        try:
            self._ahead = self._prepare(next(self.batches))
        except StopIteration:
            self._ahead = None  # this batch is the last; the next call ends the iteration
            self.batches = iter(())
        return batch

    def _prepare(self, batch: WorkerBatch) -> WorkerBatch:
        gen = torch.Generator().manual_seed(
            derive_seed(self.seed, "device", self.rank, batch.worker, batch.position.epoch, batch.position.emitted)
        )
        with torch.cuda.stream(self.stream) if self.stream is not None else _nothing():
            data = {k: v if k in HOST_KEYS else v.to(self.device, non_blocking=True) for k, v in batch.data.items()}
            for op in self.ops:
                data = op(data, gen, self.device)
        left = [k for k in data if k in HOST_KEYS]
        if left:
            raise DataError(f"{left} reached the model undecoded: add {{op: decode_jpeg}} to data.device_ops")
        batch.data = data
        return batch


def _nothing():
    return contextlib.nullcontext()
