"""The search service: an HTTP API (FastAPI), a small web page, and clip-retrieval's protocol, over one
or more indexes (``retrieval serve photos=INDEX_A clips=INDEX_B``), each with its own model.

    GET  /                        the page: query box, results grid, zero-shot classification of an upload
    GET  /search?q=...&k=10       text -> items      POST /search {"queries"|"images"|"embeddings": [...], "k"}
    POST /classify                multipart: image, labels (comma/newline separated), template
    GET  /thumb/{id}              the item's JPEG thumbnail (only items of the index: ids, never paths)
    POST /knn-service             clip-retrieval's query (``clip_protocol``); POST /metadata; GET /indices-list
    GET  /health, /info, /metrics (Prometheus), /docs (OpenAPI)
    (every route takes ``index=NAME``, default the first; clip-retrieval's routes take ``indice_name``)

Under load: queries from all requests are micro-batched per index (``engine``, ``batcher``); the event
loop only awaits; images are decoded on a small thread pool; a full queue answers 503 with
Retry-After at once; bodies are capped before they are read (``guards``). Responses never carry a
command line, a credential or an absolute server path: a hit's ``source`` goes through
``public_source`` and ``/info`` leaves out the checkpoint path. Bad input is a 4xx with a ``detail``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import Body, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from retrieval.batcher import BatchConfig, Overloaded
from retrieval.clip_protocol import DEDUP_THRESHOLD, KnnLimits, parse_knn, result_list
from retrieval.engine import Answer, Engines, IndexEngine
from retrieval.engine import Query as EngineQuery
from retrieval.guards import API_KEY_COOKIE, Guard, Metrics
from retrieval.redact import collection_root, public_source
from retrieval.search import QueryError, Searcher
from retrieval.uploads import Busy, CpuShare, Decoder

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LABEL_CHUNK = 32  # labels encoded per batch when /classify meets new ones


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 8 << 20  # an uploaded image (multipart /classify)
    max_json_bytes: int = 12 << 20  # a JSON body (a base64 image in /knn-service fits)
    max_labels: int = 200
    max_label_chars: int = 100
    max_image_pixels: int = 40_000_000
    batch: BatchConfig = field(default_factory=BatchConfig)
    request_timeout_s: float = 30.0  # a query not answered by then gets 503
    decode_workers: int = 1  # processes decoding uploaded images (at low priority, off the event loop)
    label_cache: int = 10_000  # label embeddings kept for /classify (LRU)
    knn: KnnLimits = field(default_factory=KnnLimits)
    api_key: str | None = None  # required on every route but /health when set
    insecure: bool = False  # allow a non-loopback host without an API key
    cors_origins: tuple[str, ...] = ()  # origins allowed to call us from a browser ("*": any)
    concurrency: int = 256  # uvicorn's limit: connections and tasks beyond it get 503 at once


class FastJSON(JSONResponse):
    """JSON rendered by orjson (~20x faster than the standard library for our hit lists)."""

    def render(self, content: Any) -> bytes:
        import orjson

        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# ---------------------------------------------------------------- input checks
def parse_labels(text: str, cfg: ServeConfig) -> list[str]:
    labels = [x.strip() for x in re.split(r"[,\n]", text) if x.strip()]
    if not labels:
        raise QueryError("give at least one label")
    if len(labels) > cfg.max_labels:
        raise QueryError(f"at most {cfg.max_labels} labels, got {len(labels)}")
    if any(len(x) > cfg.max_label_chars for x in labels):
        raise QueryError(f"labels are at most {cfg.max_label_chars} characters")
    return list(dict.fromkeys(labels))


def check_utf8(query_string: bytes) -> None:
    """Starlette decodes bad percent-escapes to U+FFFD silently; refuse them instead."""
    from urllib.parse import parse_qsl

    try:
        parse_qsl(query_string.decode("latin-1"), encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise QueryError("the query is not valid UTF-8") from None


def fetch_image(url: str, cfg: ServeConfig) -> bytes:
    """An allow-listed ``image_url`` (clip-retrieval's), with a time limit and the upload size cap."""
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "mmpretrain-retrieval"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (host checked against the allow-list)
            data = resp.read(cfg.max_upload_bytes + 1)
    except OSError as exc:
        raise QueryError(f"could not fetch image_url: {exc}") from None
    if len(data) > cfg.max_upload_bytes:
        raise QueryError(f"image_url's image is larger than {cfg.max_upload_bytes} bytes")
    return data


# ---------------------------------------------------------------- the served indexes
class Served:
    """The engines by name (the first is the default), their shared batcher, the config and the metrics.
    ``worker_thread=False``: the caller runs the batcher (``served.batcher.run()``), e.g. on the main thread."""

    def __init__(self, searchers: dict[str, Searcher], cfg: ServeConfig, *, worker_thread: bool = True):
        self.cfg, self.metrics = cfg, Metrics()
        self.engines = {name: IndexEngine(name, s, label_cache=cfg.label_cache) for name, s in searchers.items()}
        self.decoder = Decoder(cfg.decode_workers)
        self.cpu = CpuShare(self.decoder)
        self.queries = Engines(
            self.engines,
            cfg.batch,
            on_batch=self.metrics.on_batch,
            thread=worker_thread,
            before_batch=self.cpu.before,
            after_batch=self.cpu.after,
        )
        self.batcher = self.queries.batcher
        self.roots = {name: collection_root(s.index.meta.column("source").to_pylist()) for name, s in searchers.items()}
        self._shown: dict[str, dict[int, dict]] = {}  # index -> item id -> its public fields

    def engine(self, name: str | None) -> IndexEngine:
        if name is None:
            return next(iter(self.engines.values()))
        if name not in self.engines:
            raise QueryError(f"no index {name!r} (indexes: {', '.join(self.engines)})")
        return self.engines[name]

    async def ask(self, engine: IndexEngine, query: EngineQuery) -> Answer:
        """Submit to the engine's batcher and await the answer, off the event loop's CPU."""
        try:
            future = self.queries.submit(engine, query)
        except Overloaded as exc:
            self.metrics.refused.labels(engine.name, "queue_full").inc()
            raise Busy(str(exc), exc.retry_after) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            self.metrics.refused.labels(engine.name, "timeout").inc()
            raise Busy(f"no answer within {self.cfg.request_timeout_s:g} s", 5) from None

    async def image_tensor(self, engine: IndexEngine, data: bytes):
        """Decode and preprocess an uploaded image in the decoder process."""
        if engine.transform is None:
            raise QueryError(f"index {engine.name!r}: its model has no image tower")
        if not data:
            raise QueryError("empty upload")
        return await self.decoder(engine.transform, data, self.cfg.max_image_pixels)

    def hits_json(self, engine: IndexEngine, answer: Answer) -> list[dict]:
        """The hits as the API shows them (``Hit`` fields, public source, thumbnail URL); the per-item part
        is built once per item and kept (it runs on the event loop for every answer)."""
        shown, out = self._shown.setdefault(engine.name, {}), []
        for rank, (i, score) in enumerate(zip(answer.ids.tolist(), answer.scores.tolist())):
            item = shown.get(i)
            if item is None:
                meta = engine.searcher.item(i)
                item = shown[i] = {
                    "key": meta["key"],
                    "caption": meta["caption"],
                    "modality": meta["modality"],
                    "source": public_source(meta["source"], self.roots[engine.name]),
                    "thumbnail": f"/thumb/{i}?index={engine.name}",
                }
                if len(shown) > 100_000:
                    shown.clear()
            out.append({"rank": rank, "id": i, "score": score, **item})
        return out

    def clip_metadata(self, engine: IndexEngine, ids) -> list[dict]:
        """clip-retrieval's metadata of items: caption, key, url (for items from a URL), image (base64 JPEG)."""
        out, s, root = [], engine.searcher, self.roots[engine.name]
        for i in ids:
            item = s.item(int(i))
            meta = {"caption": item["caption"], "key": item["key"]}
            shown = public_source(item["source"], root)
            if shown.startswith(("http://", "https://")):
                meta["url"] = shown.rpartition("#")[0] if "#" in shown else shown
            thumb = s.thumbnail(int(i))
            if thumb:
                meta["image"] = base64.b64encode(thumb).decode("ascii")
            out.append(meta)
        return out

    def close(self) -> None:
        self.batcher.close()
        self.cpu.after()  # never leave a decoder stopped
        self.decoder.close()


def body_cap(cfg: ServeConfig, path: str) -> int:
    """The body cap of a route: uploads, JSON bodies, or a small default."""
    if path == "/classify":
        return cfg.max_upload_bytes + (64 << 10)  # the multipart envelope and the form fields
    if path in ("/search", "/knn-service", "/metadata"):
        return cfg.max_json_bytes
    return 64 << 10


# ---------------------------------------------------------------- the application
def create_app(
    searchers: Searcher | dict[str, Searcher], cfg: ServeConfig = ServeConfig(), *, worker_thread: bool = True
) -> FastAPI:
    """The FastAPI application serving ``searchers`` (one, or several by name). With
    ``worker_thread=False`` the caller runs ``app.state.served.batcher.run()`` (``serve`` does, on the
    main thread)."""
    if isinstance(searchers, Searcher):
        searchers = {Path(searchers.index.folder).name or "index": searchers}
    served = Served(searchers, cfg, worker_thread=worker_thread)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        served.close()

    app = FastAPI(title="mmpretrain search", version="2", description=__doc__, lifespan=lifespan)
    app.state.served = served
    app.add_middleware(Guard, metrics=served.metrics, body_cap=partial(body_cap, cfg), api_key=cfg.api_key)
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    _errors(app)
    _page_routes(app, served)
    _search_routes(app, served)
    _clip_routes(app, served)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    async def _bad_query(request: Request, exc: QueryError):
        return JSONResponse({"detail": str(exc), "message": str(exc)}, status_code=400)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return JSONResponse(
            {"detail": f"overloaded: {exc}", "message": f"overloaded: {exc}"},
            status_code=503,
            headers={"Retry-After": str(int(exc.retry_after))},
        )


def _page_routes(app: FastAPI, served: Served) -> None:
    page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index_page(api_key: str | None = Query(None, include_in_schema=False)) -> HTMLResponse:
        resp = HTMLResponse(page)
        if api_key and served.cfg.api_key:  # the Guard checked it: keep it for the page's own requests
            resp.set_cookie(API_KEY_COOKIE, api_key, httponly=True, samesite="strict")
        return resp

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "ntotal": next(iter(served.engines.values())).ntotal}

    @app.get("/info")
    async def info(index: str | None = None) -> dict:
        engine = served.engine(index)
        out = {k: v for k, v in engine.searcher.info().items() if k != "model"}  # "model" is a server path
        return {"name": engine.name, **out, "indexes": list(served.engines)}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        served.metrics.queue_depth.set(served.batcher.depth())
        for name, engine in served.engines.items():
            served.metrics.items.labels(name).set(engine.ntotal)
        return Response(served.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/thumb/{item}")
    def thumb(item: int, index: str | None = None) -> Response:  # file I/O: runs on the thread pool
        engine = served.engine(index)
        if not 0 <= item < engine.ntotal:
            raise HTTPException(404, f"no item {item} in the index")
        data = engine.searcher.thumbnail(item)
        if not data:
            raise HTTPException(404, "no thumbnail stored for this item")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})


