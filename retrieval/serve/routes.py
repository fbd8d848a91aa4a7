"""The service's query routes: ``/search`` (GET and POST), ``/classify``, and clip-retrieval's
``/knn-service``, ``/metadata`` and ``/indices-list`` (``clip_protocol`` parses their bodies).

Every route bounds its work before doing it: queries and images per call, pixels per call, labels and
one ``<>`` per template, results and metadata per call, response bytes; a query waits in the batcher
counted against its client (``Served.ask``); the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any
from urllib.parse import parse_qsl

import anyio
import numpy as np
import orjson
from fastapi import Body, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from retrieval.errors import QueryError
from retrieval.jobs.dedup import NEAR_DUPLICATE
from retrieval.serve.engine import Answer, IndexEngine
from retrieval.serve.engine import Query as EngineQuery
from retrieval.serve.fetch import FetchError, fetch
from retrieval.serve.protocol import b64_image, parse_knn, result_list
from retrieval.serve.served import Served

log = logging.getLogger(__name__)
LABEL_CHUNK = 4  # labels encoded per batch when /classify meets new ones
QUERY_CHUNK = 16  # queries of one request in the queue at a time (a client's share is 32)
MAX_HITS = 10_000  # queries x k of one POST /search


class FastJSON(JSONResponse):
    """JSON rendered by orjson (~20x faster than the standard library for our hit lists)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def client_of(request: Request) -> str:
    """The client a query is counted against: its address (a trusted proxy's X-Forwarded-For, as uvicorn
    resolves it)."""
    return request.client.host if request.client else ""


def parse_labels(text: str, max_labels: int, max_chars: int) -> list[str]:
    labels = [x.strip() for x in re.split(r"[,\n]", text) if x.strip()]
    if not labels:
        raise QueryError("give at least one label")
    if len(labels) > max_labels:
        raise QueryError(f"at most {max_labels} labels, got {len(labels)}")
    if any(len(x) > max_chars for x in labels):
        raise QueryError(f"labels are at most {max_chars} characters")
    return list(dict.fromkeys(labels))


def check_template(template: str) -> str:
    """A zero-shot template: exactly one ``<>`` (the label's place), at most 200 characters."""
    if template.count("<>") != 1 or len(template) > 200:
        raise QueryError("the template must contain <> (the label's place) exactly once and be at most 200 characters")
    return template


