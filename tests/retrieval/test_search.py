"""retrieve.py and aether.retrieval.search: similarity maps, exact streaming top-k with suppression, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from matplotlib.image import imread
from rasterio.warp import transform as warp_transform

from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from aether.model.checkpoint import Checkpoint
from aether.retrieval.outputs import slug
from aether.retrieval.search import SearchOptions, retrieve
from aether.retrieval.topk import non_max_suppression, query_tile_px
from aether.text.encoders import SentenceTransformerEncoder
from tests.helpers.fixtures import stored_values, unit_field, write_raster, write_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[2]
HEIGHT_PX, WIDTH_PX, PIXEL_M = 48, 40, 10.0
QUERIES = ["quiet cafes near water", "a park with tall trees", "a bookshop"]


# ---- non-maximum suppression against hand-computed cases ------------------------------------


def test_nms_hand_computed():
    # five points on a line 0, 30, 60, 100, 250 m; scores make the greedy order 1, 0, 3, 2, 4
    x = np.array([0.0, 30.0, 60.0, 100.0, 250.0])
    y = np.zeros(5)
    scores = np.array([0.8, 0.9, 0.5, 0.7, 0.1])
    # radius 50: take 1 (suppresses 0 and 2: 30 m away), take 3 (70 m from 1), take 4
    assert non_max_suppression(scores, x, y, k=10, radius_m=50).tolist() == [1, 3, 4]
    # radius 0 is a plain ranking
    assert non_max_suppression(scores, x, y, k=3, radius_m=0).tolist() == [1, 0, 3]
    # radius 300 keeps one; k caps the count
    assert non_max_suppression(scores, x, y, k=10, radius_m=300).tolist() == [1]
    assert non_max_suppression(scores, x, y, k=1, radius_m=50).tolist() == [1]
    # a point exactly at the radius survives: only strictly closer points are suppressed
    assert non_max_suppression(np.array([1.0, 0.5]), np.array([0.0, 50.0]), np.zeros(2), k=2, radius_m=50).tolist() == [
        0,
        1,
    ]


def test_nms_projected_crs_in_feet_uses_metres():
    # 200 US survey feet = 61 m: within a 100 m radius although 200 > 100 in map units
    x, y, scores = np.array([0.0, 200.0, 400.0]), np.zeros(3), np.array([1.0, 0.9, 0.8])
    assert non_max_suppression(scores, x, y, k=3, radius_m=100, unit_m=0.3048006).tolist() == [0, 2]
    assert non_max_suppression(scores, x, y, k=3, radius_m=100).tolist() == [0, 1, 2]


def test_nms_ties_go_to_the_tiebreak_key():
    scores, x, y = np.array([0.5, 0.5, 0.5]), np.array([0.0, 10.0, 20.0]), np.zeros(3)
    assert non_max_suppression(scores, x, y, k=1, radius_m=0, tiebreak=np.array([2, 0, 1])).tolist() == [1]


def test_nms_geographic_uses_metres():
    # 0.001 degree of longitude at 60 N is about 55.8 m; of latitude about 111.4 m
    lon = np.array([25.0, 25.001, 25.0])
    lat = np.array([60.0, 60.0, 60.001])
    scores = np.array([1.0, 0.9, 0.8])
    assert non_max_suppression(scores, lon, lat, k=3, radius_m=60, geographic=True).tolist() == [0, 2]
    assert non_max_suppression(scores, lon, lat, k=3, radius_m=50, geographic=True).tolist() == [0, 1, 2]


def test_tile_shrinks_with_the_number_of_queries():
    assert query_tile_px(512, 1) == 512 and query_tile_px(512, 3) == 512
    assert query_tile_px(512, 100) == 400  # 100 x 400^2 x 4 B = 61 MiB <= 64 MiB
    assert query_tile_px(512, 10_000) == 32 and query_tile_px(512, 10**7) == 16
    for n in (64, 100, 1000):
        t = query_tile_px(512, n)
        assert t % 16 == 0 and n * t * t * 4 <= 64 * 2**20


def test_slug():
    assert slug("Quiet cafés, near water!") == "quiet-caf-s-near-water"
    assert slug("???") == "query"


# ---- end to end on a tiny generated raster ----------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrieval")
    values = unit_field(HEIGHT_PX, WIDTH_PX, seed=11, smooth=6)
    values[:, :3, :5] = np.nan  # a nodata corner
    ae = write_raster(folder / "ae.tif", values, bottom_up=True)
    ckpt = write_untrained_checkpoint(folder / "best.pt")
    emb = embed_raster(
        str(ae), str(ckpt), str(folder / "aether.tif"), progress=False, options=EmbedOptions(precision="fp32")
    )
    return ae, ckpt, emb


def query_vectors(ckpt: Path, texts: list[str]) -> np.ndarray:
    """The queries in latent space, from the checkpoint's model and the packaged MiniLM directly."""
    model = Checkpoint.load(ckpt).build_model()
    emb = SentenceTransformerEncoder().encode_batch(texts)
    with torch.no_grad():
        return model.text(torch.from_numpy(np.asarray(emb))).numpy()


