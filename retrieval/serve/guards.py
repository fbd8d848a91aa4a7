"""What stands in front of the routes, as pure ASGI middleware (nothing here reads a body it refuses).

``Guard``, in this order, each refusal answered at once with ``connection: close``:

1. the ``Host`` header must name this server (400): a DNS-rebinding page cannot read a loopback service;
2. forwarded headers (a reverse proxy in front) need an API key, or ``insecure`` (403): a same-host
   proxy would otherwise publish a key-less loopback service to the world;
3. a POST carrying an ``Origin`` must come from the page itself or an origin on ``cors_origins`` (403):
   browsers send simple (text/plain, form) cross-origin POSTs without asking first;
4. the API key (401), from ``Authorization: Bearer``, ``X-API-Key``, the page's session cookie (an HMAC
   of the key, never the key) or, only on clip-retrieval's routes, ``?api_key=``; not on ``/health``,
   ``/`` (the static page) and ``/login``;
5. bodies capped before they are read (413 from ``Content-Length``; a body without one is counted as
   it streams and cut off at the cap);
6. requests in flight: ``concurrency`` in all (503) and ``per_client`` from one address (429); idle
   connections do not count (``connections`` bounds those). ``/health`` is never refused here;
7. ``early(path, client)``: what the service would refuse anyway (an upload when the decoder is full),
   refused before its body is read.

Every response gets ``nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and, unless
the route set one, a deny-all Content-Security-Policy. Per request: metrics and a JSON access-log line.
* ``Metrics``: Prometheus series (prometheus_client, one registry per app): requests by route,
  method and status, latency histograms, batch sizes and times, queue depth, index size, refusals.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

access_log = logging.getLogger("retrieval.access")
SESSION_COOKIE = "mmpretrain_session"
SECURE_COOKIE = "__Host-mmpretrain_session"  # behind TLS: Secure, Path=/, no Domain (the browser enforces it)
OPEN_PATHS = ("/health", "/", "/login")  # the page is static (no data): it asks for the key and logs in
QUERY_KEY_PATHS = ("/knn-service", "/metadata", "/indices-list")  # ClipClient can send a key only in its URL
FORWARDED = (b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip")
AUTH_CHALLENGE = {"www-authenticate": "Bearer"}
MIN_KEY_CHARS = 16
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("retrieval_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "retrieval_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "retrieval_batch_size",
            "queries per encoder/search batch",
            ["index"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_seconds = Histogram(
            "retrieval_batch_seconds",
            "time to run one batch",
            ["index"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.queue_depth = Gauge("retrieval_queue_depth", "queries waiting for a batch (all indexes)", registry=r)
        self.items = Gauge("retrieval_index_items", "items in the index", ["index"], registry=r)
        self.refused = Counter("retrieval_refused", "queries refused before running", ["index", "reason"], registry=r)
        self.guard_refused = Counter(
            "retrieval_guard_refused", "requests refused before any route ran", ["reason"], registry=r
        )

    def on_batch(self, index: str, size: int, seconds: float) -> None:
        self.batch_size.labels(index).observe(size)
        self.batch_seconds.labels(index).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BodyTooLarge(HTTPException):
    """Raised while a body streams past its cap; the routes' exception handling answers 413."""

    def __init__(self, cap: int):
        super().__init__(413, f"request body over {cap} bytes")


@dataclass(frozen=True)
class Access:
    """Who may ask what, checked before any route runs (see ``Guard``)."""

    api_key: str | None = None
    hosts: frozenset[str] | None = None  # Host header names served (None: any)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to POST ("*": any)
    insecure: bool = False  # forwarded (proxied) requests without a key are allowed
    query_key_paths: tuple[str, ...] = QUERY_KEY_PATHS  # routes that take ?api_key= (clip-retrieval's client)
    open_paths: tuple[str, ...] = OPEN_PATHS  # routes that need no key
    concurrency: int = 256  # requests in flight, all clients: beyond, 503
    per_client: int = 32  # requests in flight from one client address: beyond, 429
    docs_paths: tuple[str, ...] = ()  # pages that load scripts from elsewhere (FastAPI's /docs): no default CSP
    early: Callable[[str, str], tuple[int, str, dict, str] | None] | None = None  # (path, client) -> a refusal


def session_token(api_key: str) -> str:
    """What the page's cookie holds: an HMAC of the key, never the key itself."""
    return hmac.new(api_key.encode(), b"mmpretrain-retrieval-session/1", hashlib.sha256).hexdigest()


def session_cookie(api_key: str, scheme: str) -> str:
    """The ``Set-Cookie`` value after a login: ``__Host-`` and ``Secure`` behind TLS."""
    name = SECURE_COOKIE if scheme == "https" else SESSION_COOKIE
    secure = "; Secure" if scheme == "https" else ""
    return f"{name}={session_token(api_key)}; Path=/; HttpOnly; SameSite=Strict; Max-Age=604800{secure}"


