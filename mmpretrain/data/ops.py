"""Data ops: a registry of per-sample transforms composed from config (as big_vision's pp).

A sample is a dict: raw members (``"jpg"``/``"png"``/``"webp"``, ``"txt"``, ``"json"`` bytes,
``"__key__"``) in, tensors (``"image"`` (3, H, W), ``"text"`` (L,), ``"text_mask"`` (L,)) out.
An op that cannot process a sample raises ``SampleError``; the stream skips and counts it.
Randomness comes from torch's global RNG, which the stream seeds per sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from mmpretrain.config.schema import OpSpec
from mmpretrain.config.strict import check_params, typed_params
from mmpretrain.registry import Registry
from mmpretrain.types import ImageSpec

Sample = dict[str, Any]
Op = Callable[[Sample], Sample]
DATA_OPS: Registry[Op] = Registry("data op")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # image members / file suffixes we decode
# What PIL may parse of untrusted bytes: the formats we decode, no others (an EPS named .jpg would
# otherwise run Ghostscript where it is installed; PSD, TIFF, ... widen the attack surface).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
MAX_JSON_BYTES = 1 << 20  # a json member larger than this is refused (bad_json)
MAX_TEXT_BYTES = 64 << 10  # a caption larger than this is refused (bad_caption): tokenizers read it whole
EVAL_CAPTION_KEYS = ("json:captions", "json:caption", "txt")  # where evaluation and embedding jobs look, in order
# Resizing the short side of a 2,000,000 x 20 image to 224 asks for ~5 G pixels (a 4.9 KB PNG, under
# any pixel cap): before a short-side resize the long side is cut to this many times the short one,
# centred. A centre crop keeps less than that anyway, so images up to 4:1 are resized exactly as before.
MAX_RESIZE_ASPECT = 4.0


class SampleError(ValueError):
    """A sample that cannot be used (corrupt image, empty caption, ...). ``kind`` names the cause."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class OpContext:
    """What ops need from the model: each tower's input spec by modality (``types.ImageSpec``,
    ``TextSpec`` with the tokenizer, ``VideoSpec``, ``AudioSpec``; ``model.data_context()``)."""

    specs: Mapping[str, Any] = field(default_factory=dict)

    def spec(self, modality: str) -> Any:
        """``modality``'s input spec, or None when the model has no such tower."""
        return self.specs.get(modality)

    @property
    def image(self) -> ImageSpec:
        """The image tower's spec (defaults when there is none: image ops then use them)."""
        return self.specs.get("image") or ImageSpec()

    @property
    def tokenizer(self) -> Any:
        text = self.specs.get("text")
        return text.tokenizer if text is not None else None


@dataclass(frozen=True)
class OpExample:
    """What the generated tests need to run a data op (each op registers one): the raw ``members`` of
    an example sample (by member name: png, jpg, txt, json, mp4, wav; the tests make them), ``before``:
    ops that run first with default params, ``params``, the keys it must ``produce``, the model
    ``towers`` whose specs it reads, and ``corrupt``: a bad value of its first member and the
    ``SampleError`` kind it must raise on it (None: nothing it reads can be bad)."""

    members: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    produce: tuple[str, ...] = ()
    towers: tuple[str, ...] = ()
    corrupt: tuple[bytes, str] | None = None


def build_ops(specs: list[OpSpec], ctx: OpContext, where: str = "data.ops") -> list[Op]:
    """The ops of ``specs``; a bad one's ``ConfigError`` names ``where[i]`` (a source's: ``data.sources[j].ops``)."""
    ops = []
    for i, spec in enumerate(specs):
        entry = DATA_OPS.get(spec.op)
        ops.append(entry.builder(typed_params(entry, spec.params, f"{where}[{i}]"), ctx))
    return ops


def check_ops(specs: list[OpSpec], where: str) -> None:
    """Every op of ``specs`` is registered and its params fit; ``ConfigError`` naming ``where[i]`` otherwise."""
    for i, spec in enumerate(specs):
        check_params(DATA_OPS, spec.op, spec.params, f"{where}[{i}]")


