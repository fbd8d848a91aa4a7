"""The search service: an HTTP API (FastAPI), a small web page, and clip-retrieval's protocol, over one
or more indexes (``retrieval serve photos=INDEX_A clips=INDEX_B``), each with its own model.

    GET  /                        the page: query box, results grid, zero-shot classification of an upload
    POST /login                   the page's key form: sets a session cookie (an HMAC of the key)
    GET  /search?q=...&k=10       text -> items      POST /search {"queries"|"images"|"embeddings": [...], "k"}
    POST /classify                multipart: image, labels (comma/newline separated), template (one <>)
    GET  /thumb/{id}              the item's JPEG thumbnail (only items of the index: ids, never paths)
    POST /knn-service             clip-retrieval's query (``clip_protocol``); POST /metadata; GET /indices-list
    GET  /health, /info, /metrics (Prometheus); /docs (OpenAPI) only with ``docs``
    (every route takes ``index=NAME``, default the first; clip-retrieval's routes take ``indice_name``)

Under load: queries from all requests are micro-batched per index (``engine``, ``batcher``), fairly
across clients; the event loop only awaits; images are decoded in a capped, recycled process; a full
queue answers 503 with Retry-After at once, a client over its share 429. Before any route runs,
``connections`` bounds what a connection may cost (header and body deadlines, connections per
client) and ``guards`` what a request may (Host, origin, key, body caps, requests in flight). Responses
never carry a command line, a credential or an absolute server path: a hit's ``source`` goes through
``public_source`` and ``/info`` leaves out the checkpoint path. Bad input is a 4xx with a ``detail``.
docs/security.md has the threat model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import logging
import re
import signal
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from retrieval.batcher import BatchConfig, ClientOverloaded, Overloaded
from retrieval.clip_protocol import KnnLimits
from retrieval.connections import ConnectionLimits, protocol_class
from retrieval.engine import Answer, Engines, IndexEngine
from retrieval.engine import Query as EngineQuery
from retrieval.fetch import FetchPolicy
from retrieval.guards import MIN_KEY_CHARS, Access, Guard, Metrics, session_cookie
from retrieval.redact import collection_root, public_source
from retrieval.routes import clip_routes, search_routes
from retrieval.search import QueryError, Searcher
from retrieval.uploads import Busy, CpuShare, Decoder

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 8 << 20  # an uploaded image (multipart /classify)
    max_json_bytes: int = 12 << 20  # a JSON body (a base64 image in /knn-service fits)
    max_labels: int = 200
    max_label_chars: int = 100
    max_image_pixels: int = 40_000_000  # one image (from its header, before decoding)
    max_images: int = 16  # images per POST /search
    max_request_pixels: int = 64_000_000  # all images of one POST /search (each gets its share)
    max_metadata_ids: int = 500  # ids per /metadata call
    max_response_bytes: int = 16 << 20  # thumbnails in one /knn-service or /metadata answer
    batch: BatchConfig = field(default_factory=BatchConfig)
    request_timeout_s: float = 30.0  # a query not answered by then gets 503
    decode_workers: int = 1  # processes decoding uploaded images (at low priority, off the event loop)
    decode_memory_mb: int = 1024  # address space a decoder may add to its own (more: 400)
    label_cache: int = 10_000  # label embeddings kept for /classify (LRU)
    knn: KnnLimits = field(default_factory=KnnLimits)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # /knn-service image_url (no hosts: refused)
    api_key: str | None = None  # required on every route but /health, / and /login when set
    insecure: bool = False  # allow a public host without an API key, CORS '*' and forwarded requests without one
    cors_origins: tuple[str, ...] = ()  # origins allowed to call us from a browser ("*": any, needs a key)
    allowed_hosts: tuple[str, ...] = ()  # Host header names served beyond loopback's and --host's ("*": any)
    docs: bool = False  # /docs and /openapi.json (Swagger's JS comes from a CDN into the key's origin)
    concurrency: int = 256  # requests in flight before 503
    per_client: int = 32  # requests in flight from one client address before 429
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


def check_config(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` if it is safe to serve (else ``QueryError`` saying what to change)."""
    if cfg.api_key is not None and len(cfg.api_key) < MIN_KEY_CHARS:
        raise QueryError(f"an API key must have at least {MIN_KEY_CHARS} characters (e.g. `openssl rand -hex 16`)")
    public = cfg.host not in LOOPBACK
    if not cfg.api_key and not cfg.insecure:
        if public:
            raise QueryError(
                f"serving on {cfg.host} (reachable from other machines) needs an API key (--api-key-file or "
                "RETRIEVAL_API_KEY), or --insecure to serve without authentication"
            )
        if "*" in cfg.cors_origins:
            raise QueryError(
                "--cors-origin '*' lets every web page use this server: it needs an API key, or --insecure"
            )
    if public and not cfg.api_key:
        log.warning("serving on %s without authentication (--insecure)", cfg.host)
    return cfg


