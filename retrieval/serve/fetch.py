"""Fetching a client-named URL (``/knn-service``'s ``image_url``) without letting the client reach past
the service (SSRF).

urllib follows redirects to any host, port and scheme (ftp included), resolves names itself (a name
on the allow-list may resolve to 127.0.0.1 or to the cloud metadata address, and may resolve
differently a moment later) and says in its errors what it found (a port scanner's oracle). Here:

* http and https only, no ``user:password@``; the host must be on the allow-list and the port 80/443
  unless the allow-list names it (``host:port``), checked again on every redirect hop (at most
  ``max_redirects``);
* the name is resolved once per hop and every address checked: private, loopback, link-local,
  multicast, reserved and unspecified addresses (IPv4-mapped ones too) are refused unless
  ``allow_private``; the connection goes to the checked address (pinned), with the name only in the
  ``Host`` header and TLS's server name, so a second lookup cannot change where it lands;
* one wall-clock deadline for the whole fetch (connects, redirects, every read), and a byte cap;
* ``FetchError``'s text is for the log; the client is told only that the fetch failed.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from retrieval.errors import FetchError
from retrieval.options import option

REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class FetchPolicy:
    hosts: tuple[str, ...] = option(
        (),
        help="hosts whose images /knn-service's image_url may fetch (ports 80/443 unless named; default: none)",
        flag="--image-url-host",
        metavar="HOST[:PORT]",
    )
    max_bytes: int = 8 << 20
    deadline_s: float = 10.0  # the whole fetch, redirects included
    max_redirects: int = 3
    allow_private: bool = option(
        False,
        help="let image_url hosts resolve to private/loopback addresses (an internal deployment)",
        flag="--image-url-private",
    )

    def allows(self, host: str, port: int, scheme: str) -> bool:
        listed = {h.lower() for h in self.hosts}
        return f"{host}:{port}" in listed or (host in listed and port == DEFAULT_PORTS[scheme])


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent


def check_url(url: str, policy: FetchPolicy) -> Target:
    """``url`` as a ``Target`` if the policy lets it be fetched; ``FetchError`` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port that is not a number, a bad IPv6 literal
        raise FetchError(f"unparsable URL: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise FetchError(f"scheme {parts.scheme!r}: only http(s) URLs with a host are fetched")
    if parts.username is not None or parts.password is not None:
        raise FetchError("a URL with credentials (user:password@) is not fetched")
    host, port = parts.hostname.lower(), port or DEFAULT_PORTS[parts.scheme]
    if not policy.allows(host, port, parts.scheme):
        raise FetchError(f"{host}:{port} is not on the allow-list")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path)


def blocked(address: str) -> bool:
    """Whether an address is one a fetch must not reach (anything not globally routable, or multicast)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified


def resolve(target: Target, policy: FetchPolicy, deadline: float) -> str:
    """One checked address of ``target.host``: every address the name resolves to must pass (a name
    that also resolves to a private address is refused), the first is used."""
    if time.monotonic() > deadline:
        raise FetchError("deadline passed")
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchError(f"cannot resolve {target.host}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError(f"{target.host} resolves to nothing")
    bad = [a for a in addresses if blocked(a)]
    if bad and not policy.allow_private:
        raise FetchError(f"{target.host} resolves to a non-public address ({bad[0]})")
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, verifying the certificate for the host name."""

    def __init__(self, address: str, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, address: str, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def _get(target: Target, address: str, policy: FetchPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location header, body up to the cap); every socket wait ends by ``deadline``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("deadline passed")
    conn = (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(address, target, left)
    try:
        conn.request("GET", target.path, headers={"User-Agent": "mmpretrain-retrieval", "Accept": "image/*"})
        sock = conn.sock  # http.client lets go of it once the response says it will close
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        resp = conn.getresponse()
        if resp.status in REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchError("deadline passed while reading")
            sock.settimeout(left)
            chunk = resp.read1(64 << 10)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError(f"more than {policy.max_bytes} bytes")
            chunks.append(chunk)
        return resp.status, None, b"".join(chunks)
    except TimeoutError:
        raise FetchError(f"{target.host}:{target.port}: the deadline passed") from None
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        raise FetchError(f"{target.host}:{target.port}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of ``url`` (status 200), following at most ``policy.max_redirects`` redirects, each hop
    checked as the first; ``FetchError`` saying why otherwise."""
    deadline = time.monotonic() + policy.deadline_s
    for _ in range(policy.max_redirects + 1):
        target = check_url(url, policy)
        status, location, body = _get(target, resolve(target, policy, deadline), policy, deadline)
        if status in REDIRECTS:
            if not location:
                raise FetchError(f"redirect {status} without a Location")
            url = urljoin(url, location)
            continue
        if status != 200:
            raise FetchError(f"status {status}")
        return body
    raise FetchError(f"more than {policy.max_redirects} redirects")
