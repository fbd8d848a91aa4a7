"""The service against a hostile client (issue 27, items 2-6, 8 and 9; docs/security.md): connection
deadlines and caps, the SSRF-safe fetcher, Host/forwarded/Origin checks, cost caps, fairness, keys."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from retrieval.jobs.search import QueryError
from retrieval.serve.batcher import BatchConfig, ClientOverloaded, MicroBatcher, Overloaded
from retrieval.serve.connections import ConnectionLimits
from retrieval.serve.engine import Query, dedup_first
from retrieval.serve.fetch import FetchError, FetchPolicy, blocked, fetch
from retrieval.serve.protocol import KnnLimits, parse_knn
from retrieval.serve.redact import collection_root
from retrieval.serve.service import ServeConfig, create_app
from tests.conftest import api_client, png_bytes

KEY = "0123456789abcdef-key"
ATTACKER = "127.0.0.2"  # another loopback address: the attacker's connections are not the normal clients'


@pytest.fixture
def live(live_service):
    return live_service


def _get(port: int, path: str, headers: dict | None = None, timeout: float = 5) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.perf_counter() - t0


def _open(port: int, data: bytes = b"", source: str = ATTACKER) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    if data:
        sock.sendall(data)
    return sock


def _reply(sock: socket.socket, wait: float = 5) -> bytes:
    sock.settimeout(wait)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


# ---------------------------------------------------------------- 2. slowloris
def test_half_open_connections_time_out_and_never_turn_away_health(live):
    limits = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, max_per_client=40)
    port = live(ServeConfig(connections=limits))
    idle = [_open(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ") for _ in range(40)]
    refused = _open(port)  # the 41st from the same address: over its cap, answered at once
    assert _reply(refused, 2).startswith(b"HTTP/1.1 503")
    times = [_get(port, "/health") for _ in range(20)]  # another address: served throughout
    assert all(code == 200 for code, _ in times) and max(t for _, t in times) < 0.5, times
    time.sleep(1.3)
    replies = [_reply(s, 1) for s in idle]
    assert all(r.startswith(b"HTTP/1.1 408") for r in replies), replies[:3]  # then closed
    body = _open(port, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.perf_counter()
    assert _reply(body, 3).startswith(b"HTTP/1.1 408") and time.perf_counter() - t0 < 2.5  # body deadline
    for s in [*idle, refused, body]:
        s.close()


def test_a_peer_churning_connections_has_the_extra_ones_dropped(live):
    port = live(ServeConfig(connections=ConnectionLimits(new_per_second=5)))  # bursts of 10
    answered = 0
    for _ in range(30):
        sock = _open(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answered += _reply(sock, 2).startswith(b"HTTP/1.1 200")
        sock.close()
    assert 10 <= answered <= 13, answered  # the burst, and what refilled meanwhile; the rest dropped unanswered
    assert _get(port, "/health")[0] == 200  # another address is not affected


def test_endless_headers_are_cut_off(live):
    port = live(ServeConfig(connections=ConnectionLimits(max_header_bytes=8 << 10)))
    sock = _open(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        for _ in range(40):
            sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _reply(sock, 3).startswith(b"HTTP/1.1 431")
    sock.close()


def test_a_refusal_closes_the_connection_without_reading_the_body(live):
    port = live(ServeConfig(api_key=KEY))
    sock = _open(port, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n", "127.0.0.1")
    reply = _reply(sock, 3)  # the server closes: recv ends without the client sending its megabyte
    assert reply.startswith(b"HTTP/1.1 401") and b"connection: close" in reply.lower()
    sock.close()


# ---------------------------------------------------------------- 3. SSRF
class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: list = []

    def do_GET(self):  # noqa: N802
        self.hits.append((self.server.server_port, self.path))
        status, headers, body = self.routes.get((self.server.server_port, self.path), (404, {}, b""))
        if callable(body):
            self.send_response(status)
            self.end_headers()
            body(self.wfile)
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def origin_servers():
    """Two HTTP servers on loopback: ``ports[0]`` (the allowed one) and ``ports[1]`` (a private service)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    _Handler.routes, _Handler.hits = {}, []
    yield [s.server_port for s in servers]
    for s in servers:
        s.shutdown()


def test_blocked_addresses():
    for a in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "::1", "fe80::1",
              "::ffff:127.0.0.1", "224.0.0.1", "0.0.0.0", "100.64.0.1", "fc00::1"):  # fmt: skip
        assert blocked(a), a
    assert not blocked("93.184.216.34") and not blocked("2606:2800:220:1:248:1893:25c8:1946")