def apply_ops(ops: list[Op], sample: Sample) -> Sample:
    for op in ops:
        sample = op(sample)
    return sample


# ------------------------------------------------------------------ images
class ImageTooLarge(SampleError):
    """An image whose header claims more pixels than allowed (refused before decoding)."""


def open_image(src: bytes | str | Path, *, max_pixels: int = 100_000_000) -> Image.Image:
    """Decode untrusted image bytes (or a file) to RGB. Only ``IMAGE_FORMATS`` are parsed, and the
    pixel count is checked from the header before any decoding (decompression bombs).

    Raises:
        SampleError: ``bad_image``, saying why.
    """
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, formats=IMAGE_FORMATS) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(
                    "bad_image", f"{img.width}x{img.height} pixels is too large (max_pixels={max_pixels})"
                )
            return img.convert("RGB")
    except (SampleError, MemoryError):  # MemoryError: a limit the caller set (the service's decoder) was hit
        raise
    except Exception as exc:  # PIL raises many types for corrupt or refused data
        raise SampleError(
            "bad_image", f"cannot decode the image as {'/'.join(IMAGE_FORMATS)}: {type(exc).__name__}: {exc}"
        ) from None


def json_member(s: Sample, member: str = "json") -> dict[str, Any]:
    """A sample's JSON member as a dict (``{}`` when absent).

    Raises:
        SampleError: ``bad_json`` when it is over ``MAX_JSON_BYTES``, not UTF-8 JSON, nested too
            deeply for the parser (``RecursionError``), or not an object.
    """
    raw = s.get(member)
    if raw is None:
        return {}
    if len(raw) > MAX_JSON_BYTES:
        raise SampleError("bad_json", f"{s.get('__key__')}: {member} member of {len(raw)} bytes (max {MAX_JSON_BYTES})")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SampleError(
            "bad_json", f"{s.get('__key__')}: unreadable {member}: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    if not isinstance(value, dict):
        raise SampleError("bad_json", f"{s.get('__key__')}: {member} is a {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True)
class DecodeImageParams:
    keys: tuple[str, ...] = IMAGE_KEYS
    max_pixels: int = 100_000_000  # refuse decompression bombs


@DATA_OPS.register(
    "decode_image",
    config=DecodeImageParams,
    example=OpExample(("png",), produce=("image",), corrupt=(b"\x00garbage", "bad_image")),
)
def decode_image(p: DecodeImageParams, ctx: OpContext) -> Op:
    """Decode the first present image member to an RGB PIL image under ``"image"``."""

    def op(s: Sample) -> Sample:
        if isinstance(s.get("image"), Image.Image):  # already decoded (an upload, a PIL image given to the API)
            s["image"] = s["image"] if s["image"].mode == "RGB" else s["image"].convert("RGB")
            return s
        key = next((k for k in p.keys if k in s), None)
        if key is None:
            raise SampleError("missing_image", f"{s.get('__key__')}: no image member among {p.keys}")
        try:
            s["image"] = open_image(s[key], max_pixels=p.max_pixels)
        except SampleError as exc:
            raise SampleError(exc.kind, f"{s.get('__key__')}.{key}: {exc}") from None
        return s

    return op


# Variable-length members a batch carries concatenated (``key`` (N,)) with ``offsets`` (B + 1,).
RAGGED_KEYS = {"image_jpeg": "image_jpeg_offsets"}
JPEG_END = b"\xff\xd9"  # the end-of-image marker; a file without it was cut short


@dataclass(frozen=True)
class JpegBytesParams:
    keys: tuple[str, ...] = IMAGE_KEYS
    max_pixels: int = 100_000_000  # refuse decompression bombs (from the header, nothing decoded)
    transcode: bool = True  # a PNG/WebP/... member (or a JPEG without its end marker that PIL reads) is
    #                         decoded here and re-encoded as JPEG; False: it is skipped as not_jpeg
    quality: int = 95  # of a transcoded image


@DATA_OPS.register(
    "jpeg_bytes",
    config=JpegBytesParams,
    example=OpExample(("jpg",), produce=("image_jpeg",), corrupt=(b"\x00garbage", "bad_image")),
)
def jpeg_bytes(p: JpegBytesParams, ctx: OpContext) -> Op:
    """The image member's JPEG bytes, checked but not decoded, as ``"image_jpeg"`` (N,) uint8, for
    the ``decode_jpeg`` device op (nvjpeg on the GPU). The header is parsed (format, pixel count)
    and the end marker checked on the CPU; other formats are transcoded to JPEG (``transcode``)."""

    def op(s: Sample) -> Sample:
        key = next((k for k in p.keys if k in s), None)
        if key is None:
            raise SampleError("missing_image", f"{s.get('__key__')}: no image member among {p.keys}")
        raw = bytes(s[key])
        try:
            s["image_jpeg"] = torch.frombuffer(bytearray(_checked_jpeg(raw, p)), dtype=torch.uint8)
        except SampleError as exc:
            raise SampleError(exc.kind, f"{s.get('__key__')}.{key}: {exc}") from None
        return s

    return op


def _checked_jpeg(raw: bytes, p: JpegBytesParams) -> bytes:
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as img:
            fmt, pixels, size = img.format, img.width * img.height, f"{img.width}x{img.height}"
    except Exception as exc:  # PIL raises many types for corrupt or refused data
        raise SampleError("bad_image", f"not a {'/'.join(IMAGE_FORMATS)} image: {type(exc).__name__}: {exc}") from None
    if pixels > p.max_pixels:
        raise ImageTooLarge("bad_image", f"{size} pixels is too large (max_pixels={p.max_pixels})")
    complete = raw.rstrip(b"\x00").endswith(JPEG_END)
    if fmt == "JPEG" and complete:
        return raw
    if not p.transcode:
        if fmt == "JPEG":
            raise SampleError("bad_image", "a JPEG without its end marker (cut short?)")
        raise SampleError("not_jpeg", f"a {fmt} image (jpeg_bytes.transcode is off)")
    out = io.BytesIO()
    open_image(raw, max_pixels=p.max_pixels).save(out, format="JPEG", quality=p.quality)
    return out.getvalue()


def aspect_capped(image: Image.Image | torch.Tensor, max_aspect: float = MAX_RESIZE_ASPECT):
    """``image`` (PIL, or a tensor (..., H, W)) with its long side cut, centred, to at most
    ``max_aspect`` times its short side, so that resizing the short side to S makes at most
    ``max_aspect * S * S`` pixels; an image within the ratio is returned as it is."""
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
    keep = math.ceil(max_aspect * min(w, h))
    if max(w, h) <= keep:
        return image
    left, top = (w - keep) // 2 if w > h else 0, (h - keep) // 2 if h > w else 0
    width, height = (keep, h) if w > h else (w, keep)
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    return image[..., top : top + height, left : left + width]


def _image_op(transform: Callable) -> Op:
    def op(s: Sample) -> Sample:
        s["image"] = transform(s["image"])
        return s

    return op


@dataclass(frozen=True)
class RandomResizedCropParams:
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333)
    size: int | None = None  # None: the image tower's input size


@DATA_OPS.register(
    "random_resized_crop",
    config=RandomResizedCropParams,
    example=OpExample(("png",), ("decode_image",), produce=("image",)),
)
def random_resized_crop(p: RandomResizedCropParams, ctx: OpContext) -> Op:
    """Random area/aspect crop resized to the tower's input (CLIP's train augmentation)."""
    size = (p.size, p.size) if p.size else ctx.image.size
    mode = T.InterpolationMode(ctx.image.interpolation)
    return _image_op(T.RandomResizedCrop(size, scale=p.scale, ratio=p.ratio, interpolation=mode, antialias=True))


@dataclass(frozen=True)
class ResizeCenterCropParams:
    size: int | None = None


@DATA_OPS.register(
    "resize_center_crop",
    config=ResizeCenterCropParams,
    example=OpExample(("png",), ("decode_image",), produce=("image",)),
)
def resize_center_crop(p: ResizeCenterCropParams, ctx: OpContext) -> Op:
    """Resize the short side, then centre-crop (deterministic evaluation transform). An image longer
    than ``MAX_RESIZE_ASPECT`` (or the crop's own ratio, if wider) is first cut to it, centred: the
    resize's output stays bounded whatever the image's shape (a resize bomb is a thin image)."""
    size = (p.size, p.size) if p.size else ctx.image.size
    mode = T.InterpolationMode(ctx.image.interpolation)
    cap = max(MAX_RESIZE_ASPECT, 2 * max(size) / min(size))
    resize = T.Resize(min(size), interpolation=mode, antialias=True)
    return _image_op(T.Compose([partial(aspect_capped, max_aspect=cap), resize, T.CenterCrop(size)]))


@dataclass(frozen=True)
class HflipParams:
    p: float = 0.5


@DATA_OPS.register("hflip", config=HflipParams, example=OpExample(("png",), ("decode_image",), produce=("image",)))
def hflip(p: HflipParams, ctx: OpContext) -> Op:
    """Horizontal flip with probability ``p`` (beware captions that say left/right)."""
    return _image_op(T.RandomHorizontalFlip(p.p))


@dataclass(frozen=True)
class ColorJitterParams:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8


@DATA_OPS.register(
    "color_jitter", config=ColorJitterParams, example=OpExample(("png",), ("decode_image",), produce=("image",))
)
def color_jitter(p: ColorJitterParams, ctx: OpContext) -> Op:
    """Random colour jitter, applied with probability ``p``."""
    jitter = T.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)
    return _image_op(T.RandomApply([jitter], p=p.p))


