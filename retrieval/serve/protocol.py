"""clip-retrieval's back-end protocol (``clip_retrieval/clip_back.py``), so its Python ``ClipClient``, its
web front end and scripts that POST to ``/knn-service`` work against our service unchanged.

``POST /knn-service`` takes the 14 keys clip-retrieval's client and front end send::

    {"text", "image" (bare base64), "image_url", "embedding_input" (list of floats), "modality",
     "num_images", "num_result_ids", "indice_name", "deduplicate", "use_mclip", "use_safety_model",
     "use_violence_detector", "aesthetic_score", "aesthetic_weight"}

and answers a JSON list, best first: the first ``num_images`` results carry metadata
(``caption``, ``url`` when the item came from a URL, ``image``: the base64 JPEG thumbnail, ``key``),
then ``id`` and ``similarity``; the rest up to ``num_result_ids`` are ``{"id", "similarity"}`` (the
front end fetches their metadata through ``POST /metadata``). Input precedence is clip-retrieval's:
non-empty ``text``, then ``image``, then ``image_url``, then ``embedding_input``. ``deduplicate``
collapses hits whose stored vectors have cosine >= 0.94 (clip-retrieval's threshold), keeping the
best-ranked one. Options we cannot honour (``use_mclip``, the safety and violence models, aesthetic
shifts) are accepted and ignored. ``image_url`` is refused unless its host is on the server's
allow-list: the server never fetches arbitrary URLs (``fetch``: every redirect hop re-checked, resolved
addresses checked and pinned).

Bounds: ``num_result_ids`` and ``num_images`` are clamped to ``max_result_ids`` (1,000) and
``max_images`` (the front end asks for 3,000 ids, its download button for 10,000: they get 1,000, not
an error); ``/metadata`` takes at most 500 ids (the front end asks for 40 at a time).
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

from retrieval.errors import QueryError
from retrieval.serve.fetch import FetchError, FetchPolicy, check_url

CLIENT_KEYS = (
    "text",
    "image",
    "image_url",
    "embedding_input",
    "deduplicate",
    "use_safety_model",
    "use_violence_detector",
    "indice_name",
    "use_mclip",
    "aesthetic_score",
    "aesthetic_weight",
    "modality",
    "num_images",
    "num_result_ids",
)


@dataclass(frozen=True)
class KnnLimits:
    max_images: int = 1000  # results with metadata (and thumbnails): more asked is clamped to this
    max_result_ids: int = 1000  # results in all: more asked is clamped to this


@dataclass(frozen=True)
class KnnRequest:
    """What to search: exactly one of ``text`` / ``image`` (bytes) / ``image_url`` / ``embedding``."""

    indice_name: str | None
    modality: str
    num_images: int
    num_result_ids: int
    deduplicate: bool
    text: str | None = None
    image: bytes | None = None
    image_url: str | None = None
    embedding: list[float] | None = None


def parse_knn(body: Any, limits: KnnLimits, fetch_policy: FetchPolicy = FetchPolicy()) -> KnnRequest:
    """Validate a ``/knn-service`` body (already JSON-decoded); ``QueryError`` says what is wrong."""
    if not isinstance(body, dict):
        raise QueryError("the body must be a JSON object")
    num_images = min(_int(body.get("num_images", 40), "num_images"), limits.max_images)
    asked = body.get("num_result_ids")
    num_ids = min(_int(asked, "num_result_ids") if asked is not None else num_images, limits.max_result_ids)
    modality = body.get("modality") or "image"
    if not isinstance(modality, str):
        raise QueryError("modality must be a string")
    name = body.get("indice_name")
    if name is not None and not isinstance(name, str):
        raise QueryError("indice_name must be a string")
    common = dict(
        indice_name=name,
        modality=modality,
        num_images=num_images,
        num_result_ids=max(num_ids, 1),
        deduplicate=bool(body.get("deduplicate") or False),
    )
    text, image, url, emb = (body.get(k) for k in ("text", "image", "image_url", "embedding_input"))
    if isinstance(text, str) and text.strip():
        return KnnRequest(**common, text=text)
    if image is not None:
        return KnnRequest(**common, image=b64_image(image))
    if url is not None:
        return KnnRequest(**common, image_url=_allowed_url(url, fetch_policy))
    if emb is not None:
        if not isinstance(emb, list) or not emb or not all(isinstance(x, (int, float)) for x in emb):
            raise QueryError("embedding_input must be a non-empty list of numbers")
        return KnnRequest(**common, embedding=[float(x) for x in emb])
    raise QueryError("give one of text, image (base64), image_url or embedding_input")


def _int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise QueryError(f"{name} must be an integer")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's Infinity and NaN (Python's parser takes them)
        raise QueryError(f"{name} must be a finite integer")
    try:
        n = int(value)
    except (ValueError, OverflowError):
        raise QueryError(f"{name} must be an integer") from None
    if n < low:
        raise QueryError(f"{name} must be at least {low}, got {n}")
    return n


def b64_image(text: Any) -> bytes:
    """A base64 image (bare, or a ``data:`` URL): the one decoder of the service and clip's protocol."""
    if not isinstance(text, str):
        raise QueryError("an image must be a base64 string")
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise QueryError("an image is not valid base64") from None


def _allowed_url(url: Any, policy: FetchPolicy) -> str:
    """The client's own URL checked against the allow-list (the message names no network detail)."""
    if not isinstance(url, str):
        raise QueryError("image_url must be a string")
    try:
        check_url(url, policy)
    except FetchError as exc:
        raise QueryError(
            f"image_url is refused ({exc}): this server fetches images only from the hosts on its allow-list "
            "(retrieval serve --image-url-host); send the image itself as base64 in 'image'"
        ) from None
    return url


def result_list(ids, scores, num_images: int, metadata: list[dict]) -> list[dict]:
    """clip-retrieval's response: ``metadata`` (one dict per hit, the first ``num_images`` hits) merged
    with ``id`` and ``similarity``; later hits carry only those two."""
    out = []
    for rank, (i, s) in enumerate(zip(ids, scores)):
        item = dict(metadata[rank]) if rank < num_images and rank < len(metadata) else {}
        item.update(id=int(i), similarity=float(s))
        out.append(item)
    return out