def _search_routes(app: FastAPI, served: Served) -> None:
    async def run(engine: IndexEngine, queries: list[EngineQuery]) -> list[Answer]:
        return list(await asyncio.gather(*(served.ask(engine, q) for q in queries)))

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
        answer = (await run(engine, [EngineQuery("text", text, k)]))[0]
        return FastJSON(
            {
                "query": q,
                "k": k,
                "index": engine.name,
                "ms": 1000 * (time.perf_counter() - start),
                "results": served.hits_json(engine, answer),
            }
        )

    @app.post("/search", response_class=FastJSON)
    async def search_post(
        queries: list[str] | None = Body(None, embed=True),
        images: list[str] | None = Body(None, embed=True, description="base64 images"),
        embeddings: list[list[float]] | None = Body(None, embed=True),
        k: int = Body(10, embed=True),
        index: str | None = Body(None, embed=True),
        deduplicate: bool = Body(False, embed=True),
    ) -> FastJSON:
        engine, start = served.engine(index), time.perf_counter()
        k, dedup = engine.searcher.check_k(k), DEDUP_THRESHOLD if deduplicate else None
        given = [x for x in (queries, images, embeddings) if x is not None]
        if len(given) != 1 or not given[0]:
            raise QueryError("give one non-empty list: queries (texts), images (base64) or embeddings")
        if len(given[0]) > engine.searcher.limits.max_batch:
            raise QueryError(f"at most {engine.searcher.limits.max_batch} queries a call, got {len(given[0])}")
        if queries is not None:
            batch = [EngineQuery("text", t, k, dedup) for t in engine.searcher.check_text(queries)]
        elif images is not None:
            batch = [EngineQuery("image", await served.image_tensor(engine, _b64(x)), k, dedup) for x in images]
        else:
            batch = [EngineQuery("vector", _vector(v, engine.dim), k, dedup) for v in embeddings]
        answers = await run(engine, batch)
        return FastJSON(
            {
                "k": k,
                "index": engine.name,
                "queries": queries,
                "ms": 1000 * (time.perf_counter() - start),
                "results": [served.hits_json(engine, a) for a in answers],
            }
        )

    @app.post("/classify")
    async def classify(
        image: UploadFile = File(...),
        labels: str = Form(...),
        template: str = Form("a photo of a <>"),
        index: str = Form(None),
    ) -> dict:
        engine, cfg = served.engine(index), served.cfg
        data = await image.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {cfg.max_upload_bytes} bytes")
        names = parse_labels(labels, cfg)
        if "<>" not in template or len(template) > 200:
            raise QueryError("the template must contain <> (the label's place) and be at most 200 characters")
        tensor = await served.image_tensor(engine, data)
        label_vectors = await _label_vectors(served, engine, template, names)
        answer = await served.ask(engine, EngineQuery("image", tensor))
        scale = float(engine.model.logit_scale.detach().exp())
        logits = scale * label_vectors @ answer.vector
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        return {
            "template": template,
            "predictions": [{"label": names[i], "probability": float(probs[i])} for i in order],
        }


