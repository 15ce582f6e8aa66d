"""The downstream comparison on zone labels: spatially disjoint folds, chance for shuffled labels,
KL by hand, soft-label fitting, and `aether evaluate --labels` end to end with its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import geopandas
import numpy as np
import pytest
import shapely

from aether.data.dataset import spatial_blocks
from aether.evaluation.downstream import _shares, fold_metrics, kl_divergence, prior_metrics
from aether.evaluation.probes import spatial_folds
from tests.helpers.fixtures import ORIGIN, UTM, unit_field, write_raster, write_untrained_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def zones_data(n: int = 600, seed: int = 0):
    """Points over about 3 x 3 km near Helsinki, features that determine a 3-class label."""
    rng = np.random.default_rng(seed)
    lon = 24.9 + rng.uniform(0, 0.05, n)
    lat = 60.15 + rng.uniform(0, 0.027, n)
    x = rng.standard_normal((n, 12))
    label = np.array(["park", "shop", "home"])[np.argmax(x[:, :3], axis=1)]
    return lon, lat, x, label


def test_folds_keep_whole_blocks_and_are_disjoint():
    lon, lat, _, _ = zones_data()
    folds = spatial_folds(lon, lat, 500, 5, 0)
    _, block_of = spatial_blocks(lon, lat, 500)
    for b in np.unique(block_of):
        assert len(np.unique(folds[block_of == b])) == 1  # a block's zones lie in one fold
    assert len(np.unique(folds)) == 5


def test_learnable_labels_score_well_and_shuffled_ones_at_chance():
    lon, lat, x, label = zones_data()
    folds = spatial_folds(lon, lat, 500, 5, 0)
    classes = sorted(set(label))
    learned = np.mean([f["macro_f1"] for f in fold_metrics(x, label, folds, "classification", classes)])
    shuffled = np.random.default_rng(1).permutation(label)
    chance = np.mean([f["macro_f1"] for f in fold_metrics(x, shuffled, folds, "classification", classes)])
    assert learned > 0.85
    assert abs(chance - 1 / 3) < 0.08  # three balanced classes
    prior = np.mean([f["accuracy"] for f in prior_metrics(label, folds, "classification")])
    assert prior < 0.45


def test_regression_r2_high_for_a_linear_target_and_near_zero_shuffled():
    lon, lat, x, _ = zones_data()
    y = x[:, 0] * 2 + x[:, 1] + 0.1 * np.random.default_rng(2).standard_normal(len(x))
    folds = spatial_folds(lon, lat, 500, 5, 0)
    r2 = np.mean([f["r2"] for f in fold_metrics(x, y, folds, "regression", ["y"])])
    shuffled = np.mean(
        [f["r2"] for f in fold_metrics(x, np.random.default_rng(3).permutation(y), folds, "regression", ["y"])]
    )
    assert r2 > 0.95 and shuffled < 0.05


def test_kl_by_hand_and_soft_labels_fitted():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = np.array([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]])
    np.testing.assert_allclose(kl_divergence(p, q), [np.log(2), np.log(2)])
    assert kl_divergence(p, p).tolist() == [0.0, 0.0]
    # shares that follow the features are learnt from soft labels: far better than the mean share
    lon, lat, x, _ = zones_data(400)
    logits = x[:, :3] * 2
    shares = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    train, test = np.arange(300), np.arange(300, 400)
    q = _shares(x[train], shares[train], x[test])
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    learned = kl_divergence(shares[test], q).mean()
    mean_share = np.broadcast_to(shares[train].mean(axis=0), shares[test].shape)
    assert learned < 0.25 * kl_divergence(shares[test], mean_share).mean()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A raster, an untrained checkpoint and 24 labelled square zones over the raster (UTM)."""
    tmp = tmp_path_factory.mktemp("labels")
    raster = write_raster(tmp / "ae.tif", unit_field(60, 80, seed=4))
    ckpt = write_untrained_checkpoint(tmp / "ckpt.pt")
    left, top = ORIGIN
    boxes, kind, shares = [], [], []
    for i in range(6):
        for j in range(4):
            boxes.append(shapely.box(left + i * 130 + 5, top - (j + 1) * 145, left + (i + 1) * 130, top - j * 145 - 5))
            kind.append("west" if i < 3 else "east")
            s = np.array([i + 1.0, j + 1.0, 2.0])
            shares.append(s / s.sum())
    shares = np.array(shares)
    frame = geopandas.GeoDataFrame(
        {
            "kind": kind,
            "value": np.arange(24.0),
            "share_a": shares[:, 0],
            "share_b": shares[:, 1],
            "share_c": shares[:, 2],
        },
        geometry=boxes,
        crs=UTM,
    )
    frame.to_file(tmp / "zones.geojson", driver="GeoJSON")
    return tmp, raster, ckpt, tmp / "zones.geojson"


def evaluate(ckpt, raster, *args):
    return subprocess.run(
        [sys.executable, "-m", "aether.cli.main", "evaluate", "--ckpt", str(ckpt), "--ae_tif", str(raster), *args,
         "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_evaluate_labels_classification_with_zero_shot_and_distribution(labelled):
    tmp, raster, ckpt, zones = labelled
    out = tmp / "cls"
    done = evaluate(ckpt, raster, "--labels", str(zones), "--target", "kind", "--zero-shot", "--block-m", "150",
                    "--folds", "3", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "labels.json").read_text())
    assert m["zones"] == 24 and m["folds"] == 3 and m["classes"] == ["east", "west"]
    assert set(m["features"]) == {"alphaearth", "aether", "untrained"}
    for name in m["features"]:
        assert 0 <= m["features"][name]["macro_f1"]["mean"] <= 1 and len(m["features"][name]["accuracy"]["folds"]) == 3
    assert 0 <= m["zero_shot"]["accuracy"] <= 1 and m["zero_shot"]["prompt"] == "a place of {label}"
    change = m["relative_change_vs_alphaearth_pct"]["aether"]["macro_f1"]
    base, ours = m["features"]["alphaearth"]["macro_f1"]["mean"], m["features"]["aether"]["macro_f1"]["mean"]
    assert change == pytest.approx(100 * (ours - base) / base)
    assert "| macro-F1 |" in done.stdout and "Zero-shot from words" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "labels.md", "labels.png"]

    out = tmp / "dist"
    done = evaluate(ckpt, raster, "--labels", str(zones), "--target", "share_*", "--task", "distribution",
                    "--block-m", "150", "--folds", "3", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "labels.json").read_text())
    assert m["target"] == ["share_a", "share_b", "share_c"] and m["features"]["aether"]["kl"]["mean"] >= 0
    assert "| KL divergence |" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "nope"], "has no column 'nope'"),
        (["--target", "share_a,share_b", "--task", "distribution"], "summing to 1"),
        (["--target", "value", "--task", "regression", "--zero-shot"], "--zero-shot classifies zones"),
        (["--target", "kind", "--zero-shot", "--prompt", "a place"], "--prompt must contain {label}"),
        (["--target", "kind", "--folds", "1"], "--folds must be at least 2"),
        (["--task", "classification"], "--labels needs --target"),
    ],
)
def test_bad_labels_are_one_line(labelled, tmp_path, args, message):
    _, raster, ckpt, zones = labelled
    done = evaluate(ckpt, raster, "--labels", str(zones), *args, "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "o").exists()
