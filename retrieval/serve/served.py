"""What the service serves: its config (``ServeConfig``, checked by ``check_config``), the indexes' engines
with their shared batcher, decoder and metrics (``Served``), and each route's body cap."""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass, field

import anyio

from retrieval.errors import QueryError
from retrieval.jobs.search import Searcher
from retrieval.options import option, parse_bytes, show_bytes
from retrieval.serve.batcher import BatchConfig, ClientOverloaded, Overloaded
from retrieval.serve.connections import ConnectionLimits
from retrieval.serve.engine import Answer, Engines, IndexEngine
from retrieval.serve.engine import Query as EngineQuery
from retrieval.serve.fetch import FetchPolicy
from retrieval.serve.guards import MIN_KEY_CHARS, Metrics
from retrieval.serve.protocol import KnnLimits
from retrieval.serve.redact import collection_root, public_source
from retrieval.serve.uploads import Busy, CpuShare, Decoder

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServeConfig:
    host: str = option("127.0.0.1", help="address to bind (any other than loopback needs an API key)")
    port: int = option(8000, help="port")
    max_upload_bytes: int = option(
        8 << 20,
        help="an uploaded image's size limit (/classify)",
        flag="--max-upload",
        parse=parse_bytes,
        show=show_bytes,
    )
    max_json_bytes: int = 12 << 20  # a JSON body (a base64 image in /knn-service fits)
    max_labels: int = 200
    max_label_chars: int = 100
    max_image_pixels: int = 40_000_000  # one image (from its header, before decoding)
    max_images: int = 16  # images per POST /search
    max_request_pixels: int = 64_000_000  # all images of one POST /search (each gets its share)
    max_metadata_ids: int = 500  # ids per /metadata call
    max_response_bytes: int = 16 << 20  # thumbnails in one /knn-service or /metadata answer
    batch: BatchConfig = field(default_factory=BatchConfig)
    request_timeout_s: float = option(30.0, help="seconds a query may wait for its answer (then 503)", flag="--timeout")
    decode_workers: int = 1  # processes decoding uploaded images (at low priority, off the event loop)
    decode_memory_mb: int = 1024  # address space a decoder may add to its own (more: 400)
    label_cache: int = 10_000  # label embeddings kept for /classify (LRU)
    knn: KnnLimits = field(default_factory=KnnLimits)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # /knn-service image_url (no hosts: refused)
    api_key: str | None = None  # required on every route but /health, / and /login when set
    insecure: bool = option(
        False, help="allow a non-loopback --host, --cors-origin '*' and proxied (forwarded) requests without an API key"
    )
    cors_origins: tuple[str, ...] = option(
        (),
        help="allow browsers on ORIGIN (e.g. clip-retrieval's front end; '*' for any, needs a key) to call the API",
        flag="--cors-origin",
        metavar="ORIGIN",
    )
    allowed_hosts: tuple[str, ...] = option(
        (),
        help="a Host header name clients use (besides loopback's and --host's; '*': any); DNS rebinding defence",
        flag="--allowed-host",
        metavar="NAME",
    )
    docs: bool = option(False, help="serve /docs and /openapi.json (Swagger loads JS from a CDN into the key's origin)")
    concurrency: int = option(256, help="requests in flight before 503")
    per_client: int = option(32, help="requests in flight from one address before 429")
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