async def _label_vectors(served: Served, engine: IndexEngine, template: str, names: list[str]) -> np.ndarray:
    """(C, E) embeddings of ``template`` filled with each name: cached ones from the LRU, the rest
    encoded in one batched query."""
    keys = [(template, n) for n in names]
    found = engine.labels.get(keys)
    missing = [k for k in keys if k not in found]
    for i in range(0, len(missing), LABEL_CHUNK):  # one chunk per batch: searches keep flowing between them
        chunk = missing[i : i + LABEL_CHUNK]
        answer = await served.ask(engine, EngineQuery("text", [template.replace("<>", n) for _, n in chunk]))
        fresh = dict(zip(chunk, answer.vector))
        engine.labels.put(fresh)
        found.update(fresh)
    return np.stack([found[k] for k in keys])


def _clip_routes(app: FastAPI, served: Served) -> None:
    async def json_body(request: Request) -> Any:
        raw = await request.body()  # whatever the Content-Type: clip-retrieval's clients send none or text/plain
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise QueryError("the body is not valid JSON") from None

    @app.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        cfg = served.cfg
        req = parse_knn(await json_body(request), cfg.knn)
        engine = served.engine(req.indice_name)
        if req.modality not in ("image", engine.searcher.index.header["modality"]):
            raise QueryError(
                f"index {engine.name!r} holds {engine.searcher.index.header['modality']} embeddings; "
                f"modality {req.modality!r} has no index here"
            )
        dedup = DEDUP_THRESHOLD if req.deduplicate else None
        if req.text is not None:
            query = EngineQuery("text", engine.searcher.check_text([req.text])[0], req.num_result_ids, dedup)
        elif req.embedding is not None:
            query = EngineQuery("vector", _vector(req.embedding, engine.dim), req.num_result_ids, dedup)
        else:
            data = (
                req.image if req.image is not None else await anyio.to_thread.run_sync(fetch_image, req.image_url, cfg)
            )
            query = EngineQuery("image", await served.image_tensor(engine, data), req.num_result_ids, dedup)
        answer = await served.ask(engine, query)
        ids, scores = answer.ids, answer.scores
        meta = await anyio.to_thread.run_sync(served.clip_metadata, engine, ids[: req.num_images])
        return FastJSON(result_list(ids, scores, req.num_images, meta))

    @app.post("/metadata")
    async def metadata(request: Request) -> JSONResponse:
        body = await json_body(request)
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise QueryError("ids must be a list of integers")
        if len(ids) > served.cfg.knn.max_result_ids:
            raise QueryError(f"at most {served.cfg.knn.max_result_ids} ids a call")
        if not ids:
            return JSONResponse([])
        engine = served.engine(body.get("indice_name"))
        bad = [i for i in ids if not 0 <= i < engine.ntotal]
        if bad:
            raise QueryError(f"no item {bad[0]} in index {engine.name!r} (it holds {engine.ntotal})")
        meta = await anyio.to_thread.run_sync(served.clip_metadata, engine, ids)
        return JSONResponse([{"id": i, "metadata": m} for i, m in zip(ids, meta)])

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        return list(served.engines)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (ValueError, TypeError):
        raise QueryError("an image is not valid base64") from None