def test_redirects_are_rechecked_on_every_hop_and_private_addresses_refused(origin_servers):
    allowed, private = origin_servers
    png = png_bytes()
    _Handler.routes = {
        (allowed, "/img.png"): (200, {}, png),
        (allowed, "/to-private"): (302, {"Location": f"http://127.0.0.1:{private}/secret"}, b""),
        (allowed, "/to-ftp"): (302, {"Location": "ftp://127.0.0.1/x"}, b""),
        (allowed, "/to-self"): (302, {"Location": "/img.png"}, b""),
        (private, "/secret"): (200, {}, b"internal data"),
    }
    policy = FetchPolicy(hosts=(f"127.0.0.1:{allowed}",), allow_private=True)
    assert fetch(f"http://127.0.0.1:{allowed}/img.png", policy) == png
    assert fetch(f"http://127.0.0.1:{allowed}/to-self", policy) == png  # a redirect within the allow-list
    for path, why in (("/to-private", "not on the allow-list"), ("/to-ftp", "scheme")):
        with pytest.raises(FetchError, match=why):
            fetch(f"http://127.0.0.1:{allowed}{path}", policy)
    assert (private, "/secret") not in _Handler.hits  # never reached
    with pytest.raises(FetchError, match="non-public"):  # the same host, resolved address checked (default policy)
        fetch(f"http://localhost:{allowed}/img.png", FetchPolicy(hosts=(f"localhost:{allowed}",)))
    with pytest.raises(FetchError, match="allow-list"):  # ports other than 80/443 only when listed
        fetch(f"http://127.0.0.1:{allowed}/img.png", FetchPolicy(hosts=("127.0.0.1",), allow_private=True))
    with pytest.raises(FetchError, match="credentials"):
        fetch(f"http://user:pw@127.0.0.1:{allowed}/img.png", policy)


def test_one_deadline_covers_a_dripping_server(origin_servers):
    allowed, _ = origin_servers

    def drip(out):
        for _ in range(50):
            out.write(b"x")
            out.flush()
            time.sleep(0.1)

    _Handler.routes = {(allowed, "/drip"): (200, {}, drip)}
    t0 = time.perf_counter()
    with pytest.raises(FetchError, match="deadline"):
        fetch(f"http://127.0.0.1:{allowed}/drip", FetchPolicy(hosts=(f"127.0.0.1:{allowed}",), allow_private=True,
                                                              deadline_s=1.0))  # fmt: skip
    assert time.perf_counter() - t0 < 2


def test_the_client_never_learns_why_a_fetch_failed(searcher, origin_servers):
    allowed, private = origin_servers
    _Handler.routes = {(allowed, "/to-private"): (302, {"Location": f"http://127.0.0.1:{private}/x"}, b"")}
    cfg = ServeConfig(fetch=FetchPolicy(hosts=(f"127.0.0.1:{allowed}",), allow_private=True))
    c = api_client(create_app({"toy": searcher}, cfg))
    for url in (f"http://127.0.0.1:{allowed}/to-private", f"http://127.0.0.1:{allowed}/missing"):
        r = c.post("/knn-service", content=json.dumps({"image_url": url, "indice_name": "toy"}))
        assert r.status_code == 400 and r.json()["detail"] == "could not fetch image_url", r.text
    r = c.post("/knn-service", content=json.dumps({"image_url": f"http://u:p@127.0.0.1:{allowed}/x.png"}))
    assert r.status_code == 400 and "credentials" in r.json()["detail"]


# ---------------------------------------------------------------- 4. loopback is not a boundary
def test_host_header_forwarded_headers_and_cross_origin_posts(searcher):
    c = api_client(create_app({"toy": searcher}))
    assert c.get("/indices-list", headers={"Host": "rebound.evil.example"}).status_code == 400  # DNS rebinding
    assert c.get("/indices-list", headers={"Host": "localhost:8000"}).status_code == 200
    named = api_client(create_app({"toy": searcher}, ServeConfig(allowed_hosts=("search.example",))))
    assert named.get("/indices-list", headers={"Host": "search.example"}).status_code == 200
    assert c.get("/indices-list", headers={"X-Forwarded-For": "1.2.3.4"}).status_code == 403  # a proxy, no key
    keyed = api_client(create_app({"toy": searcher}, ServeConfig(api_key=KEY)))
    ok = {"X-Forwarded-For": "1.2.3.4", "X-API-Key": KEY}
    assert keyed.get("/indices-list", headers=ok).status_code == 200
    body = json.dumps({"text": "a red circle", "indice_name": "toy", "num_images": 2})
    plain = {"Content-Type": "text/plain;charset=UTF-8"}
    assert c.post("/knn-service", content=body, headers={**plain, "Origin": "https://evil.example"}).status_code == 403
    assert c.post("/knn-service", content=body).status_code == 200  # ClipClient: no Origin, no Content-Type
    front = api_client(create_app({"toy": searcher}, ServeConfig(cors_origins=("https://front.example",))))
    assert (
        front.post("/knn-service", content=body, headers={**plain, "Origin": "https://front.example"}).status_code
        == 200
    )
    form = c.post(
        "/classify",
        files={"image": ("x.png", png_bytes(), "image/png")},
        data={"labels": "a, b"},
        headers={"Origin": "https://evil.example"},
    )
    assert form.status_code == 403  # a cross-site form post
    own = c.post("/knn-service", content=body, headers={**plain, "Origin": "http://127.0.0.1"})
    assert own.status_code == 200  # the page's own origin


