"""evaluate.py and its metrics: hand-computed ranking and chance values, the probe folds, and the
real command end to end on a tiny model trained by the real train.py."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from aether.evaluation.localisation import localisation
from aether.evaluation.probes import ProjectorPair, linear_probe, spatial_folds
from aether.evaluation.scores import average_precision, chance_average_precision, chance_mrr, chance_recall
from aether.geo.raster import metres_per_degree
from aether.infer.spec import EmbedOptions
from tests.helpers.fixtures import ORIGIN, UTM, poi_records, unit_field, write_config, write_csv, write_raster

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )


# ----- ranking metrics -----


def test_average_precision_hand_cases():
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # relevant at ranks 2 and 4: (1/2 + 2/4) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.6], [0, 1, 0, 1]) == pytest.approx(0.5)
    # a tie does not help: the relevant item shares its cut-off with a non-relevant one
    assert average_precision([1.0, 1.0, 0.0], [0, 1, 0]) == pytest.approx(0.5)
    assert average_precision([1.0, 1.0, 0.0], [1, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average_precision([1.0, 0.0], [0, 0])


def test_average_precision_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 30).astype(float)  # many ties
        relevant = rng.random(30) < 0.3
        relevant[0] = True
        assert average_precision(scores, relevant) == pytest.approx(average_precision_score(relevant, scores))


def test_chance_values_by_hand_and_by_enumeration():
    assert chance_recall(374, 10) == pytest.approx(10 / 374)
    assert chance_recall(4, 10) == 1.0
    assert chance_mrr(3) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # n = 3, two relevant: rankings 110, 101, 011 give AP 1, 5/6, 7/12
    assert chance_average_precision(3, 2) == pytest.approx((1 + 5 / 6 + 7 / 12) / 3)
    assert chance_average_precision(7, 1) == pytest.approx(chance_mrr(7))
    assert chance_average_precision(6, 6) == pytest.approx(1.0)
    # every distinct ranking of 6 items, 1..6 of them relevant, is equally likely
    for n_rel in range(1, 7):
        aps = [
            average_precision(-np.arange(6.0), np.isin(np.arange(6), pos))
            for pos in itertools.combinations(range(6), n_rel)
        ]
        assert chance_average_precision(6, n_rel) == pytest.approx(np.mean(aps))


# ----- probe folds -----


def _lonlat(x_m: np.ndarray, y_m: np.ndarray):
    """Points given in metres from lon/lat (0, 0), as lon/lat: near the equator the folds' metric
    grid (metres per degree at the mean latitude) is this grid, to well under a millimetre."""
    m_lat, m_lon = metres_per_degree(np.asarray(0.0))
    lat = np.asarray(y_m) / m_lat
    m_lat, m_lon = metres_per_degree(np.asarray(np.mean(lat)))
    return np.asarray(x_m) / m_lon, np.asarray(y_m) / m_lat


def test_spatial_folds_keep_blocks_whole_and_balance_them():
    # four 100 m blocks holding 5, 3, 2 and 2 points (points 10-30 m inside each block)
    centres = [(1050, 1050), (1250, 1050), (1050, 1250), (1250, 1250)]
    sizes = [5, 3, 2, 2]
    x = np.concatenate([np.full(s, cx) + np.linspace(-30, 30, s) for (cx, _), s in zip(centres, sizes)])
    y = np.concatenate([np.full(s, cy) + np.linspace(-30, 30, s) for (_, cy), s in zip(centres, sizes)])
    block = np.repeat(np.arange(4), sizes)
    lon, lat = _lonlat(x, y)
    for seed in range(5):
        folds = spatial_folds(lon, lat, 100.0, 2, seed)
        for b in range(4):
            assert len(set(folds[block == b])) == 1  # a block is never split
        # largest first to the emptiest fold: {5, 2} and {3, 2}
        assert sorted(np.bincount(folds)) == [5, 7]
    assert len(np.unique(spatial_folds(lon, lat, 100.0, 10, 0))) == 4  # no more folds than blocks
    assert np.array_equal(spatial_folds(lon, lat, 100.0, 2, 3), spatial_folds(lon, lat, 100.0, 2, 3))


def test_pixel_folds_are_blocked_and_probe_uses_one_fold_array():
    # a 20 x 20 grid of 10 m pixels; blocks of 50 m hold 5 x 5 pixels
    rows, cols = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    x, y = cols.ravel() * 10.0 + 5.0, -(rows.ravel() * 10.0 + 5.0) + 1000.0
    lon, lat = _lonlat(x, y)
    folds = spatial_folds(lon, lat, 50.0, 4, 0)
    block = (rows.ravel() // 5) * 4 + cols.ravel() // 5
    for b in np.unique(block):
        assert len(set(folds[block == b])) == 1
    assert sorted(np.bincount(folds)) == [100, 100, 100, 100]

    # the label is the block's column band: features that copy the label are perfect under any
    # fold; the same features under two names score the same, on the same folds
    labels = np.array(["west", "east"])[(cols.ravel() >= 10).astype(int)]
    onehot = np.stack([labels == "west", labels == "east"], axis=1).astype(float)
    noise = np.random.default_rng(0).standard_normal((400, 3))
    scores = linear_probe({"a": np.c_[onehot, noise], "b": np.c_[onehot, noise]}, labels, folds)
    assert scores["a"] == scores["b"] == pytest.approx(1.0)

    # a label that is constant per block cannot be learnt across blocks: blocked folds
    # never show the test block's class in training, so macro-F1 is 0, not the leaked 1
    block_labels = np.array([f"block{b}" for b in block])
    block_feature = np.c_[x // 50, y // 50] + 0.01 * noise[:, :2]
    assert linear_probe({"xy": block_feature}, block_labels, folds)["xy"] == 0.0


# ----- end to end -----


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by the real train.py, and its inputs."""
    tmp = tmp_path_factory.mktemp("eval")
    height, width = 40, 40
    raster = write_raster(tmp / "ae.tif", unit_field(height, width, seed=7))
    pois = write_csv(tmp / "pois.csv", poi_records(80, height, width, seed=1))
    cfg = write_config(
        tmp / "cfg.yaml", raster, pois, data={"val_block_m": 100, "val_fraction": 0.3}, train={"epochs": 2}
    )
    result = run_script("train.py", "--cfg", str(cfg), "--no-progress")
    assert result.returncode == 0, result.stderr
    return tmp