@dataclass(frozen=True)
class NormalizeParams:
    mean: tuple[float, float, float] | None = None  # None: the image tower's
    std: tuple[float, float, float] | None = None


@DATA_OPS.register(
    "to_tensor_normalize",
    config=NormalizeParams,
    example=OpExample(("png",), ("decode_image", "resize_center_crop"), produce=("image",)),
)
def to_tensor_normalize(p: NormalizeParams, ctx: OpContext) -> Op:
    """PIL -> float tensor (3, H, W), normalised with the tower's mean/std."""
    mean, std = list(p.mean or ctx.image.mean), list(p.std or ctx.image.std)
    return _image_op(T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]))


@dataclass(frozen=True)
class MultiCropParams:
    global_crops: int = 2  # large crops, first (a self-distillation teacher encodes them)
    local_crops: int = 4  # small crops
    global_scale: tuple[float, float] = (0.4, 1.0)  # crop area, as a fraction of the image (DINO's)
    local_scale: tuple[float, float] = (0.05, 0.4)
    out: str = "image_crops"  # the batch key: (global_crops + local_crops, 3, H, W)


@DATA_OPS.register(
    "multi_crop",
    config=MultiCropParams,
    example=OpExample(("png",), ("decode_image",), params={"local_crops": 1}, produce=("image_crops",)),
)
def multi_crop(p: MultiCropParams, ctx: OpContext) -> Op:
    """DINO's multi-crop: global and local random crops of the decoded image, each resized to the image
    tower's input (towers with fixed position embeddings take them as they are) and normalised, stacked
    into ``out``, global first. ``"image"`` is left as it is, for the ops after it."""
    if p.global_crops < 1 or p.local_crops < 0:
        raise ValueError("multi_crop: global_crops must be >= 1 and local_crops >= 0")
    size, mode = ctx.image.size, T.InterpolationMode(ctx.image.interpolation)
    finish = T.Compose(
        [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(ctx.image.mean, ctx.image.std)]
    )
    big = T.RandomResizedCrop(size, scale=p.global_scale, interpolation=mode, antialias=True)
    small = T.RandomResizedCrop(size, scale=p.local_scale, interpolation=mode, antialias=True)

    def op(s: Sample) -> Sample:
        crops = [big(s["image"]) for _ in range(p.global_crops)] + [small(s["image"]) for _ in range(p.local_crops)]
        s[p.out] = torch.stack([finish(c) for c in crops])
        return s

    return op


