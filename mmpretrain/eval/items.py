"""Collections to embed, read as preprocessed batches with their metadata: one builder for every
modality (``item_batches``), through the one evaluation recipe (``eval.inputs.EvalInput``).

A *source* is one webdataset shard (``.tar``, any ``data.train``-style URL) or a folder of media
files (image, video or audio, by the modality's file suffixes; a sibling ``.txt`` is the caption).
Each item keeps its key, caption, where it came from (the JSON's ``url`` or ``source``, the file,
or ``shard#key``) and a small JPEG thumbnail for search pages (an image's own; a clip's middle
frame; none for audio). Bad items are skipped and counted, never fatal.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmpretrain.data.ops import EVAL_CAPTION_KEYS, Sample, read_captions
from mmpretrain.data.stream import SHARD_ERRORS, ErrorCounter, process_sample, read_samples
from mmpretrain.eval.inputs import EvalInput, Views, capped_file_sample, collate, media_keys
from mmpretrain.eval.sets import sample_meta
from mmpretrain.types import Batch


@dataclass
class ItemBatch:
    """``inputs[modality]``: (B, ...) preprocessed tensors; the lists are per item, length B."""

    inputs: Batch
    keys: list[str]
    captions: list[str]
    sources: list[str]
    thumbnails: list[bytes]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) as decoded; (0, 0): not an image
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = True  # last batch: False when the source was not read to its end (see SHARD_ERRORS)

    def finish(self, skipped: dict[str, int]) -> ItemBatch:
        """Mark this as the source's last batch, with its skip counts."""

        self.skipped = dict(skipped)
        self.complete = not any(self.skipped.get(kind) for kind in SHARD_ERRORS)
        return self


def thumbnail(image: Image.Image, size: int) -> bytes:
    """A JPEG of the image's longer side scaled to ``size`` (0: none)."""
    if size <= 0:
        return b""
    img = image.convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def source_samples(source: str, modality: str, errors: ErrorCounter) -> Iterator[Sample]:
    """Raw samples of one source: a shard's (``read_samples``), or a folder's media files of
    ``modality`` (sorted; a sibling ``.txt`` as ``txt``; files over the member cap skipped as
    ``oversized_member``), each with ``__source__``: where the item came from."""
    path = Path(source)
    if not path.is_dir():
        for sample in read_samples([source], errors.handler):
            yield {**sample, "__source__": f"{source}#{sample['__key__']}"}
        return
    suffixes = media_keys(modality)
    for f in sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in suffixes):
        sample = capped_file_sample(f, modality, errors)
        if sample is None:
            continue
        sample.update(__key__=str(f.relative_to(path)), __source__=str(f))
        if f.with_suffix(".txt").is_file():
            sample["txt"] = f.with_suffix(".txt").read_bytes()
        yield sample


def item_batches(
    model, source: str, modality: str = "image", *, batch_size: int = 64, thumb_size: int = 128, views: Views = Views()
) -> Iterator[ItemBatch]:
    """Batches of ``{modality: (B, ...)}`` (and its mask) with the model's evaluation preprocessing,
    plus metadata; several views per item are averaged when embedded. The last batch's ``skipped``
    holds the counts of unusable items and ``complete`` whether the source was read to its end."""
    return input_batches(EvalInput(model, modality, views), source, batch_size=batch_size, thumb_size=thumb_size)


def input_batches(
    inputs: EvalInput, source: str, *, batch_size: int = 64, thumb_size: int = 128
) -> Iterator[ItemBatch]:
    """``item_batches`` from an ``EvalInput`` alone (picklable, no weights): what a decoding process
    that holds no model (a DataLoader worker, a Ray task) runs."""
    modality, errors = inputs.modality, ErrorCounter("skip", None)
    decode, rest = inputs.ops[:1], inputs.ops[1:]  # the decode op, then the transforms
    cur, pending, video_spec = ItemBatch({}, [], [], [], []), [], inputs.ctx.spec("video")
    for sample in source_samples(source, modality, errors):
        decoded = process_sample(decode, dict(sample), errors)
        out = process_sample(rest, dict(decoded), errors) if decoded is not None else None  # decoded stays as is
        if out is None:
            continue
        meta, caps = sample_meta(sample), read_captions(sample, EVAL_CAPTION_KEYS, strict=False)
        pending.append(out)
        cur.keys.append(sample["__key__"]), cur.captions.append(caps[0] if caps else "")
        cur.sources.append(str(meta.get("url") or meta.get("source") or sample["__source__"]))
        cur.thumbnails.append(_thumb(decoded[modality], video_spec, thumb_size))
        cur.sizes.append(decoded[modality].size if isinstance(decoded[modality], Image.Image) else (0, 0))
        if len(pending) == batch_size:
            cur.inputs = collate(pending, [modality])
            yield cur
            cur, pending = ItemBatch({}, [], [], [], []), []
    cur.inputs = collate(pending, [modality]) if pending else {modality: torch.empty(0)}
    yield cur.finish(errors.counts)


def _thumb(decoded: Any, video_spec, size: int) -> bytes:
    """A thumbnail of a decoded item, by what it is: an image (PIL) itself, a clip ((T, 3, H, W) or
    (V, T, 3, H, W), normalised with ``video_spec``) its middle frame, anything else (audio) none."""
    if isinstance(decoded, Image.Image):
        return thumbnail(decoded, size)
    if isinstance(decoded, torch.Tensor) and decoded.dim() >= 4 and size > 0:
        return _video_thumb(decoded, video_spec, size)
    return b""


def _video_thumb(video: torch.Tensor, spec, size: int) -> bytes:
    """JPEG of the middle frame of the first view of a (T, 3, H, W) or (V, T, 3, H, W) clip normalised
    with ``spec`` (a ``VideoSpec``'s mean and std)."""
    if size <= 0:
        return b""
    clip = video if video.dim() == 4 else video[0]
    frame = clip[clip.shape[0] // 2] * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)
    pixels = (frame.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return thumbnail(Image.fromarray(pixels), size)
