"""What stands in front of the routes, as pure ASGI middleware (nothing here reads a body it refuses):

* ``Guard``: per-request metrics and a structured (JSON) access log line; the API key on every route
  but ``/health``; request bodies capped before they are read (a ``Content-Length`` over the route's
  cap is answered 413 at once; a body without one is counted as it streams and cut off at the cap).
* ``Metrics``: Prometheus series (prometheus_client, one registry per app): requests by route,
  method and status, latency histograms, batch sizes and times, queue depth, index size, refusals.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

access_log = logging.getLogger("retrieval.access")
API_KEY_COOKIE = "mmpretrain_api_key"


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

    def on_batch(self, index: str, size: int, seconds: float) -> None:
        self.batch_size.labels(index).observe(size)
        self.batch_seconds.labels(index).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BodyTooLarge(HTTPException):
    """Raised while a body streams past its cap; the routes' exception handling answers 413."""

    def __init__(self, cap: int):
        super().__init__(413, f"request body over {cap} bytes")


class Guard:
    """ASGI middleware: API key, body caps, metrics and access log (see the module docstring)."""

    def __init__(
        self,
        app,
        *,
        metrics: Metrics,
        body_cap: Callable[[str], int],
        api_key: str | None = None,
        open_paths: tuple[str, ...] = ("/health",),
    ):
        self.app, self.metrics, self.body_cap = app, metrics, body_cap
        self.api_key, self.open_paths = api_key, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.perf_counter(), {"status": 500, "sent": 0, "received": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["sent"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _json(send_wrapper, *refusal)
            else:
                await self.app(scope, self._capped(scope, receive, state), send_wrapper)
        except BodyTooLarge:
            if state["status"] == 500 and not state["sent"]:
                await _json(send_wrapper, 413, f"request body over {self.body_cap(scope['path'])} bytes")
        finally:
            self._record(scope, state, time.perf_counter() - start)

    def _refusal(self, scope) -> tuple[int, str, dict] | None:
        if self.api_key and scope["path"] not in self.open_paths and not self._authorized(scope):
            return (
                401,
                "missing or wrong API key (Authorization: Bearer KEY, X-API-Key, or ?api_key=)",
                {"www-authenticate": "Bearer"},
            )
        length = dict(scope["headers"]).get(b"content-length")
        cap = self.body_cap(scope["path"])
        if length is not None and (not length.isdigit() or int(length) > cap):
            return 413, f"request body over {cap} bytes", {"connection": "close"}
        return None

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = [headers.get(b"x-api-key", b"").decode("latin-1")]
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        given += [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k == "api_key"]
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == API_KEY_COOKIE:
                given.append(value)
        return any(g and hmac.compare_digest(g.encode(), self.api_key.encode()) for g in given)

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