@dataclass(frozen=True)
class PatchMaskParams:
    ratio: float = 0.5  # fraction of the patches masked (exactly round(ratio * patches) of them)
    out: str = "patch_mask"  # the batch key: (patches,) bool, True = masked


@DATA_OPS.register("patch_mask", config=PatchMaskParams, example=OpExample(produce=("patch_mask",), towers=("image",)))
def patch_mask(p: PatchMaskParams, ctx: OpContext) -> Op:
    """A random mask over the image tower's patches for masked prediction (iBOT's and TIPS's masks come
    from the data pipeline too): drawn per sample from the stream's seeded RNG, so a resumed run and
    any split of a batch into micro-batches see the same masks."""
    n = ctx.image.patches
    if not n:
        raise ValueError("patch_mask: the image tower cuts no patches (a vision transformer is needed)")
    if not 0.0 < p.ratio < 1.0:
        raise ValueError(f"patch_mask: ratio must be in (0, 1), not {p.ratio}")
    k = max(1, round(p.ratio * n))

    def op(s: Sample) -> Sample:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n)[:k]] = True
        s[p.out] = mask
        return s

    return op


# ------------------------------------------------------------------ text
@dataclass(frozen=True)
class CaptionParams:
    keys: tuple[str, ...] = ("txt", "json:caption")  # "json:field" reads a field of the json member


