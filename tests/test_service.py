"""The search service's HTTP API (FastAPI TestClient): results, limits and bad input as 4xx."""

from __future__ import annotations

import pytest

from retrieval.jobs.search import Searcher
from retrieval.serve.service import ServeConfig, create_app
from tests.conftest import api_client, png_bytes


@pytest.fixture(scope="module")
def client(search_index):
    return api_client(create_app(Searcher.open(search_index), ServeConfig(max_upload_bytes=50_000)))


def test_health_info_page_and_openapi(client, search_index):
    assert client.get("/health").json() == {"status": "ok"}  # nothing about the index without a key
    info = client.get("/info").json()
    assert info["ntotal"] == 64 and info["index_type"] == "flat" and info["recall@10"] == 1.0
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text
    assert client.get("/openapi.json").status_code == 404 and client.get("/docs").status_code == 404  # off by default
    docs = api_client(create_app(Searcher.open(search_index), ServeConfig(docs=True)))
    assert "/search" in docs.get("/openapi.json").json()["paths"] and docs.get("/docs").status_code == 200


def test_search_returns_ranked_hits_with_thumbnails(client):
    body = client.get("/search", params={"q": "a red circle", "k": 5}).json()
    hits = body["results"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == list(range(5))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    thumb = client.get(hits[0]["thumbnail"])
    assert (
        thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    )
    batch = client.post("/search", json={"queries": ["a red circle", "a green square"], "k": 3}).json()
    assert len(batch["results"]) == 2 and batch["results"][0] == hits[:3]


@pytest.mark.parametrize(
    "url, status, message",
    [
        ("/search?q=&k=3", 400, "empty query"),
        ("/search?q=%20%20&k=3", 400, "empty query"),
        ("/search?q=%FF%FE&k=3", 400, "UTF-8"),
        ("/search?q=x&k=100000", 400, "k must be"),
        ("/search?q=x&k=0", 400, "k must be"),
        ("/search?q=x&k=ten", 422, ""),
        ("/search?q=" + "a" * 600, 400, "longer than"),
        ("/search?k=3", 422, ""),
        ("/thumb/64", 404, "no item"),
        ("/thumb/-1", 404, "no item"),
        ("/thumb/..%2F..%2Fetc%2Fpasswd", 404, ""),
        ("/thumb/%2Fetc%2Fpasswd", 404, ""),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client, url, status, message):
    r = client.get(url)
    assert r.status_code == status, r.text
    assert message in str(r.json()["detail"])


def test_bad_post_bodies(client):
    assert client.post("/search", json={"queries": [], "k": 3}).status_code == 400
    assert client.post("/search", json={"queries": ["x"] * 300}).status_code == 400
    bad = client.post("/search", content=b'{"queries": ["\xff"]}', headers={"content-type": "application/json"})
    assert bad.status_code in (400, 422)
    assert client.get("/health").status_code == 200  # still serving


def test_classify_an_upload(client):
    r = client.post(
        "/classify",
        files={"image": ("x.png", png_bytes(), "image/png")},
        data={"labels": "red square, green circle\nblue triangle", "template": "a <>"},
    )
    preds = r.json()["predictions"]
    assert r.status_code == 200 and {p["label"] for p in preds} == {"red square", "green circle", "blue triangle"}
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-4


@pytest.mark.parametrize(
    "files, data, status, message",
    [
        ({"image": ("x.png", b"not an image", "image/png")}, {"labels": "a"}, 400, "not a readable image"),
        ({"image": ("x.png", b"", "image/png")}, {"labels": "a"}, 400, "empty upload"),
        ({"image": ("x.png", b"\x89PNG" + b"0" * 60_000, "image/png")}, {"labels": "a"}, 413, "larger than"),
        ({"image": ("x.png", png_bytes(), "image/png")}, {"labels": " , \n"}, 400, "at least one label"),
        ({"image": ("x.png", png_bytes(), "image/png")}, {"labels": ",".join(map(str, range(300)))}, 400, "at most"),
        ({"image": ("x.png", png_bytes(), "image/png")}, {"labels": "a", "template": "no placeholder"}, 400, "<>"),
        ({}, {"labels": "a"}, 422, ""),
    ],
)
def test_bad_uploads_are_4xx(client, files, data, status, message):
    r = client.post("/classify", files=files, data=data)
    assert r.status_code == status, r.text
    assert message in str(r.json()["detail"])


def test_decompression_bombs_are_refused():
    import io

    from PIL import Image

    from retrieval.jobs.search import QueryError
    from retrieval.serve.uploads import read_image

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # small file, 9 megapixels
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(QueryError, match="too large"):
        read_image(buf.getvalue(), 4_000_000)
    assert read_image(buf.getvalue(), ServeConfig().max_image_pixels).size == (3000, 3000)