def test_retrieve_cli_three_queries_one_pass(tmp_path, setup):
    ae, ckpt, emb = setup
    qfile = tmp_path / "queries.txt"
    qfile.write_text("# three queries\n" + "\n".join(QUERIES) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "retrieve.py",
            "--ckpt",
            str(ckpt),
            "--emb",
            str(emb),
            "--queries",
            str(qfile),
            "--out",
            str(out),
            "--top-k",
            "5",
            "--nms-m",
            "60",
            "--tile",
            "16",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "queries.json").read_text())
    assert [q["query"] for q in index["queries"]] == QUERIES
    assert len(list(out.glob("*.tif"))) == len(list(out.glob("*.geojson"))) == len(list(out.glob("*.png"))) == 3
    assert not list(out.glob(".*"))  # no temporary files left

    values, invalid = stored_values(emb)  # (latent, h, w) north-up, de-quantized independently
    q = query_vectors(ckpt, QUERIES)
    with rasterio.open(emb) as e:
        grid = (e.crs, e.transform, e.shape)
    for entry, qv in zip(index["queries"], q):
        with rasterio.open(out / entry["tif"]) as src:
            assert (src.crs, src.transform, src.shape) == grid
            assert src.descriptions[0] == f"cosine similarity: {entry['query']}"
            sim = src.read(1)
        expected = np.einsum("chw,c->hw", values, qv.astype(np.float64))
        np.testing.assert_array_equal(np.isnan(sim), invalid)
        np.testing.assert_allclose(sim[~invalid], expected[~invalid], atol=1e-5)

        # the hits: a brute-force greedy suppression over every pixel whose 9 x 9 base window (45 m of
        # 10 m pixels) the raster's edge does not cut gives the same places
        inner = np.zeros_like(invalid)
        inner[4:-4, 4:-4] = True
        rows, cols = np.nonzero(~invalid & inner)
        with rasterio.open(emb) as e:
            xs, ys = rasterio.transform.xy(e.transform, rows, cols)
        ref = non_max_suppression(sim[rows, cols].astype(np.float64), np.asarray(xs), np.asarray(ys), 5, 60.0)
        hits = json.loads((out / entry["geojson"]).read_text())["features"]
        assert [(h["properties"]["row"], h["properties"]["col"]) for h in hits] == list(zip(rows[ref], cols[ref]))
        scores = [h["properties"]["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and len(hits) == 5
        assert scores[0] == pytest.approx(float(np.nanmax(np.where(inner, sim, np.nan))), abs=1e-6)
        lon, lat = zip(*(h["geometry"]["coordinates"] for h in hits))
        x, y = warp_transform("EPSG:4326", grid[0], list(lon), list(lat))
        np.testing.assert_allclose(x, [h["properties"]["x"] for h in hits], atol=0.01)
        np.testing.assert_allclose(y, [h["properties"]["y"] for h in hits], atol=0.01)
        for i in range(len(hits)):
            for j in range(i):
                assert np.hypot(x[i] - x[j], y[i] - y[j]) >= 60.0 - 1e-6

        png = imread(out / entry["png"])
        assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100


def test_an_int16_aether_raster_ranks_as_on_the_fly(tmp_path, setup):
    """AETHER int16 (q / 32767) keeps scores within 1e-4 of on-the-fly retrieval and the same top
    places; the int8 raster's scores are up to its quantization off."""
    from aether.infer.pipeline import embed_raster

    ae, ckpt, _ = setup
    emb16 = embed_raster(
        str(ae),
        str(ckpt),
        str(tmp_path / "aether16.tif"),
        progress=False,
        options=EmbedOptions(dtype="int16", precision="fp32", device="cpu"),
    )
    kw = dict(progress=False, options=SearchOptions(top_k=5, precision="fp32", device="cpu", heatmaps=False))
    stored = retrieve(QUERIES, str(ckpt), str(tmp_path / "stored"), emb_tif=str(emb16), **kw)
    fly = retrieve(QUERIES, str(ckpt), str(tmp_path / "fly"), ae_tif=str(ae), **kw)
    for a, b in zip(stored, fly):
        with rasterio.open(a.tif) as sa, rasterio.open(b.tif) as sb:
            x, y = sa.read(1), sb.read(1)
        ok = ~np.isnan(y)
        np.testing.assert_array_equal(np.isnan(x), ~ok)
        assert np.abs(x[ok] - y[ok]).max() <= 1e-4
        assert [(h["row"], h["col"]) for h in a.hits] == [(h["row"], h["col"]) for h in b.hits]


def test_from_alphaearth_matches_from_aether_raster(tmp_path, setup):
    """--ae_tif embeds on the fly; the maps agree with the int8 AETHER raster's up to its quantization."""
    ae, ckpt, emb = setup
    a = retrieve(
        QUERIES[:1], str(ckpt), str(tmp_path / "a"), emb_tif=str(emb), progress=False, options=SearchOptions(top_k=3)
    )[0]
    b = retrieve(
        QUERIES[:1],
        str(ckpt),
        str(tmp_path / "b"),
        ae_tif=str(ae),
        progress=False,
        options=SearchOptions(top_k=3, tile_px=16),
    )[0]
    with rasterio.open(a.tif) as sa, rasterio.open(b.tif) as sb:
        x, y = sa.read(1), sb.read(1)
        assert sa.transform == sb.transform
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
    np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], atol=0.02)