def served_hosts(cfg: ServeConfig) -> frozenset[str] | None:
    """The Host header names to serve (None: any): loopback's, ``host``'s and ``allowed_hosts``. A wildcard
    bind with no ``allowed_hosts`` serves any name only with a key (or ``insecure``)."""
    if "*" in cfg.allowed_hosts:
        return None
    if cfg.host in WILDCARD and not cfg.allowed_hosts:
        if cfg.api_key or cfg.insecure:
            return None
        raise QueryError(f"serving on {cfg.host!r}: name the hosts clients use with --allowed-host NAME")
    names = {*LOOPBACK, *(h.lower().strip("[]") for h in cfg.allowed_hosts)}
    if cfg.host not in WILDCARD:
        names.add(cfg.host.lower().strip("[]"))
    return frozenset(names)


# ---------------------------------------------------------------- the served indexes
class Served:
    """The engines by name (the first is the default), their shared batcher, the config and the metrics.
    ``worker_thread=False``: the caller runs the batcher (``served.batcher.run()``), e.g. on the main thread."""

    def __init__(self, searchers: dict[str, Searcher], cfg: ServeConfig, *, worker_thread: bool = True):
        self.cfg, self.metrics = cfg, Metrics()
        self.engines = {name: IndexEngine(name, s, label_cache=cfg.label_cache) for name, s in searchers.items()}
        self.decoder = Decoder(cfg.decode_workers, memory_mb=cfg.decode_memory_mb)
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
        self._fetch_limiter = None

    @property
    def fetch_limiter(self) -> anyio.CapacityLimiter:
        """image_url fetches' own threads (made on the event loop): a slow host never starves /thumb."""
        if self._fetch_limiter is None:
            self._fetch_limiter = anyio.CapacityLimiter(4)
        return self._fetch_limiter

    def engine(self, name) -> IndexEngine:
        if name is None:
            return next(iter(self.engines.values()))
        if not isinstance(name, str) or name not in self.engines:
            raise QueryError(f"no index {str(name)[:100]!r} (indexes: {', '.join(self.engines)})")
        return self.engines[name]

    async def ask(self, engine: IndexEngine, query: EngineQuery, client: str = "") -> Answer:
        """Submit to the engine's batcher (counted against ``client``) and await the answer, off the event
        loop's CPU."""
        try:
            future = self.queries.submit(engine, query, client)
        except Overloaded as exc:
            reason = "client_share" if isinstance(exc, ClientOverloaded) else "queue_full"
            self.metrics.refused.labels(engine.name, reason).inc()
            raise Busy(str(exc), exc.retry_after, status=429 if reason == "client_share" else 503) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            self.metrics.refused.labels(engine.name, "timeout").inc()
            raise Busy(f"no answer within {self.cfg.request_timeout_s:g} s", 5) from None

    async def images(self, engine: IndexEngine, uploads: list[bytes], max_pixels: int, client: str = "") -> list:
        """Decode and preprocess uploaded images in the decoder process, one after another, all within
        the request's deadline (counted against ``client``'s share of the decoder)."""
        if engine.transform is None:
            raise QueryError(f"index {engine.name!r}: its model has no image tower")
        if not all(uploads):
            raise QueryError("empty upload")

        async def decode_all() -> list:
            return [await self.decoder(engine.transform, data, max_pixels, client) for data in uploads]

        try:
            return await asyncio.wait_for(decode_all(), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise Busy(f"images not decoded within {self.cfg.request_timeout_s:g} s", 5) from None

    def early_refusal(self, path: str, client: str) -> tuple[int, str, dict, str] | None:
        """An upload route refused from its headers when the decoder would refuse it anyway: its body
        (a multipart form, parsed on the event loop) is never read."""
        busy = self.decoder.refusal(client) if path == "/classify" else None
        if busy is None:
            return None
        return busy.status, str(busy), {"retry-after": str(int(busy.retry_after))}, "decoder"

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
        """clip-retrieval's metadata of items: caption, key, url (for items from a URL), image (base64 JPEG);
        thumbnails stop once the answer holds ``max_response_bytes`` of them."""
        out, s, root, budget = [], engine.searcher, self.roots[engine.name], self.cfg.max_response_bytes
        for i in ids:
            item = s.item(int(i))
            meta = {"caption": item["caption"], "key": item["key"]}
            shown = public_source(item["source"], root)
            if shown.startswith(("http://", "https://")):
                meta["url"] = shown.rpartition("#")[0] if "#" in shown else shown
            thumb = s.thumbnail(int(i)) if budget > 0 else b""
            if thumb:
                meta["image"] = base64.b64encode(thumb).decode("ascii")
                budget -= len(meta["image"])
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
    main thread). ``QueryError`` if ``cfg`` is unsafe (``check_config``)."""
    check_config(cfg)
    if isinstance(searchers, Searcher):
        searchers = {Path(searchers.index.folder).name or "index": searchers}
    served = Served(searchers, cfg, worker_thread=worker_thread)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        served.close()

    docs = ("/docs", "/openapi.json", "/docs/oauth2-redirect") if cfg.docs else ()
    app = FastAPI(
        title="mmpretrain search",
        version="2",
        description=__doc__,
        lifespan=lifespan,
        docs_url="/docs" if cfg.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if cfg.docs else None,
    )
    app.state.served = served
    access = Access(
        api_key=cfg.api_key,
        hosts=served_hosts(cfg),
        cors_origins=cfg.cors_origins,
        insecure=cfg.insecure,
        concurrency=cfg.concurrency,
        per_client=cfg.per_client,
        docs_paths=docs,
        early=served.early_refusal,
    )
    app.add_middleware(Guard, metrics=served.metrics, body_cap=partial(body_cap, cfg), access=access)
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    _errors(app)
    _page_routes(app, served)
    search_routes(app, served)
    clip_routes(app, served)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    async def _bad_query(request: Request, exc: QueryError):
        return JSONResponse({"detail": str(exc), "message": str(exc)}, status_code=400)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        detail = f"overloaded: {exc}" if exc.status == 503 else str(exc)
        return JSONResponse(
            {"detail": detail, "message": detail},
            status_code=exc.status,
            headers={"Retry-After": str(int(exc.retry_after)), "Connection": "close"},
        )


def page_csp(page: str) -> str:
    """The page's Content-Security-Policy: its own inline script and style (by hash), images from here."""
    digest = lambda text: base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()  # noqa: E731
    scripts = " ".join(f"'sha256-{digest(x)}'" for x in re.findall(r"<script>(.*?)</script>", page, re.S))
    styles = " ".join(f"'sha256-{digest(x)}'" for x in re.findall(r"<style>(.*?)</style>", page, re.S))
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def _page_routes(app: FastAPI, served: Served) -> None:
    page = PAGE.read_text()
    csp = page_csp(page)

    @app.get("/", response_class=HTMLResponse)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.post("/login")
    async def login(request: Request) -> Response:
        """The page's key form (``key=...``, urlencoded): a session cookie holding an HMAC of the key."""
        key = served.cfg.api_key
        given = dict(parse_qsl((await request.body()).decode("utf-8", "replace"))).get("key", "")
        if not key:
            return RedirectResponse("/", status_code=303)
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, "wrong API key", headers={"Connection": "close"})
        resp = RedirectResponse("/", status_code=303)
        resp.headers.append("set-cookie", session_cookie(key, request.url.scheme))
        return resp

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}  # nothing about the index: /health needs no key

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
        # private: a shared cache must not hand a keyed server's images to others
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


def uvicorn_config(app: FastAPI, cfg: ServeConfig) -> uvicorn.Config:
    """uvicorn's config for ``app``: our connection-guarding protocol (deadlines, connection caps) and
    no connection-counting concurrency limit (the ``Guard`` counts requests in flight)."""
    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        access_log=False,
        http=protocol_class(cfg.connections),
        limit_concurrency=None,
        timeout_keep_alive=5,
    )


def serve(searchers: Searcher | dict[str, Searcher], cfg: ServeConfig) -> None:
    """Run the service (blocking): uvicorn's event loop on a thread, the query batcher on this (main)
    thread, where torch computes fastest. SIGINT/SIGTERM stop both. ``check_config`` says what a
    public host needs."""
    app = create_app(searchers, cfg, worker_thread=False)
    gc.collect()
    gc.freeze()  # the models' and indexes' objects never die: keep them out of every later collection
    server = uvicorn.Server(uvicorn_config(app, cfg))
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