def write_landuse(path: Path, column: str = "landuse") -> Path:
    """Two classes: the raster's west and east halves (EPSG:4326 GeoJSON)."""
    import geopandas
    from shapely.geometry import box

    left, top = ORIGIN
    west, east = box(left, top - 400, left + 200, top), box(left + 200, top - 400, left + 400, top)
    frame = geopandas.GeoDataFrame({column: ["residential", "commercial"]}, geometry=[west, east], crs=UTM)
    frame.to_crs("EPSG:4326").to_file(path, driver="GeoJSON")
    return path


def test_evaluate_end_to_end(trained):
    landuse = write_landuse(trained / "landuse.geojson")
    out = trained / "report"
    result = run_script(
        "evaluate.py",
        "--ckpt",
        str(trained / "run" / "best.pt"),
        "--out",
        str(out),
        "--landuse",
        str(landuse),
        "--search-radius-m",
        "100",
        "--min-category-pois",
        "3",
        "--folds",
        "3",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]  # no temporary files left
    m = json.loads((out / "metrics.json").read_text())
    n = m["data"]["held_out"]
    assert 2 <= n < 80
    chance = m["retrieval"]["chance"]
    assert chance["t2ae_r5"] == pytest.approx(5 / n) and chance["ae2t_mrr"] == pytest.approx(chance_mrr(n))
    for model in ("trained", "untrained"):
        assert all(0.0 <= v <= 1.0 for v in m["retrieval"][model].values())
    cats = m["category_retrieval"]
    assert cats["n_categories"] == 4  # the fixtures' four categories, each with 3 or more held-out POIs
    assert cats["categories"][0]["query"] == "A place of cafe, a type of amenity."
    for c in cats["categories"]:
        assert c["ap"]["chance"] == pytest.approx(chance_average_precision(n, c["n"]))
    loc = m["localisation"]
    assert loc["n"] == n and loc["search_radius_m"] == 100
    for model in ("trained", "untrained", "chance"):
        assert loc[model]["acc_250m"] == 1.0 and loc[model]["acc_50m"] <= loc[model]["acc_100m"]
    probes = m["probes"]
    assert probes["landuse"]["classes"] == ["commercial", "residential"] and probes["landuse"]["folds"] == 3
    assert set(probes["landuse"]["macro_f1"]) == {"alphaearth", "aether", "untrained"}
    assert probes["poi_category_group"]["classes"] == ["amenity", "leisure", "shop"]
    table = (out / "metrics.md").read_text()
    assert "| metric | trained | untrained | chance |" in table
    assert "| text-to-AE Recall@10 |" in table and "land use per pixel" in table
    assert "within 50 m (search radius 100 m)" in table and "within 250 m" not in table  # 1.0 for all: left out
    assert "| text-to-AE Recall@10 |" in result.stdout  # the table is printed too