@DATA_OPS.register(
    "caption",
    config=CaptionParams,
    example=OpExample(("txt",), produce=("caption",), corrupt=(b" \n ", "empty_caption")),
)
def caption(p: CaptionParams, ctx: OpContext) -> Op:
    """Read the caption (first non-empty of ``keys``) into ``"caption"``; empty -> SampleError."""

    def op(s: Sample) -> Sample:
        texts = read_captions(s, p.keys)
        if not texts:
            raise SampleError("empty_caption", f"{s.get('__key__')}: no non-empty caption in {p.keys}")
        s["caption"] = texts[0]
        return s

    return op


@dataclass(frozen=True)
class CaptionsParams:
    k: int = 2  # captions per sample (-> text (K, L)); drawn with replacement when a sample has fewer
    key: str = "json:captions"  # a list of strings in the json member
    fallback: tuple[str, ...] = ("txt", "json:caption")  # single caption when the list is missing
    train: bool = True  # random draw; False: the first k (cycled)


@DATA_OPS.register(
    "captions",
    config=CaptionsParams,
    example=OpExample(("json",), params={"k": 2}, produce=("caption",), corrupt=(b"{not json", "bad_json")),
)
def captions(p: CaptionsParams, ctx: OpContext) -> Op:
    """K captions of one sample into ``"caption"`` (a list), for MIL-NCE (``tokenize`` -> (K, L))."""
    if p.k < 1:
        raise ValueError("captions: k must be >= 1")

    def op(s: Sample) -> Sample:
        texts = read_captions(s, (p.key,)) or read_captions(s, p.fallback)[:1]
        if not texts:
            raise SampleError("empty_caption", f"{s.get('__key__')}: no caption in {p.key} or {p.fallback}")
        if p.train:
            picks = (
                torch.randperm(len(texts)).tolist() if len(texts) >= p.k else torch.randint(len(texts), (p.k,)).tolist()
            )
        else:
            picks = [i % len(texts) for i in range(p.k)]
        s["caption"] = [texts[i] for i in picks[: p.k]]
        return s

    return op


def read_captions(s: Sample, keys: tuple[str, ...] | list[str], *, strict: bool = True) -> list[str]:
    """A sample's captions from the first of ``keys`` that has any: ``"txt"`` (a text member),
    ``"txt/lines"`` (each non-empty line of it a caption, as CLIP_benchmark's retrieval sets hold them) or
    ``"json:FIELD"`` (a string, or a list of strings, in the JSON member). The one caption reader:
    training ops, evaluation and embedding jobs use it (the latter with ``EVAL_CAPTION_KEYS``).

    ``strict``: an over-long or non-UTF-8 text, or a bad JSON member, is a ``SampleError``
    (``bad_caption`` / ``bad_json``); otherwise it is truncated, decoded with replacement, or ignored.
    """
    for key in keys:
        member, _, field = key.partition(":")
        if field:
            try:
                value = json_member(s, member).get(field)
            except SampleError:
                if strict:
                    raise
                value = None
            values = value if isinstance(value, list) else [value]
            texts = [v.strip()[:MAX_TEXT_BYTES] for v in values if isinstance(v, str) and v.strip()]
        elif member.endswith("/lines"):
            texts = [line.strip() for line in _text_member(s, member[: -len("/lines")], strict).splitlines()]
            texts = [line for line in texts if line]
        else:
            texts = [t for t in [_text_member(s, member, strict)] if t]
        if texts:
            return texts
    return []