def host_name(value: str) -> str:
    """A Host header's name without the port, lower case (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: Host, forwarded headers, cross-origin POSTs, API key, body caps, requests in
    flight (all, and per client), security headers, metrics and access log (see the module docstring)."""

    def __init__(self, app, *, metrics: Metrics, body_cap: Callable[[str], int], access: Access = Access()):
        self.app, self.metrics, self.body_cap, self.access = app, metrics, body_cap, access
        self.in_flight, self.by_client = 0, {}  # changed on the event loop only
        self._token = session_token(access.api_key) if access.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.perf_counter(), {"status": 500, "sent": 0, "received": 0}
        csp = scope["path"] not in self.access.docs_paths

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = {**message, "headers": _with_security_headers(message.get("headers", []), csp)}
            elif message["type"] == "http.response.body":
                state["sent"] += len(message.get("body", b""))
            await send(message)

        client = (scope.get("client") or ("", 0))[0]
        counted = False
        try:
            refusal = self._refusal(scope, client)
            if refusal is not None:
                self.metrics.guard_refused.labels(refusal[3]).inc()
                await _json(send_wrapper, refusal[0], refusal[1], {"connection": "close", **refusal[2]})
                return
            counted = scope["path"] != "/health"  # /health answers under any load: it is what load balancers ask
            if counted:
                self.in_flight += 1
                self.by_client[client] = self.by_client.get(client, 0) + 1
            await self.app(scope, self._capped(scope, receive, state), send_wrapper)
        except BodyTooLarge:
            if state["status"] == 500 and not state["sent"]:
                await _json(
                    send_wrapper,
                    413,
                    f"request body over {self.body_cap(scope['path'])} bytes",
                    {"connection": "close"},
                )
        finally:
            if counted:
                self.in_flight -= 1
                left = self.by_client[client] - 1
                if left:
                    self.by_client[client] = left
                else:
                    del self.by_client[client]
            self._record(scope, state, time.perf_counter() - start)

    def _refusal(self, scope, client: str) -> tuple[int, str, dict, str] | None:
        """(status, detail, extra headers, reason) of a request refused before any route runs, or None."""
        a, headers, path = self.access, dict(scope["headers"]), scope["path"]
        host = headers.get(b"host", b"").decode("latin-1")
        if a.hosts is not None and host_name(host) not in a.hosts:
            return 400, f"Host {host[:100]!r} is not served here (retrieval serve --allowed-host)", {}, "host"
        if not a.api_key and not a.insecure and any(h in headers for h in FORWARDED):
            return (
                403,
                "a proxied request (forwarded headers) needs the server to have an API key, or --insecure",
                {},
                "forwarded",
            )
        origin = headers.get(b"origin", b"").decode("latin-1")
        if scope["method"] == "POST" and origin and not self._origin_allowed(origin, host):
            return 403, f"cross-origin request from {origin[:100]!r}, which is not on --cors-origin", {}, "origin"
        if a.api_key and path not in a.open_paths and not self._authorized(scope, headers):
            return 401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)", AUTH_CHALLENGE, "api_key"
        length = headers.get(b"content-length")
        cap = self.body_cap(path)
        if length is not None and (not length.isdigit() or int(length) > cap):
            return 413, f"request body over {cap} bytes", {}, "body_cap"
        if path == "/health":
            return None
        if self.in_flight >= a.concurrency:
            return 503, f"{self.in_flight} requests in flight; try again shortly", {"retry-after": "1"}, "concurrency"
        if self.by_client.get(client, 0) >= a.per_client:
            return 429, f"{a.per_client} of your requests are in flight; wait for them", {"retry-after": "1"}, "client"
        return a.early(path, client) if a.early is not None else None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        if "*" in self.access.cors_origins or origin in self.access.cors_origins:
            return True
        return urlsplit(origin).netloc.lower() == host.strip().lower()  # the page's own requests

    def _authorized(self, scope, headers: dict) -> bool:
        key = self.access.api_key.encode()
        given = [headers.get(b"x-api-key", b"")]
        auth = headers.get(b"authorization", b"")
        if auth.lower().startswith(b"bearer "):
            given.append(auth[7:].strip())
        if scope["path"] in self.access.query_key_paths:
            qs = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
            given += [v.encode("latin-1", "replace") for k, v in qs if k == "api_key"]
        if any(g and hmac.compare_digest(g, key) for g in given):
            return True
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name in (SESSION_COOKIE, SECURE_COOKIE) and hmac.compare_digest(value.encode(), self._token.encode()):
                return True
        return False

    def _capped(self, scope, receive, state):
        cap = self.body_cap(scope["path"])

        async def receive_capped():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > cap:
                    raise BodyTooLarge(cap)
            return message

        return receive_capped

    def _record(self, scope, state, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "other"
        self.metrics.requests.labels(route, scope["method"], str(state["status"])).inc()
        self.metrics.latency.labels(route).observe(seconds)
        query = [
            (k, "***" if k == "api_key" else v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        ]
        access_log.info(
            json.dumps(
                {
                    "ts": round(time.time(), 3),
                    "client": (scope.get("client") or ("", 0))[0],
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "query": dict(query),
                    "status": state["status"],
                    "ms": round(1000 * seconds, 2),
                    "bytes_in": state["received"],
                    "bytes_out": state["sent"],
                }
            )
        )


def _with_security_headers(headers: list, csp: bool) -> list:
    """``headers`` plus nosniff, frame and referrer policies, and a deny-all CSP unless the route set one."""
    names = {k.lower() for k, _ in headers}
    extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
    if csp and b"content-security-policy" not in names:
        extra.append((b"content-security-policy", DEFAULT_CSP))
    return [*headers, *extra]


async def _json(send, status: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps({"detail": detail, "message": detail}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})
