"""Collections to embed, read as preprocessed batches with their metadata.

A *source* is one webdataset shard (``.tar``, any ``data.train``-style URL) or a folder of
image files. Each item keeps its key, caption, where it came from, and a small JPEG thumbnail
for search pages. Bad items are skipped and counted, never fatal.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from mmpretrain.data.ops import IMAGE_KEYS, MAX_TEXT_BYTES, open_image
from mmpretrain.eval.media import sample_meta
from mmpretrain.types import Batch

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass
class ItemBatch:
    """``inputs[modality]``: (B, ...) preprocessed tensors; the lists are per item, length B."""

    inputs: Batch
    keys: list[str]
    captions: list[str]
    sources: list[str]
    thumbnails: list[bytes]
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = True  # last batch: False when the source was not read to its end (see SHARD_ERRORS)

    def finish(self, skipped: dict[str, int]) -> "ItemBatch":
        """Mark this as the source's last batch, with its skip counts."""
        from mmpretrain.data.stream import SHARD_ERRORS

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


def _raw_items(source: str, skipped: dict[str, int]) -> Iterator[tuple[str, str, str, bytes]]:
    """(key, caption, source, image bytes) from a shard or an image folder; files over the member
    size cap are skipped (``oversized_member``), shard problems counted by kind (``SHARD_ERRORS``)."""
    from mmpretrain.data.stream import ErrorCounter, ReadLimits, read_samples

    limit = ReadLimits().max_member_bytes
    path = Path(source)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if f.stat().st_size > limit:
                skipped["oversized_member"] = skipped.get("oversized_member", 0) + 1
                continue
            txt = f.with_suffix(".txt")
            caption = txt.read_bytes()[:MAX_TEXT_BYTES].decode("utf-8", "replace").strip() if txt.is_file() else ""
            yield str(f.relative_to(path)), caption, str(f), f.read_bytes()
        return
    errors = ErrorCounter("skip", None)
    for sample in read_samples([source], errors.handler):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            skipped["missing_image"] = skipped.get("missing_image", 0) + 1
            continue
        meta = sample_meta(sample)
        caption = sample.get("txt", b"")[:MAX_TEXT_BYTES].decode("utf-8", "replace").strip()
        captions = meta.get("captions") if isinstance(meta.get("captions"), list) else []
        caption = caption or " ".join(str(c) for c in captions[:1])
        url = str(meta.get("url") or meta.get("source") or "")
        yield sample["__key__"], caption, url or f"{source}#{sample['__key__']}", image
    for kind, n in errors.counts.items():
        skipped[kind] = skipped.get(kind, 0) + n


def item_batches(model, source: str, *, batch_size: int = 64, thumb_size: int = 128) -> Iterator[ItemBatch]:
    """Batches of ``{"image": (B, 3, H, W)}`` with the model's evaluation preprocessing, plus metadata.

    The last batch's ``skipped`` holds the counts of unreadable items of the whole source.
    """
    from mmpretrain.eval.zeroshot import EvalTransform

    transform = EvalTransform(model)
    skipped: dict[str, int] = {}
    cur = ItemBatch({}, [], [], [], [])
    images: list[torch.Tensor] = []
    for key, caption, src, data in _raw_items(source, skipped):
        try:
            img = open_image(data)
            images.append(transform(img))
            cur.thumbnails.append(thumbnail(img, thumb_size))
        except Exception as exc:  # any undecodable image (or a transform's failure on it): skip and count
            skipped["bad_image"] = skipped.get("bad_image", 0) + 1
            log.warning("skipping unreadable image %s in %s: %s", key, source, exc)
            continue
        cur.keys.append(key), cur.captions.append(caption), cur.sources.append(src)
        if len(images) == batch_size:
            cur.inputs = {"image": torch.stack(images)}
            yield cur
            cur, images = ItemBatch({}, [], [], [], []), []
    cur.inputs = {"image": torch.stack(images)} if images else {"image": torch.empty(0)}
    yield cur.finish(skipped)


def media_item_batches(model, source: str, modality: str, *, batch_size: int = 32,
                       thumb_size: int = 128) -> Iterator[ItemBatch]:
    """Batches of ``{modality: (B, ...)}`` for video or audio items of one shard source, with the
    model's evaluation preprocessing (``eval.inputs``; several views per item are averaged when
    embedded). Video thumbnails are the middle frame; audio items have none. Undecodable items are
    skipped and counted (the last batch's ``skipped``)."""
    from mmpretrain.data.stream import ErrorCounter, process_sample, read_samples
    from mmpretrain.eval.inputs import Views, collate, eval_ops
    from mmpretrain.eval.media import sample_captions

    ops = eval_ops(model, modality, Views())
    spec = model.data_context().spec("video")  # the tower's normalisation, undone for thumbnails
    errors = ErrorCounter("skip", None)
    cur, pending = ItemBatch({}, [], [], [], []), []
    for sample in read_samples([source], errors.handler):
        out = process_sample(ops, dict(sample), errors)
        if out is None:
            continue
        pending.append(out)
        caps = sample_captions(sample)
        cur.keys.append(sample["__key__"]), cur.captions.append(caps[0] if caps else "")
        cur.sources.append(f"{source}#{sample['__key__']}")
        cur.thumbnails.append(_video_thumb(out["video"], spec, thumb_size) if modality == "video" else b"")
        if len(pending) == batch_size:
            cur.inputs = collate(pending, [modality])
            yield cur
            cur, pending = ItemBatch({}, [], [], [], []), []
    cur.inputs = collate(pending, [modality]) if pending else {modality: torch.empty(0)}
    yield cur.finish(errors.counts)


def _video_thumb(video: torch.Tensor, spec, size: int) -> bytes:
    """JPEG of the middle frame of the first view of a (T, 3, H, W) or (V, T, 3, H, W) clip normalised
    with ``spec`` (a ``VideoSpec``'s mean and std)."""
    if size <= 0:
        return b""
    clip = video if video.dim() == 4 else video[0]
    frame = clip[clip.shape[0] // 2] * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)
    pixels = (frame.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return thumbnail(Image.fromarray(pixels), size)