def test_localisation_scores_the_inference_output(trained):
    """The best pixel found by `localisation` is the best pixel of the raster that inference writes."""
    from aether.geo.raster import open_raster
    from aether.infer.pipeline import embed_raster
    from aether.model.projector import Projector

    ckpt = trained / "run" / "best.pt"
    embed_raster(
        str(trained / "ae.tif"),
        str(ckpt),
        str(trained / "aether.tif"),
        progress=False,
        options=EmbedOptions(dtype="float32"),
    )
    with rasterio.open(trained / "aether.tif") as src:
        aether = src.read().transpose(1, 2, 0)
    projector = Projector(ckpt, device="cpu", precision="fp32")
    pair = ProjectorPair("trained", projector.checkpoint.build_model())
    info = open_raster(str(trained / "ae.tif"))
    rng = np.random.default_rng(0)
    rows_all, cols_all = np.meshgrid(np.arange(info.height), np.arange(info.width), indexing="ij")
    px, py = info.xy(rows_all, cols_all)
    for _i in range(3):
        x0, y0 = ORIGIN[0] + rng.uniform(50, 350), ORIGIN[1] - rng.uniform(50, 350)
        query = rng.standard_normal((1, projector.latent_dim)).astype(np.float32)  # any latent vector will do
        got = localisation(
            info,
            np.array([x0]),
            np.array([y0]),
            np.array([60.17]),
            projector.base_radius_m,
            {"trained": query},
            {"trained": pair},
            80.0,
            progress=False,
        )
        dist = np.hypot(px - x0, py - y0)
        scores = np.where(dist <= 80.0, aether @ query[0], -np.inf)
        best = np.unravel_index(np.argmax(scores), scores.shape)
        assert got["trained"]["median_m"] == pytest.approx(dist[best], abs=1e-6)
        inside = dist <= 80.0
        assert got["chance"]["acc_50m"] == pytest.approx(np.mean(dist[inside] <= 50))
        assert got["chance"]["mean_m"] == pytest.approx(dist[inside].mean())


def test_bad_inputs_exit_2_with_one_line_and_no_output(trained, tmp_path):
    out = tmp_path / "report"
    missing = run_script("evaluate.py", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(out))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"]

    landuse = write_landuse(tmp_path / "landuse.geojson", column="class")
    no_column = run_script(
        "evaluate.py",
        "--ckpt",
        str(trained / "run" / "best.pt"),
        "--out",
        str(out),
        "--landuse",
        str(landuse),
        "--landuse-column",
        "landuse",
    )
    assert no_column.returncode == 2
    lines = no_column.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: land-use file") and "'landuse'" in lines[0]
    assert "class" in lines[0]  # names the columns it has
    assert not out.exists()