# ---------------------------------------------------------------- 5. cost amplification
def test_result_counts_are_clamped_and_metadata_capped(client):
    req = parse_knn({"text": "x", "num_result_ids": 10_000, "num_images": 10_000}, KnnLimits())
    assert req.num_result_ids == 1000 and req.num_images == 1000  # clamped (the front end asks 3,000 / 10,000)
    r = client.post("/metadata", content=json.dumps({"ids": [0] * 501, "indice_name": "toy"}))
    assert r.status_code == 400 and "500" in r.json()["detail"]
    assert client.post("/metadata", content=json.dumps({"ids": [0] * 40, "indice_name": "toy"})).status_code == 200


def test_metadata_answers_stop_carrying_thumbnails_past_the_byte_cap(searcher):
    app = create_app({"toy": searcher}, ServeConfig(max_response_bytes=3000))
    served = app.state.served
    meta = served.clip_metadata(served.engine("toy"), list(range(20)))
    images = [m for m in meta if "image" in m]
    assert 0 < len(images) < 20 and all("caption" in m for m in meta)


def test_a_batch_is_searched_per_k_and_one_failing_query_fails_alone(searcher, monkeypatch):
    from retrieval.serve.engine import IndexEngine

    engine = IndexEngine("toy", searcher)
    ks, real = [], searcher.index.index.search
    monkeypatch.setattr(searcher.index.index, "search", lambda x, k: ks.append((len(x), k)) or real(x, k))
    vec = searcher.vectors(np.array([3]))[0]
    out = engine.run([Query("vector", vec, 3), Query("vector", vec, 50), Query("vector", vec, 3)])
    assert sorted(ks) == [(1, 50), (2, 3)] and [len(a.ids) for a in out] == [3, 50, 3]
    real_vectors = searcher.vectors
    monkeypatch.setattr(searcher, "vectors", lambda ids: (_ for _ in ()).throw(RuntimeError("reconstruct failed")))
    out = engine.run([Query("vector", vec, 5, dedup=0.94), Query("vector", vec, 5)])
    assert isinstance(out[0], RuntimeError) and len(out[1].ids) == 5  # the second did not pay for the first
    monkeypatch.setattr(searcher, "vectors", real_vectors)


def test_dedup_is_vectorised_and_capped():
    same = np.ones((1000, 32), np.float32)  # every pair a duplicate: 1M pairs
    t0 = time.perf_counter()
    assert dedup_first(same, 0.94).tolist() == [0]
    assert time.perf_counter() - t0 < 1.0  # the Python union-find walked every pair
    with pytest.raises(QueryError, match="near-duplicate pairs"):
        dedup_first(same, 0.94, max_pairs=1000)


# ---------------------------------------------------------------- 6. fairness and bounded uploads
def test_uploads_per_call_templates_and_label_costs_are_bounded(client):
    one = {"images": [__import__("base64").b64encode(png_bytes()).decode()] * 17, "k": 3}
    r = client.post("/search", json=one)
    assert r.status_code == 400 and "at most 16 images" in r.json()["detail"]
    r = client.post(
        "/classify", files={"image": ("x.png", png_bytes(), "image/png")}, data={"labels": "a", "template": "<> <>"}
    )
    assert r.status_code == 400 and "exactly once" in r.json()["detail"]
    assert Query("text", ["a"] * 32).cost == 32 and Query("text", "a").cost == 1


def _held_batcher(cfg: BatchConfig):
    """A batcher whose batches wait for ``release`` (so that what is submitted meanwhile queues up) and
    record what they held in ``batches``."""
    release, batches = threading.Event(), []

    def run(items):
        release.wait(5)
        batches.append(list(items))
        return items

    return MicroBatcher(run, cfg), release, batches


