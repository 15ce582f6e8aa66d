"""The real train.py on a tiny generated data set, with the real packaged text model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from aether.geo.pooling import pool_points
from aether.geo.raster import open_raster
from aether.model.checkpoint import Checkpoint
from tests.helpers.fixtures import poi_records, unit_field, write_config, write_csv, write_raster

ROOT = Path(__file__).resolve().parents[2]


def run_train(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "train.py", "--cfg", str(cfg), "--no-progress", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_end_to_end_then_cached(tmp_path):
    height, width = 40, 40
    raster = write_raster(tmp_path / "ae.tif", unit_field(height, width, seed=7), bottom_up=True)
    records = poi_records(60, height, width, seed=1)
    records.append({**records[0], "osm_id": "node/far", "lon": 0.0, "lat": 0.0})  # outside the raster
    pois = write_csv(tmp_path / "pois.csv", records)
    cfg = write_config(tmp_path / "cfg.yaml", raster, pois)

    first = run_train(cfg)
    assert first.returncode == 0, first.stderr
    assert "dropped 1 POIs: outside the raster" in first.stdout
    assert "text: encoded 60 of 60 unique descriptions" in first.stdout

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in (
        "train_loss",
        "val_ae_ae",
        "val_ae_poi",
        "val_t2ae_r1",
        "val_t2ae_r5",
        "val_t2ae_r10",
        "val_ae2t_r10",
        "lr",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key

    ckpt = Checkpoint.load(run / "last.pt")
    assert ckpt.epoch == 3
    assert (ckpt.n_bands, ckpt.base_radius_m, ckpt.aug_radius_m) == (64, 45.0, 95.0)
    assert {**ckpt.text.identity, "dim": ckpt.text.dim} == {
        "backend": "sentence-transformers",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "dimensions": None,
        "dim": 384,
    }
    assert ckpt.config.train.epochs == 3 and ckpt.metrics == rows[-1]
    best = Checkpoint.load(run / "best.pt")
    assert best.metrics["val_t2ae_r10"] == max(r["val_t2ae_r10"] for r in rows)

    # the checkpoint alone rebuilds the AE projector
    model = ckpt.build_model()
    info = open_raster(str(raster))
    pooled = pool_points(info, np.array([info.xy(5, 5)[0]]), np.array([info.xy(5, 5)[1]]), [45.0])
    with torch.no_grad():
        z = model.ae(torch.from_numpy(pooled.views[0]))
    assert z.shape == (1, 16) and abs(float(z.norm()) - 1) < 1e-5

    refused = run_train(cfg, "--set", "train.epochs=1")  # a trained model is data: not replaced without a word
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: run folder {run} already holds a trained model (best.pt, last.pt); continue it with --resume {run}, "
        f"train into another folder (--set train.run_dir=...), or replace it with --overwrite"
    ]
    assert Checkpoint.load(run / "last.pt").epoch == 3
    second = run_train(cfg, "--set", "train.epochs=1", "--overwrite")
    assert second.returncode == 0, second.stderr
    assert f"replacing {run / 'best.pt'} (--overwrite)" in second.stdout
    assert Checkpoint.load(run / "last.pt").epoch == 1
    assert "all 60 unique descriptions came from the cache" in second.stdout
    assert "encoding texts" not in second.stderr


def test_training_is_reproducible_and_works_below_one_batch(tmp_path):
    """12 POIs, batch size 256: one short batch per epoch; two runs give identical weights."""
    raster = write_raster(tmp_path / "ae.tif", unit_field(20, 20, seed=2), dtype="float32")
    pois = write_csv(tmp_path / "pois.csv", poi_records(12, 20, 20, seed=3))
    weights = []
    for name in ("a", "b"):
        cfg = write_config(
            tmp_path / f"{name}.yaml",
            raster,
            pois,
            train={"batch_size": 256, "epochs": 2, "run_dir": str(tmp_path / name)},
        )
        from aether.config.load import load_config
        from aether.train.loop import train

        train(load_config(cfg), progress=False)
        weights.append(Checkpoint.load(tmp_path / name / "last.pt").weights)
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)