def check_utf8(query_string: bytes) -> None:
    """Starlette decodes bad percent-escapes to U+FFFD silently; refuse them instead."""

    try:
        parse_qsl(query_string.decode("latin-1"), encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise QueryError("the query is not valid UTF-8") from None


def as_vector(values, dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.shape != (dim,) or not np.isfinite(v).all():
        raise QueryError(f"an embedding must be {dim} finite numbers, got shape {tuple(v.shape)}")
    return v


async def run_all(served: Served, engine: IndexEngine, queries: list[EngineQuery], client: str) -> list[Answer]:
    """The answers to one request's queries, submitted ``QUERY_CHUNK`` at a time (each chunk once the last
    is answered): a request of 256 queries never holds more than its share of the queue, and is never
    half admitted and then refused."""
    answers: list[Answer] = []
    for i in range(0, len(queries), QUERY_CHUNK):
        answers += await asyncio.gather(*(served.ask(engine, q, client) for q in queries[i : i + QUERY_CHUNK]))
    return answers


def search_routes(app: FastAPI, served: Served) -> None:
    @app.get("/search", response_class=FastJSON)
    async def search_get(
        request: Request,
        q: str = Query(..., description="the text query"),
        k: int = Query(10),
        index: str | None = None,
    ) -> FastJSON:
        check_utf8(request.scope.get("query_string", b""))
        engine, start = served.engine(index), time.perf_counter()
        text, k = engine.searcher.check_text([q])[0], engine.searcher.check_k(k)
        answer = (await run_all(served, engine, [EngineQuery("text", text, k)], client_of(request)))[0]
        ms = 1000 * (time.perf_counter() - start)
        return FastJSON(
            {"query": q, "k": k, "index": engine.name, "ms": ms, "results": served.hits_json(engine, answer)}
        )

    @app.post("/search", response_class=FastJSON)
    async def search_post(
        request: Request,
        queries: list[str] | None = Body(None, embed=True),
        images: list[str] | None = Body(None, embed=True, description="base64 images (at most 16)"),
        embeddings: list[list[float]] | None = Body(None, embed=True),
        k: int = Body(10, embed=True),
        index: str | None = Body(None, embed=True),
        deduplicate: bool = Body(False, embed=True),
    ) -> FastJSON:
        engine, start, cfg = served.engine(index), time.perf_counter(), served.cfg
        k, dedup = engine.searcher.check_k(k), NEAR_DUPLICATE if deduplicate else None
        given = [x for x in (queries, images, embeddings) if x is not None]
        if len(given) != 1 or not given[0]:
            raise QueryError("give one non-empty list: queries (texts), images (base64) or embeddings")
        if len(given[0]) > engine.searcher.limits.max_batch:
            raise QueryError(f"at most {engine.searcher.limits.max_batch} queries a call, got {len(given[0])}")
        if len(given[0]) * k > MAX_HITS:
            raise QueryError(f"at most {MAX_HITS} hits a call (queries x k), asked {len(given[0])} x {k}")
        if queries is not None:
            batch = [EngineQuery("text", t, k, dedup) for t in engine.searcher.check_text(queries)]
        elif images is not None:
            if len(images) > cfg.max_images:
                raise QueryError(f"at most {cfg.max_images} images a call, got {len(images)}")
            pixels = min(cfg.max_image_pixels, cfg.max_request_pixels // len(images))  # each image's share
            tensors = await served.images(engine, [b64_image(x) for x in images], pixels, client_of(request))
            batch = [EngineQuery("image", t, k, dedup) for t in tensors]
        else:
            batch = [EngineQuery("vector", as_vector(v, engine.dim), k, dedup) for v in embeddings]
        answers = await run_all(served, engine, batch, client_of(request))
        results = await anyio.to_thread.run_sync(lambda: [served.hits_json(engine, a) for a in answers])
        ms = 1000 * (time.perf_counter() - start)  # up to 10,000 hits: built off the event loop
        return FastJSON({"k": k, "index": engine.name, "queries": queries, "ms": ms, "results": results})

    @app.post("/classify")
    async def classify(
        request: Request,
        image: UploadFile = File(...),
        labels: str = Form(...),
        template: str = Form("a photo of a <>"),
        index: str = Form(None),
    ) -> dict:
        engine, cfg, client = served.engine(index), served.cfg, client_of(request)
        data = await image.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {cfg.max_upload_bytes} bytes")
        names = parse_labels(labels, cfg.max_labels, cfg.max_label_chars)
        template = check_template(template)
        tensor = (await served.images(engine, [data], cfg.max_image_pixels, client))[0]
        label_vectors = await _label_vectors(served, engine, template, names, client)
        answer = await served.ask(engine, EngineQuery("image", tensor), client)
        scale = float(engine.model.logit_scale.detach().exp())
        logits = scale * label_vectors @ answer.vector
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        return {
            "template": template,
            "predictions": [{"label": names[i], "probability": float(probs[i])} for i in order],
        }


async def _label_vectors(served: Served, engine: IndexEngine, template: str, names: list[str], client: str):
    """(C, E) embeddings of ``template`` filled with each name: cached ones from the LRU, the rest
    encoded in batched queries (each label counts toward the client's share of the queue)."""
    keys = [(template, n) for n in names]
    found = engine.labels.get(keys)
    missing = [k for k in keys if k not in found]
    for i in range(0, len(missing), LABEL_CHUNK):  # one chunk per batch: searches keep flowing between them
        chunk = missing[i : i + LABEL_CHUNK]
        texts = [template.replace("<>", n) for _, n in chunk]
        answer = await served.ask(engine, EngineQuery("text", texts), client)
        fresh = dict(zip(chunk, answer.vector))
        engine.labels.put(fresh)
        found.update(fresh)
    return np.stack([found[k] for k in keys])


def clip_routes(app: FastAPI, served: Served) -> None:
    async def json_body(request: Request) -> Any:
        # whatever the Content-Type: clip-retrieval's client sends none, its front end text/plain (the Guard
        # refuses those from origins not on --cors-origin)
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise QueryError("the body is not valid JSON") from None

    @app.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        cfg, client = served.cfg, client_of(request)
        req = parse_knn(await json_body(request), cfg.knn, cfg.fetch)
        engine = served.engine(req.indice_name)
        modality = engine.searcher.index.header["modality"]
        if req.modality not in ("image", modality):
            raise QueryError(
                f"index {engine.name!r} holds {modality} embeddings; modality {req.modality!r} has no index here"
            )
        dedup, k = NEAR_DUPLICATE if req.deduplicate else None, min(req.num_result_ids, engine.ntotal)
        if req.text is not None:
            query = EngineQuery("text", engine.searcher.check_text([req.text])[0], k, dedup)
        elif req.embedding is not None:
            query = EngineQuery("vector", as_vector(req.embedding, engine.dim), k, dedup)
        else:
            data = req.image if req.image is not None else await _fetch(served, req.image_url)
            tensor = (await served.images(engine, [data], cfg.max_image_pixels, client))[0]
            query = EngineQuery("image", tensor, k, dedup)
        answer = await served.ask(engine, query, client)
        ids, scores = answer.ids, answer.scores
        meta = await anyio.to_thread.run_sync(served.clip_metadata, engine, ids[: req.num_images])
        return FastJSON(result_list(ids, scores, req.num_images, meta))

    @app.post("/metadata")
    async def metadata(request: Request) -> JSONResponse:
        body = await json_body(request)
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise QueryError("ids must be a list of integers")
        if len(ids) > served.cfg.max_metadata_ids:
            raise QueryError(f"at most {served.cfg.max_metadata_ids} ids a call, got {len(ids)}")
        if not ids:
            return JSONResponse([])
        engine = served.engine(body.get("indice_name"))
        bad = [i for i in ids if not 0 <= i < engine.ntotal]
        if bad:
            raise QueryError(f"no item {bad[0]} in index {engine.name!r} (it holds {engine.ntotal})")
        meta = await anyio.to_thread.run_sync(served.clip_metadata, engine, ids)
        return FastJSON([{"id": i, "metadata": m} for i, m in zip(ids, meta)])

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        return list(served.engines)


async def _fetch(served: Served, url: str) -> bytes:
    """``image_url``'s bytes by the SSRF-safe fetcher, on its own small thread limiter; the client learns
    only that it failed (the reason, which could map the server's network, goes to the log)."""
    try:
        return await anyio.to_thread.run_sync(fetch, url, served.cfg.fetch, limiter=served.fetch_limiter)
    except FetchError as exc:
        log.warning("image_url fetch refused or failed: %s", exc)
        raise QueryError("could not fetch image_url") from None
