"""The search service: an HTTP API (FastAPI) and a small web page over one index.

    GET  /                      the page: query box, results grid, zero-shot classification of an upload
    GET  /search?q=...&k=10     text -> items                     POST /search {"queries": [...], "k": 10}
    POST /classify              multipart: image, labels (comma/newline separated), template
    GET  /thumb/{id}            the item's JPEG thumbnail (only items of the index: ids, never paths)
    GET  /health, /info, /docs (OpenAPI)

Responses never carry a command line, a credential or an absolute server path: a hit's ``source``
is shown by ``public_source`` and ``/info`` leaves out the checkpoint path.

Bad input is a 4xx with a ``detail`` message (empty or over-long query, k out of range, too many
labels, an upload that is too large or not an image), never a crash of the server.
"""
from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from mmpretrain import api
from retrieval.search import QueryError, Searcher

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 8 << 20
    max_labels: int = 200
    max_label_chars: int = 100
    max_image_pixels: int = 40_000_000


def parse_labels(text: str, cfg: ServeConfig) -> list[str]:
    labels = [x.strip() for x in re.split(r"[,\n]", text) if x.strip()]
    if not labels:
        raise QueryError("give at least one label")
    if len(labels) > cfg.max_labels:
        raise QueryError(f"at most {cfg.max_labels} labels, got {len(labels)}")
    if any(len(x) > cfg.max_label_chars for x in labels):
        raise QueryError(f"labels are at most {cfg.max_label_chars} characters")
    return list(dict.fromkeys(labels))


def read_image(data: bytes, cfg: ServeConfig):
    """Decode an upload (JPEG/PNG/WEBP/BMP/GIF only), refusing non-images and decompression bombs."""
    if not data:
        raise QueryError("empty upload")
    try:
        return api.open_image(data, max_pixels=cfg.max_image_pixels)
    except api.ImageTooLarge as exc:
        raise QueryError(f"image of {exc}") from None
    except ValueError:  # not an image we decode
        raise QueryError("the upload is not a readable image (JPEG, PNG, WEBP, BMP or GIF)") from None


def check_utf8(query_string: bytes) -> None:
    """Starlette decodes bad percent-escapes to U+FFFD silently; refuse them instead."""
    from urllib.parse import parse_qsl

    try:
        parse_qsl(query_string.decode("latin-1"), encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise QueryError("the query is not valid UTF-8") from None


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def public_url(url: str) -> str:
    """``scheme://host[:port]/path`` of a URL: no user, password, query (signatures, tokens) or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def public_source(source: str, root: str | None) -> str:
    """What HTTP may show of an item's source: never a command line, a credential or an absolute
    server path. A ``pipe:`` command shows only the URL it fetches (or the file name); a URL loses
    its user, password and query; a local path is shown relative to the collection ``root`` (else by
    its file name). Our ``#key`` suffix is kept."""
    body, hash_, key = source.rpartition("#") if "#" in source else (source, "", "")
    if body.startswith("pipe:"):
        urls = URL.findall(body)
        shown = public_url(urls[-1]) if urls else PurePosixPath(body.split()[-1].strip("'\"")).name
    elif URL.fullmatch(body):
        shown = public_url(body)
    else:
        path = PurePosixPath(body)
        rel = _relative(path, root) if path.is_absolute() else (path if ".." not in path.parts else None)
        shown = str(rel) if rel is not None else path.name
    return shown + hash_ + key


def _relative(path: PurePosixPath, root: str | None) -> PurePosixPath | None:
    try:
        return path.relative_to(root) if root else None
    except ValueError:
        return None


def collection_root(sources: list[str]) -> str | None:
    """The deepest folder holding every local absolute source (shards or image files)."""
    folders = {str(PurePosixPath(s.rpartition("#")[0] or s).parent) for s in sources
               if s.startswith("/") and not URL.match(s)}
    return os.path.commonpath(sorted(folders)) if folders else None


def hit_json(hit, root: str | None = None) -> dict:
    return {**hit.to_dict(), "source": public_source(hit.source, root), "thumbnail": f"/thumb/{hit.id}"}


def create_app(searcher: Searcher, cfg: ServeConfig = ServeConfig()):
    """The FastAPI application serving ``searcher``."""
    app = FastAPI(title="mmpretrain search", version="1", description=__doc__)
    lock = threading.Lock()  # torch encoding is not re-entrant across threads on every backend
    root = collection_root(searcher.index.meta.column("source").to_pylist())

    @app.exception_handler(QueryError)
    async def _bad_query(request: Request, exc: QueryError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "ntotal": searcher.index.ntotal}

    @app.get("/info")
    def info() -> dict:
        return {k: v for k, v in searcher.info().items() if k != "model"}  # "model" is a server path

    def run(queries: list[str], k: int) -> dict:
        start = time.perf_counter()
        with lock:
            hits = searcher.search(queries, k)
        return {"k": k, "ms": 1000 * (time.perf_counter() - start),
                "results": [[hit_json(h, root) for h in row] for row in hits]}

    @app.get("/search")
    def search_get(request: Request, q: str = Query(..., description="the text query"), k: int = Query(10)) -> dict:
        check_utf8(request.scope.get("query_string", b""))
        out = run([q], k)
        return {**out, "query": q, "results": out["results"][0]}

    @app.post("/search")
    def search_post(queries: list[str] = Body(..., embed=True), k: int = Body(10, embed=True)) -> dict:
        return {**run(queries, k), "queries": queries}

    @app.post("/classify")
    async def classify(image: UploadFile = File(...), labels: str = Form(...),
                       template: str = Form("a photo of a <>")) -> dict:
        data = await image.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {cfg.max_upload_bytes} bytes")
        names = parse_labels(labels, cfg)
        if "<>" not in template or len(template) > 200:
            raise QueryError("the template must contain <> (the label's place) and be at most 200 characters")
        img = read_image(data, cfg)
        with lock:
            preds = api.zero_shot(template, names, model=searcher.model, progress=False).predict([img], k=len(names))
        return {"template": template, "predictions": [{"label": c, "probability": p} for c, p in preds[0]]}

    @app.get("/thumb/{item}")
    def thumb(item: int) -> Response:
        if not 0 <= item < searcher.index.ntotal:
            raise HTTPException(404, f"no item {item} in the index")
        data = searcher.thumbnail(item)
        if not data:
            raise HTTPException(404, "no thumbnail stored for this item")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    return app


def serve(searcher: Searcher, cfg: ServeConfig) -> None:
    """Run the service with uvicorn (blocking)."""
    import uvicorn

    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the service has no authentication; put it behind a proxy you trust", cfg.host)
    uvicorn.run(create_app(searcher, cfg), host=cfg.host, port=cfg.port, log_level="info")
