"""A refused training run leaves nothing behind: no run folder, no text cache (the cache is made
on its first write, and too few POIs are refused before any text is encoded)."""

from __future__ import annotations

from tests.helpers.fixtures import poi_records, run_script_in_process, unit_field, write_config, write_csv, write_raster


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_too_few_pois_leave_no_run_folder_and_no_cache(tmp_path, monkeypatch, capsys):
    raster = write_raster(tmp_path / "ae.tif", unit_field(20, 20))
    pois = write_csv(tmp_path / "pois.csv", poi_records(1, 20, 20))
    cfg = write_config(tmp_path / "cfg.yaml", raster, pois)
    before = _listing(tmp_path)
    code, _, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and "only 1 training POIs" in err, err
    assert _listing(tmp_path) == before  # no run/, no cache/


def test_a_missing_text_model_leaves_no_run_folder_and_no_cache(tmp_path, monkeypatch, capsys):
    raster = write_raster(tmp_path / "ae.tif", unit_field(20, 20))
    pois = write_csv(tmp_path / "pois.csv", poi_records(20, 20, 20))
    cfg = write_config(tmp_path / "cfg.yaml", raster, pois, text={"model": str(tmp_path / "no_such_model")})
    before = _listing(tmp_path)
    code, _, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and "not available offline" in err, err
    assert _listing(tmp_path) == before


def test_a_split_too_small_to_validate_writes_no_best_checkpoint(tmp_path, monkeypatch, capsys):
    """Four POIs far apart: the spatial split holds one validation POI, too few to score, so no
    best.pt is chosen (on training loss it would mean nothing); the run says so and keeps last.pt."""
    raster = write_raster(tmp_path / "ae.tif", unit_field(40, 40))
    records = poi_records(4, 40, 40, seed=3)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        raster,
        write_csv(tmp_path / "pois.csv", records),
        data={"val_block_m": 50, "val_fraction": 0.2},
        train={"epochs": 1},
    )
    code, out, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    assert "1 validation POIs" in out and "too few to score: no best.pt is written" in out, out
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run" / "best.pt").exists()


def test_csv_coordinates_that_cannot_be_degrees_are_one_line(tmp_path):
    """Metres in the lon/lat columns of a CSV (read as EPSG:4326): refused, naming data.poi_crs, before
    any transform warns; a few such rows among degrees are dropped as invalid coordinates."""
    import numpy as np
    import pytest

    from aether.core.errors import AetherError
    from aether.data.poi import read_poi_frame

    records = poi_records(5, 20, 20)
    metres = write_csv(
        tmp_path / "m.csv", [{**r, "lon": 385000.0 + i, "lat": 6672000.0} for i, r in enumerate(records)]
    )
    with pytest.raises(AetherError, match="outside degrees .*set data.poi_crs"):
        read_poi_frame(str(metres))
    mixed = write_csv(tmp_path / "mixed.csv", [{**r, "lon": 385000.0} if i == 0 else r for i, r in enumerate(records)])
    frame = read_poi_frame(str(mixed))
    assert np.isnan(frame.geometry.x.iloc[0]) and np.isfinite(frame.geometry.x.iloc[1:]).all()


def test_an_emoji_query_draws_its_heatmap_without_warnings(tmp_path):
    import warnings

    from aether.infer.pipeline import embed_raster
    from aether.retrieval.search import retrieve

    raster = write_raster(tmp_path / "ae.tif", unit_field(20, 20))
    from tests.helpers.fixtures import write_untrained_checkpoint

    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    emb = embed_raster(str(raster), str(ckpt), str(tmp_path / "aether.tif"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = retrieve(["☕ coffee 🌳"], str(ckpt), str(tmp_path / "r"), emb_tif=str(emb), progress=False)[0]
    assert result.png.is_file()
