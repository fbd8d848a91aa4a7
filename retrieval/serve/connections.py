"""What a connection may cost before the application sees a request: uvicorn's HTTP protocol (httptools)
with deadlines and caps that uvicorn does not have.

uvicorn arms no deadline on reading a request: a client that opens a connection and never finishes its
headers holds it for ever, and its ``limit_concurrency`` counts such connections, so ~300 idle ones make
every request a 503, ``/health`` included (slowloris). Here, per connection:

* **header deadline**: the request line and headers must arrive within ``header_timeout_s`` of the
  connection opening (or of the request's first byte on a kept-alive one), in at most
  ``max_header_bytes``; else 408 (431) and the connection is closed;
* **body deadline**: the whole body within ``body_timeout_s`` of the headers; else 408 and closed
  (the route's body cap is the ``Guard``'s: bytes, this is time);
* **connection caps**: at most ``max_connections`` open in all and ``max_per_client`` from one peer
  address; a connection over either is answered 503 and closed at once, before anything is read;
* **connection rate**: a peer opening more than ``new_per_second`` connections a second (bursts of
  twice that) has the extra ones dropped as they open, before anything is parsed: refusing a request
  costs the event loop ~0.5 ms of Python, so hundreds of refused requests a second would otherwise
  slow every search (clients that keep their connections alive never come near it).

Requests in flight (not connections) are what the ``Guard`` limits, so idle connections never turn
away a request. ``protocol_class(limits)`` makes the class to give ``uvicorn.Config(http=...)``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from retrieval.options import option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = option(10.0, help="seconds to send a request's line and headers", flag="--header-timeout")
    body_timeout_s: float = option(30.0, help="seconds to send a request's body", flag="--body-timeout")
    max_header_bytes: int = 64 << 10
    max_connections: int = option(1000, help="open connections in all (under the process's open-file limit)")
    max_per_client: int = option(64, help="open connections from one address", flag="--max-connections-per-client")
    new_per_second: float = option(
        50.0,
        help="new connections from one address a second, bursts of twice that (0: no limit)",
        flag="--new-connections-per-second",
    )


def _reply(status: int, reason: str) -> bytes:
    body = f'{{"detail": "{reason}"}}'.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and caps above (see the module docstring)."""

    limits = ConnectionLimits()
    open_by_peer: dict[str, int] = {}  # replaced per server by ``protocol_class``
    buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when): new connections a peer may open
    refused = {"connections": 0, "rate": 0, "header_timeout": 0, "body_timeout": 0, "header_too_large": 0}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "?"
        self._counted, self._timer, self._header_bytes, self._in_headers = False, None, 0, True
        self._set_up = False
        if not self._take_token():  # a peer churning connections: dropped before uvicorn sets anything up
            self.refused["rate"] += 1
            transport.abort()
            return
        super().connection_made(transport)
        self._set_up = True
        lim, by_peer = self.limits, self.open_by_peer
        if sum(by_peer.values()) >= lim.max_connections or by_peer.get(self._peer, 0) >= lim.max_per_client:
            self.refused["connections"] += 1
            transport.write(_reply(503, "Too many connections"))
            transport.close()
            return
        by_peer[self._peer] = by_peer.get(self._peer, 0) + 1
        self._counted = True
        self._arm(lim.header_timeout_s, "header_timeout")

    def _take_token(self) -> bool:
        """A token bucket per peer address: ``new_per_second`` refilled, twice that at most."""
        rate = self.limits.new_per_second
        if rate <= 0:
            return True
        now = self.loop.time()
        tokens, then = self.buckets.get(self._peer, (2 * rate, now))
        tokens = min(2 * rate, tokens + (now - then) * rate)
        if len(self.buckets) > 10_000:  # forget peers whose buckets are full again
            for peer in [p for p, (t, w) in self.buckets.items() if t + (now - w) * rate >= 2 * rate]:
                del self.buckets[peer]
        if tokens < 1:
            self.buckets[self._peer] = (tokens, now)
            return False
        self.buckets[self._peer] = (tokens - 1, now)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._set_up:
            return
        self._disarm()
        if self._counted:
            self._counted = False
            left = self.open_by_peer.get(self._peer, 1) - 1
            if left > 0:
                self.open_by_peer[self._peer] = left
            else:
                self.open_by_peer.pop(self._peer, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:  # still no end of headers
            self._expire("header_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a kept-alive connection's next request: its headers get the same deadline
            self._arm(self.limits.header_timeout_s, "header_timeout")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.limits.body_timeout_s, "body_timeout")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers, self._header_bytes = True, 0  # what comes next is the next request's
        super().on_message_complete()

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire, why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, why: str) -> None:
        """A deadline or cap passed: 408/431 if no response has begun, then close the connection."""
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        self.refused[why] += 1
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if cycle is None or not cycle.response_started:  # cycle None: the headers of a request never came
            status = 431 if why == "header_too_large" else 408
            self.transport.write(
                _reply(status, "Request Header Fields Too Large" if status == 431 else "Request Timeout")
            )
        if cycle is not None:
            cycle.disconnected = True  # the route's receive() sees a disconnect; its response goes nowhere
            cycle.message_event.set()
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` subclass with ``limits`` and its own connection counts (one per server)."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {
            "limits": limits,
            "open_by_peer": {},
            "buckets": {},
            "refused": dict.fromkeys(GuardedProtocol.refused, 0),
        },
    )
