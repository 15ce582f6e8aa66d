"""`aether serve` over HTTP: tiles, questions and their top-k equal to `aether retrieve`'s, downloads,
"places like this", path traversal, bounds on requests, and one-line 4xx messages."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import rasterio
from PIL import Image
from threadpoolctl import threadpool_info

from tests.serve.conftest import aether


def wait_done(client: httpx.Client, qid: int) -> dict:
    for _ in range(600):
        body = client.get(f"/api/query/{qid}").json()
        if body["status"] != "searching":
            return body
        time.sleep(0.1)
    raise AssertionError("search did not finish")


def centre_tile(client: httpx.Client, z: int = 16) -> tuple[int, int, int]:
    import math

    (south, west), (north, east) = client.get("/api/info").json()["bounds"]
    lat, lon = (south + north) / 2, (west + east) / 2
    n = 2**z
    x = int((lon + 180) / 360 * n)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
    return z, x, y


def test_page_and_tiles(served):
    url, *_ = served
    with httpx.Client(base_url=url, timeout=60) as client:
        page = client.get("/")
        assert page.status_code == 200 and "leaflet.js" in page.text and "cdn" not in page.text.lower()
        assert client.get("/static/vendor/leaflet/leaflet.js").status_code == 200
        info = client.get("/api/info").json()
        assert info["layers"] == ["aether", "alphaearth"] and info["pois"] == 30
        z, x, y = centre_tile(client)
        for layer in ("aether", "alphaearth"):
            tile = client.get(f"/tiles/{layer}/{z}/{x}/{y}.png")
            assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
            rgba = np.asarray(Image.open(io.BytesIO(tile.content)))
            assert rgba.shape == (256, 256, 4) and (rgba[..., 3] == 255).any()  # pixels of the raster
        far = client.get("/tiles/aether/16/0/0.png")  # off the raster: transparent
        assert far.status_code == 200 and (np.asarray(Image.open(io.BytesIO(far.content)))[..., 3] == 0).all()


def test_query_top_k_and_downloads_equal_aether_retrieve(served, tmp_path):
    url, tmp, ckpt, emb = served
    text = "a quiet cafe near the water"
    with httpx.Client(base_url=url, timeout=60) as client:
        asked = client.post("/api/query", json={"text": text})
        assert asked.status_code == 200, asked.text
        qid = asked.json()["id"]
        low, high = asked.json()["range"]
        assert low < high
        z, x, y = centre_tile(client)
        heat = client.get(f"/tiles/q/{qid}/{z}/{x}/{y}.png")  # drawn at once, before the search ends
        assert heat.status_code == 200
        done = wait_done(client, qid)
        assert done["status"] == "done" and len(done["places"]) == 5
        tif = client.get(f"/api/query/{qid}/heatmap.tif")
        geojson = client.get(f"/api/query/{qid}/places.geojson")
        assert tif.status_code == 200 and geojson.status_code == 200
    out = tmp_path / "retrieve"
    ran = aether("retrieve", "--ckpt", str(ckpt), "--emb", str(emb), "--query", text, "--out", str(out), "--top-k", "5",
                 "--nms-m", "50", "--no-progress")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    theirs = json.loads(next(out.glob("q01_*.geojson")).read_text())
    ours = json.loads(geojson.content)
    assert [f["properties"] for f in ours["features"]] == [f["properties"] for f in theirs["features"]]
    assert [f["geometry"] for f in ours["features"]] == [f["geometry"] for f in theirs["features"]]
    assert [round(p["score"], 6) for p in done["places"]] == [f["properties"]["score"] for f in theirs["features"]]
    with rasterio.open(io.BytesIO(tif.content)) as a, rasterio.open(next(out.glob("q01_*.tif"))) as b:
        assert np.array_equal(a.read(), b.read(), equal_nan=True) and a.transform == b.transform


def test_places_like_this(served):
    url, *_ = served
    with httpx.Client(base_url=url, timeout=60) as client:
        (south, west), (north, east) = client.get("/api/info").json()["bounds"]
        lon, lat = (west + east) / 2, (south + north) / 2
        liked = client.post(f"/api/like?lon={lon}&lat={lat}")
        assert liked.status_code == 200, liked.text
        body = wait_done(client, liked.json()["id"])
        assert body["text"].startswith("places like") and body["places"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        off = client.post("/api/like?lon=0&lat=0")
        assert off.status_code == 400 and "no valid pixel" in off.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd",
        "/static/..%5c..%5capp.py",
        "/static//etc/passwd",
        "/static/%252e%252e/app.py",
        "/tiles/aether/../../app.py",
        "/api/query/1/..%2f..%2fckpt.pt",
        "/../../etc/passwd",
    ],
)
def test_no_route_reads_another_file(served, path):
    url, *_ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get(path)
    assert response.status_code in (400, 404, 405)
    assert b"root:" not in response.content and b"import" not in response.content


def test_bad_requests_get_a_4xx_with_a_message(served):
    url, *_ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        cases = [
            (client.post("/api/query", json={"text": "x" * 2000}), 422, "at most"),
            (client.post("/api/query", json={"text": "word " * 200}), 400, "at most 300"),
            (client.post("/api/query", json={"text": "   "}), 400, "empty"),
            (client.post("/api/query", content=b"{not json", headers={"content-type": "application/json"}), 422, ""),
            (client.get("/tiles/aether/30/0/0.png"), 404, "no tile"),
            (client.get("/tiles/nolayer/1/0/0.png"), 404, "no layer"),
            (client.get("/tiles/aether/2/9/0.png"), 404, "no tile"),
            (client.get("/api/query/99999"), 404, "no query"),
            (client.post("/api/like?lon=abc&lat=1"), 422, "lon"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert isinstance(error, str) and message in error and "Traceback" not in error


def test_two_tabs_asking_at_once_both_get_answers(served):
    url, *_ = served
    answers = {}

    def tab(text: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            qid = client.post("/api/query", json={"text": text}).json()["id"]
            answers[text] = wait_done(client, qid)

    threads = [threading.Thread(target=tab, args=(t,)) for t in ("a park with trees", "a busy shopping street")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a["status"] == "done" and len(a["places"]) == 5 for a in answers.values())


def test_numpy_blas_runs_one_thread_while_serving(served):
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]  # the server runs in this process
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