def test_no_text_runs_the_probes_without_the_checkpoints_text_encoder(trained, tmp_path):
    """A checkpoint whose text encoder cannot be reached here (OpenAI, no key): the full evaluation
    stops in one line, `--no-text` runs the probes offline, and they equal a full run's probes."""
    from aether.model.checkpoint import Checkpoint, TextSpec

    landuse = write_landuse(tmp_path / "landuse.geojson")
    ckpt = Checkpoint.load(trained / "run" / "best.pt")
    ckpt.text = TextSpec("openai", "text-embedding-3-large", 384, ckpt.text.dim)
    openai_ckpt = tmp_path / "openai.pt"
    ckpt.save(openai_ckpt)
    common = ["--landuse", str(landuse), "--min-category-pois", "3", "--folds", "3", "--no-progress"]
    env = {k: v for k, v in ENV.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}

    def evaluate(ckpt_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "evaluate.py", "--ckpt", str(ckpt_path), "--out", str(out), *common, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    refused = evaluate(openai_ckpt, tmp_path / "refused")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "OPENAI_API_KEY" in refused.stderr
    assert not (tmp_path / "refused").exists()

    probes_only = evaluate(openai_ckpt, tmp_path / "probes", "--no-text")
    assert probes_only.returncode == 0, probes_only.stderr
    full = evaluate(trained / "run" / "best.pt", tmp_path / "full", "--search-radius-m", "100")
    assert full.returncode == 0, full.stderr
    m = json.loads((tmp_path / "probes" / "metrics.json").read_text())
    assert m["retrieval"] is None and m["category_retrieval"] is None and m["localisation"] is None
    assert m["probes"] == json.loads((tmp_path / "full" / "metrics.json").read_text())["probes"]
    assert set(m["probes"]["landuse"]["macro_f1"]) == {"alphaearth", "aether", "untrained"}
    table = (tmp_path / "probes" / "metrics.md").read_text()
    assert "land use per pixel" in table and "Recall@10" not in table


@pytest.mark.parametrize("bottom_up", [False, True])
def test_landuse_samples_windowed_match_pixel_centres(tmp_path, monkeypatch, bottom_up):
    """Land-use pixels are burnt window by window; every pixel whose centre lies in a polygon is found
    with its class (checked point by point with shapely), and a small quota is a subset of them."""
    import geopandas as gpd
    from shapely.geometry import Point, box

    import aether.evaluation.probes as evaluation
    from aether.geo.raster import open_raster
    from tests.helpers.fixtures import ORIGIN, unit_field, write_raster

    height, width = 30, 40
    info = open_raster(str(write_raster(tmp_path / "ae.tif", unit_field(height, width), bottom_up=bottom_up)))
    x0, y0 = ORIGIN
    polys = [
        box(x0 + 12, y0 - 183, x0 + 157, y0 - 21),
        box(x0 + 201, y0 - 297, x0 + 388, y0 - 144),
    ]  # no edge on a centre
    layer = gpd.GeoDataFrame({"landuse": ["park", "retail"]}, geometry=polys, crs=info.crs)
    rows, cols, labels = evaluation.landuse_samples(
        layer, "landuse", info, per_class=10_000, min_pixels=1, seed=0, window_rows=7
    )
    xs, ys = info.xy(rows, cols)
    expected = {}
    for r in range(height):
        for c in range(width):
            x, y = info.xy(np.array([r]), np.array([c]))
            for name, poly in zip(["park", "retail"], polys):
                if poly.contains(Point(float(x[0]), float(y[0]))):
                    expected[(r, c)] = name
    assert dict(zip(zip(rows.tolist(), cols.tolist()), labels.tolist())) == expected
    r5, c5, l5 = evaluation.landuse_samples(layer, "landuse", info, per_class=5, min_pixels=1, seed=0, window_rows=7)
    assert sorted(l5.tolist()) == ["park"] * 5 + ["retail"] * 5
    assert all(expected[(r, c)] == lab for r, c, lab in zip(r5.tolist(), c5.tolist(), l5.tolist()))