def _vector(values, dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.shape != (dim,) or not np.isfinite(v).all():
        raise QueryError(f"an embedding must be {dim} finite numbers, got shape {tuple(v.shape)}")
    return v


def serve(searchers: Searcher | dict[str, Searcher], cfg: ServeConfig) -> None:
    """Run the service (blocking): uvicorn's event loop on a thread, the query batcher on this (main)
    thread, where torch computes fastest. SIGINT/SIGTERM stop both. A non-loopback host needs an API key
    or ``insecure``."""
    import gc
    import signal
    import threading

    import uvicorn

    if cfg.host not in LOOPBACK and not cfg.api_key:
        if not cfg.insecure:
            raise QueryError(
                f"serving on {cfg.host} (reachable from other machines) needs --api-key KEY, or "
                "--insecure to serve without authentication"
            )
        log.warning("serving on %s without authentication (--insecure)", cfg.host)
    app = create_app(searchers, cfg, worker_thread=False)
    gc.collect()
    gc.freeze()  # the models' and indexes' objects never die: keep them out of every later collection
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="info",
            access_log=False,
            limit_concurrency=cfg.concurrency,
            timeout_keep_alive=5,
        )
    )
    batcher = app.state.served.batcher

    def stop(signum=None, frame=None) -> None:
        server.should_exit = True
        batcher.close()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    loop = threading.Thread(target=server.run, name="http", daemon=True)
    loop.start()
    watcher = threading.Thread(target=lambda: (loop.join(), batcher.close()), daemon=True)
    watcher.start()  # the server ending on its own (a bind error) ends the batcher too
    batcher.run()
    server.should_exit = True
    loop.join(timeout=10)