def _text_member(s: Sample, member: str, strict: bool) -> str:
    raw = s.get(member)
    if raw is None:
        return ""
    if not isinstance(raw, bytes):
        return str(raw).strip()
    if len(raw) > MAX_TEXT_BYTES:
        if strict:
            raise SampleError(
                "bad_caption", f"{s.get('__key__')}: {member} member of {len(raw)} bytes (max {MAX_TEXT_BYTES})"
            )
        raw = raw[:MAX_TEXT_BYTES]
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        if strict:
            raise SampleError("bad_caption", f"{s.get('__key__')}: {member} is not UTF-8: {exc}") from None
        return raw.decode("utf-8", "replace").strip()


# ------------------------------------------------------------------ groups (several positives per row)
@dataclass(frozen=True)
class GroupIdParams:
    key: str = "json:concept"  # "__key__", a text member ("txt"), or "json:FIELD" (a string or an integer)
    pattern: str | None = None  # a regex: the id is its first group (or whole match) in the value, e.g. "^(.+)-[^-]+$"
    out: str = "group"  # the batch key a pair's loss.pairs[i].positives names


@DATA_OPS.register(
    "group_id",
    config=GroupIdParams,
    example=OpExample(("txt",), params={"key": "txt"}, produce=("group",), corrupt=(b"\xff\xfe", "bad_caption")),
)
def group_id(p: GroupIdParams, ctx: OpContext) -> Op:
    """A group id into ``out``: an int64 (a stable hash of a sample's field), equal for the samples of
    one group (a concept, a duplicate group, a source key), which a multi-positive loss pair treats as
    positives of each other. A sample with no value is a ``SampleError`` (``no_group``)."""
    rx = re.compile(p.pattern) if p.pattern else None
    member, _, fld = p.key.partition(":")

    def op(s: Sample) -> Sample:
        if p.key == "__key__":
            value = str(s.get("__key__") or "")
        elif fld:
            raw = json_member(s, member).get(fld)
            value = str(raw) if isinstance(raw, (str, int)) and not isinstance(raw, bool) else ""
        else:
            value = _text_member(s, member, True)
        if rx is not None and value:
            m = rx.search(value)
            value = "" if m is None else m.group(1) if m.groups() else m.group(0)
        if not value:
            raise SampleError("no_group", f"{s.get('__key__')}: no group id in {p.key!r}")
        s[p.out] = torch.tensor(stable_id(value), dtype=torch.int64)
        return s

    return op


def stable_id(value: str) -> int:
    """A signed 64-bit id of ``value``, the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little", signed=True)


@DATA_OPS.register(
    "tokenize", example=OpExample(("txt",), ("caption",), produce=("text", "text_mask"), towers=("text",))
)
def tokenize(p: None, ctx: OpContext) -> Op:
    """Tokenise ``"caption"`` with the model's tokenizer into ``"text"`` (L,) and ``"text_mask"`` (L,);
    a list of K captions (the ``captions`` op) gives (K, L) and (K, L)."""
    if ctx.tokenizer is None:
        raise ValueError("the tokenize op needs a model with a text tower")

    def op(s: Sample) -> Sample:
        several = isinstance(s["caption"], list)
        out = ctx.tokenizer(s["caption"] if several else [s["caption"]])
        s["text"], s["text_mask"] = (
            (out["text"], out["text_mask"]) if several else (out["text"][0], out["text_mask"][0])
        )
        return s

    return op
