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

import base64
import contextlib
import gc
import hashlib
import hmac
import logging
import re
import signal
import threading
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.cors import CORSMiddleware

from retrieval.errors import QueryError
from retrieval.jobs.search import Searcher
from retrieval.serve.connections import protocol_class
from retrieval.serve.guards import Access, Guard, session_cookie
from retrieval.serve.routes import clip_routes, search_routes
from retrieval.serve.served import ServeConfig, Served, body_cap, check_config, served_hosts  # noqa: F401 (part of this module's surface)
from retrieval.serve.uploads import Busy

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


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
