"""The service under load and speaking clip-retrieval's protocol (issue 12): micro-batching, 503s from
a full queue, body caps that read nothing, the API-key rule, several indexes, dedup, /metrics."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from retrieval.jobs.search import QueryError, Searcher
from retrieval.serve.batcher import BatchConfig, MicroBatcher, Overloaded
from retrieval.serve.engine import dedup_first
from retrieval.serve.protocol import CLIENT_KEYS
from retrieval.serve.service import ServeConfig, create_app, serve
from tests.conftest import api_client, png_bytes

# what clip-retrieval's ClipClient(url, "toy").query(text="a red circle") posts, key for key (clip_client.py)
CLIP_CLIENT_BODY = {
    "text": "a red circle",
    "image": None,
    "image_url": None,
    "embedding_input": None,
    "deduplicate": True,
    "use_safety_model": True,
    "use_violence_detector": True,
    "indice_name": "toy",
    "use_mclip": False,
    "aesthetic_score": 9,
    "aesthetic_weight": 0.5,
    "modality": "image",
    "num_images": 5,
    "num_result_ids": 5,
}


# ---------------------------------------------------------------- clip-retrieval's protocol
def test_clip_client_body_gets_clip_retrieval_response_shape(client):
    assert set(CLIP_CLIENT_BODY) == set(CLIENT_KEYS) and len(CLIENT_KEYS) == 14
    body = {**CLIP_CLIENT_BODY, "deduplicate": False}
    r = client.post("/knn-service", content=json.dumps(body))  # no Content-Type, as requests sends data=str
    assert r.status_code == 200, r.text
    items = r.json()
    assert isinstance(items, list) and len(items) == 5
    assert [i["similarity"] for i in items] == sorted((i["similarity"] for i in items), reverse=True)
    for item in items:
        assert {"id", "similarity", "caption", "image"} <= set(item) and isinstance(item["id"], int)
        assert base64.b64decode(item["image"])[:2] == b"\xff\xd8"  # a JPEG thumbnail, bare base64
    ours = client.get("/search", params={"q": "a red circle", "k": 5}).json()["results"]
    assert [i["id"] for i in items] == [h["id"] for h in ours]


def test_web_front_end_body_more_ids_than_metadata_and_text_plain(client):
    body = {
        **CLIP_CLIENT_BODY,
        "deduplicate": False,
        "num_images": 3,
        "num_result_ids": 3000,
        "aesthetic_score": "",
        "aesthetic_weight": "0.5",
    }  # the front end's values, as strings
    r = client.post("/knn-service", content=json.dumps(body), headers={"content-type": "text/plain;charset=UTF-8"})
    items = r.json()
    assert r.status_code == 200 and len(items) == 64  # every item of the index, 3000 asked
    assert all("caption" in i for i in items[:3]) and all(set(i) == {"id", "similarity"} for i in items[3:])
    meta = client.post("/metadata", content=json.dumps({"ids": [items[3]["id"], items[4]["id"]], "indice_name": "toy"}))
    assert [m["id"] for m in meta.json()] == [items[3]["id"], items[4]["id"]] and "caption" in meta.json()[0][
        "metadata"
    ]
    assert client.post("/metadata", content=json.dumps({"ids": [], "indice_name": "toy"})).json() == []
    assert client.get("/indices-list").json() == ["toy"]


def test_image_and_embedding_queries_and_refused_image_url(client, searcher):
    image = base64.b64encode(png_bytes()).decode()
    by_image = client.post("/knn-service", content=json.dumps({**CLIP_CLIENT_BODY, "text": None, "image": image}))
    assert by_image.status_code == 200 and len(by_image.json()) >= 1
    vec = searcher.vectors(np.array([7]))[0].tolist()
    by_vec = client.post(
        "/knn-service",
        content=json.dumps({**CLIP_CLIENT_BODY, "text": None, "embedding_input": vec, "deduplicate": False}),
    )
    assert by_vec.json()[0]["id"] == 7 and by_vec.json()[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    ours = client.post("/search", json={"embeddings": [vec], "k": 3}).json()["results"][0]
    assert ours[0]["id"] == 7
    assert client.post("/search", json={"images": [image], "k": 3}).status_code == 200
    url = client.post(
        "/knn-service",
        content=json.dumps({**CLIP_CLIENT_BODY, "text": None, "image_url": "http://169.254.169.254/latest/meta-data"}),
    )
    assert url.status_code == 400 and "allow-list" in url.json()["detail"]
    assert client.post("/knn-service", content=b"{not json").status_code == 400
    assert client.post("/knn-service", content=json.dumps({**CLIP_CLIENT_BODY, "modality": "text"})).status_code == 400


def test_dedup_collapses_near_duplicates_keeping_the_best_ranked():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 16)).astype(np.float32)
    v = np.stack([base[0], base[1], base[0] + 0.01, base[2], base[1] + 0.01, base[0] + 0.02, base[3]])
    assert dedup_first(v, 0.94).tolist() == [0, 1, 3, 6]
    chain = np.stack([[1, 0], [np.cos(0.3), np.sin(0.3)], [np.cos(0.6), np.sin(0.6)]]).astype(np.float32)
    assert dedup_first(chain, 0.94).tolist() == [0]  # 0~1 and 1~2 (cos 0.955), so one group, as clip-retrieval


def test_deduplicate_removes_hits_whose_vectors_are_near_copies(client, searcher):
    plain = client.post("/search", json={"queries": ["a red circle"], "k": 20}).json()["results"][0]
    dedup = client.post("/search", json={"queries": ["a red circle"], "k": 20, "deduplicate": True}).json()["results"][
        0
    ]
    ids = np.array([h["id"] for h in plain])
    keep = dedup_first(searcher.vectors(ids), 0.94)
    assert [h["id"] for h in dedup] == ids[keep].tolist() and len(dedup) <= len(plain)


# ---------------------------------------------------------------- batching and load shedding
def test_the_batcher_batches_waiting_items_and_fails_fast_when_full():
    release, sizes = threading.Event(), []

    def slow(items):
        release.wait(5)
        sizes.append(len(items))
        return [ValueError("bad") if x == "bad" else x * 2 for x in items]

    b = MicroBatcher(slow, BatchConfig(max_batch=8, max_wait_ms=1, max_queue=6))
    first = b.submit(1)
    time.sleep(0.05)  # the worker holds item 1; the next ones wait
    futures = [b.submit(i) for i in (2, 3, "bad", 5, 6, 7)]
    with pytest.raises(Overloaded) as full:
        b.submit(8)
    assert full.value.retry_after >= 1
    release.set()
    assert first.result(5) == 2 and [f.result(5) for f in futures if f is not futures[2]] == [4, 6, 10, 12, 14]
    with pytest.raises(ValueError, match="bad"):
        futures[2].result(5)
    assert sizes == [1, 6]  # six waiting queries went through as one batch
    b.close()


def test_concurrent_requests_share_batches(searcher):
    app = create_app({"toy": searcher}, ServeConfig(batch=BatchConfig(max_batch=64, max_wait_ms=20)))
    with api_client(app) as c:
        with ThreadPoolExecutor(16) as pool:
            codes = list(
                pool.map(lambda i: c.get("/search", params={"q": f"query {i}", "k": 3}).status_code, range(32))
            )
        metrics = c.get("/metrics").text
    assert codes == [200] * 32
    count = float(
        next(x for x in metrics.splitlines() if x.startswith('retrieval_batch_size_count{index="toy"}')).split()[-1]
    )
    assert count < 32  # fewer batches than queries: they were batched


@pytest.fixture
def live_server(live_service):
    return live_service


def _raw(port: int, request: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        return data


def test_a_body_over_the_cap_is_refused_before_it_is_read(live_server):
    port = live_server(ServeConfig())
    t0 = time.perf_counter()
    head = (
        b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 67108864\r\n\r\n"
    )  # claims 64 MB and sends none of it
    reply = _raw(port, head + b'{"text": ')
    assert reply.startswith(b"HTTP/1.1 413") and time.perf_counter() - t0 < 2, reply[:200]
    chunked = (
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"100000\r\n" + b" " * 0x100000 + b"\r\n") * 13
    )  # 13 MB with no Content-Length: cut off at 12 MB
    assert _raw(port, chunked).startswith(b"HTTP/1.1 413")


def test_a_full_queue_answers_503_with_retry_after_at_once(live_server, searcher, monkeypatch):
    import http.client

    cfg = ServeConfig(batch=BatchConfig(max_batch=1, max_wait_ms=0, max_queue=2))
    app = create_app({"toy": searcher}, cfg)
    batcher = app.state.served.batcher
    real = batcher.fn
    monkeypatch.setattr(batcher, "fn", lambda qs: time.sleep(0.5) or real(qs))  # a slow model
    port = live_server(cfg, app)

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.perf_counter()
        conn.request("GET", f"/search?q=query+{i}&k=3")
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Retry-After"), time.perf_counter() - t0

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    busy = [r for r in results if r[0] == 503]
    assert busy and all(r[1] and int(r[1]) >= 1 and r[2] < 0.4 for r in busy), results  # refused at once
    assert sum(r[0] == 200 for r in results) >= 3
    health = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    health.request("GET", "/health")
    assert health.getresponse().status == 200


# ---------------------------------------------------------------- access
KEY = "k" * 8 + "0123456789abcdef"


def test_api_key_is_required_on_every_route_but_health(searcher):
    c = api_client(create_app({"toy": searcher}, ServeConfig(api_key=KEY)))
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # the page is static: it logs in
    for url in ("/search?q=a", "/info", "/metrics", "/indices-list", "/thumb/0"):
        assert c.get(url).status_code == 401, url
    assert c.post("/knn-service", content=json.dumps(CLIP_CLIENT_BODY)).status_code == 401
    assert c.get("/search?q=a", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert c.get("/search?q=a", headers={"X-API-Key": KEY}).status_code == 200
    assert c.get("/search?q=a", headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.post(f"/knn-service?api_key={KEY}", content=json.dumps(CLIP_CLIENT_BODY)).status_code == 200  # ClipClient
    assert c.get(f"/search?q=a&api_key={KEY}").status_code == 401  # in a URL only where ClipClient needs it


def test_the_page_logs_in_with_a_cookie_that_is_not_the_key(searcher):
    c = api_client(create_app({"toy": searcher}, ServeConfig(api_key=KEY)))
    assert c.post("/login", data={"key": "wrong"}, follow_redirects=False).status_code == 401
    login = c.post("/login", data={"key": KEY}, follow_redirects=False)
    cookie = login.headers["set-cookie"]
    assert login.status_code == 303 and KEY not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/info").status_code == 200  # the cookie stands for the key
    tls = api_client(create_app({"toy": searcher}, ServeConfig(api_key=KEY)))
    tls.base_url = tls.base_url.copy_with(scheme="https")
    secure = tls.post("/login", data={"key": KEY}, follow_redirects=False).headers["set-cookie"]
    assert secure.startswith("__Host-") and "Secure" in secure and "Domain" not in secure


def test_short_keys_and_open_cors_without_a_key_are_refused(searcher):
    with pytest.raises(QueryError, match="16 characters"):
        create_app({"toy": searcher}, ServeConfig(api_key="s3cret"))
    with pytest.raises(QueryError, match="API key"):
        create_app({"toy": searcher}, ServeConfig(cors_origins=("*",)))
    assert create_app({"toy": searcher}, ServeConfig(cors_origins=("*",), api_key=KEY))
    assert create_app({"toy": searcher}, ServeConfig(cors_origins=("*",), insecure=True))


def test_a_public_address_needs_an_api_key_or_insecure(searcher):
    with pytest.raises(QueryError, match="--api-key"):
        serve({"toy": searcher}, ServeConfig(host="0.0.0.0"))


# ---------------------------------------------------------------- several indexes, metrics, per-call costs
def test_several_indexes_in_one_server(searcher, search_index):
    other = Searcher(searcher.model, search_index)
    c = api_client(create_app({"shapes": searcher, "copy": other}))
    assert c.get("/indices-list").json() == ["shapes", "copy"]
    a = c.get("/search", params={"q": "a red circle", "k": 3, "index": "copy"}).json()
    assert a["index"] == "copy" and len(a["results"]) == 3
    assert c.get("/info", params={"index": "copy"}).json()["name"] == "copy"
    assert c.get("/search", params={"q": "a", "index": "nope"}).status_code == 400


def test_metrics_in_prometheus_format(client):
    client.get("/search", params={"q": "a red circle", "k": 3})
    text = client.get("/metrics").text
    for series in (
        'retrieval_requests_total{method="GET",route="/search",status="200"}',
        "retrieval_request_seconds_bucket",
        'retrieval_batch_size_bucket{index="toy"',
        "retrieval_queue_depth ",
        'retrieval_index_items{index="toy"} 64.0',
    ):
        assert series in text, series


def test_classify_caches_label_embeddings(searcher, monkeypatch):
    app = create_app({"toy": searcher})
    engine = app.state.served.engines["toy"]
    encoded = []
    real = engine._texts
    monkeypatch.setattr(engine, "_texts", lambda texts: encoded.append(len(texts)) or real(texts))
    c = api_client(app)
    form = {"labels": "red square, green circle, blue triangle", "template": "a <>"}
    first = c.post("/classify", files={"image": ("x.png", png_bytes(), "image/png")}, data=form).json()
    second = c.post("/classify", files={"image": ("x.png", png_bytes(), "image/png")}, data=form).json()
    assert first == second and encoded == [3]  # the second request encoded no label


def test_the_tokenizer_is_built_once_per_model(searcher):
    from mmpretrain import api

    tok = searcher.model.tokenizer()
    assert searcher.model.tokenizer() is tok
    t0 = time.perf_counter()
    api.tokenize(searcher.model, ["a red circle"])
    assert time.perf_counter() - t0 < 0.02


def _clip_client_module():
    """clip-retrieval's clip_client.py, loaded alone (its package __init__ imports its whole back end)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval not installed (make test installs it: pip install --no-deps clip-retrieval)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_retrievals_own_client_works_against_us(live_server, searcher, tmp_path):
    """Peer parity: clip-retrieval's ClipClient, unchanged, queries our /knn-service by text, image file and
    embedding, with its defaults (dedup, safety and aesthetic options on, which we accept and ignore)."""
    port = live_server(ServeConfig())
    cc = _clip_client_module()
    client = cc.ClipClient(url=f"http://127.0.0.1:{port}/knn-service", indice_name="toy", num_images=8)
    by_text = client.query(text="a red circle")
    assert isinstance(by_text, list) and by_text, by_text
    assert all({"id", "similarity", "caption", "image"} <= set(r) for r in by_text)
    image = tmp_path / "q.png"
    image.write_bytes(png_bytes())
    assert client.query(image=str(image))
    vec = searcher.vectors(np.array([5]))[0].tolist()
    plain = cc.ClipClient(
        url=f"http://127.0.0.1:{port}/knn-service", indice_name="toy", num_images=3, deduplicate=False
    )
    assert plain.query(embedding_input=vec)[0]["id"] == 5


def test_cors_lets_clip_retrievals_front_end_use_us_from_elsewhere(searcher):
    c = api_client(create_app({"toy": searcher}, ServeConfig(cors_origins=("https://front.example",), api_key=KEY)))
    pre = c.options(
        "/knn-service", headers={"Origin": "https://front.example", "Access-Control-Request-Method": "POST"}
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://front.example"
    r = c.get(f"/indices-list?api_key={KEY}", headers={"Origin": "https://front.example"})
    assert r.json() == ["toy"] and r.headers["access-control-allow-origin"] == "https://front.example"
    other = c.get(f"/indices-list?api_key={KEY}", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert (
        "access-control-allow-origin"
        not in api_client(create_app({"toy": searcher}))
        .get("/indices-list", headers={"Origin": "https://front.example"})
        .headers
    )  # off unless configured