def test_the_queue_counts_cost_and_shares_it_fairly_between_clients():
    b, release, batches = _held_batcher(BatchConfig(max_batch=4, max_wait_ms=1, max_queue=64, max_queue_per_client=32))
    b.submit("warm", client="x")
    time.sleep(0.05)  # the worker holds it; the rest waits
    hog = [b.submit(f"a{i}", cost=4, client="a") for i in range(8)]  # 32: client a's whole share
    with pytest.raises(ClientOverloaded):
        b.submit("a-more", client="a")
    fair = [b.submit(f"b{i}", client="b") for i in range(2)]
    with pytest.raises(Overloaded):
        b.submit("big", cost=40, client="c")  # 34 waiting + 40 > 64
    release.set()
    assert [f.result(5) for f in fair] == ["b0", "b1"] and all(f.result(5) for f in hog)
    b.close()
    where = {item: n for n, batch in enumerate(batches) for item in batch}
    assert where["b0"] == 1 and where["b1"] < where["a1"]  # b's cheap queries went before the hog's heavy ones


def test_a_heavy_client_adds_about_what_a_light_one_does_to_each_batch():
    """Deficit round robin: with eight light clients (a cost-1 query each, as users searching) and a heavy
    one (cost-8 label chunks) waiting, a batch holds at most a chunk of the heavy client's, not 56."""
    b, release, batches = _held_batcher(
        BatchConfig(max_batch=64, max_wait_ms=1, max_queue=200, max_queue_per_client=100)
    )
    b.submit(("warm", 1), client="x")
    time.sleep(0.05)
    heavy = [b.submit(("h", 8), cost=8, client="heavy") for _ in range(10)]
    light = [b.submit(("l", 1), client=f"user{i}") for i in range(8)]
    release.set()
    for f in heavy + light:
        f.result(5)
    b.close()
    first = batches[1]
    light_cost = sum(c for k, c in first if k == "l")
    heavy_cost = sum(c for k, c in first if k == "h")
    assert light_cost == 8 and heavy_cost <= 8, first  # not 56 of the heavy client's cost beside 8
    assert sum(c for batch in batches[1:] for k, c in batch if k == "h") == 80  # and it all ran in the end


def test_a_client_over_its_requests_in_flight_gets_429(searcher, monkeypatch):
    app = create_app({"toy": searcher}, ServeConfig(per_client=2))
    batcher = app.state.served.batcher
    real = batcher.fn
    monkeypatch.setattr(batcher, "fn", lambda qs: time.sleep(0.3) or real(qs))
    c = api_client(app)
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: c.get(f"/search?q=q{i}&k=3"), range(6)))
    limited = [r for r in codes if r.status_code == 429]
    assert limited and all(r.headers["retry-after"] and r.headers["connection"] == "close" for r in limited)
    assert any(r.status_code == 200 for r in codes)


# ---------------------------------------------------------------- 8. keys and headers
def test_security_headers_everywhere_and_a_page_policy_that_allows_only_its_own_code(client):
    for url in ("/", "/search?q=a&k=3", "/health", "/nope"):
        r = client.get(url)
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", url
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], url
    page = client.get("/").headers["content-security-policy"]
    assert "script-src 'sha256-" in page and "unsafe-inline" not in page
    assert client.get("/thumb/0").headers["cache-control"].startswith("private")


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch, caplog):
    from retrieval.cli import build_parser, read_api_key

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    args = build_parser().parse_args(["serve", "ix", "--api-key-file", str(key_file)])
    assert read_api_key(args) == KEY
    monkeypatch.setenv("RETRIEVAL_API_KEY", "from-the-environment-0")
    assert read_api_key(build_parser().parse_args(["serve", "ix"])) == "from-the-environment-0"
    monkeypatch.delenv("RETRIEVAL_API_KEY")
    with caplog.at_level("WARNING"):
        assert read_api_key(build_parser().parse_args(["serve", "ix", "--api-key", KEY])) == KEY
    assert "visible" in caplog.text


# ---------------------------------------------------------------- 9. smaller
@pytest.mark.parametrize(
    "body",
    [
        '{"text": "x", "indice_name": []}',
        '{"text": "x", "num_images": Infinity}',
        '{"text": "x", "num_result_ids": NaN}',
        '{"text": "x", "num_images": 1e400}',
    ],
)
def test_odd_clip_bodies_are_400s(client, body):
    assert client.post("/knn-service", content=body).status_code == 400


def test_odd_metadata_bodies_are_400s(client):
    assert client.post("/metadata", content='{"ids": [1], "indice_name": []}').status_code == 400
    assert client.post("/metadata", content='{"ids": [1], "indice_name": {"a": 1}}').status_code == 400


def test_one_item_at_the_root_does_not_make_the_root_slash():
    assert collection_root(["/x", "/data/shards/a.tar#k"]) is None  # shown by file name, not as /data/...
    assert collection_root(["/data/shards/a.tar#k", "/data/shards/b.tar#j"]) == "/data/shards"
