"""A refused training run leaves nothing behind: no run folder, no text cache (the cache is made
on its first write, and too few POIs are refused before any text is encoded)."""
from __future__ import annotations

from fixtures import poi_records, run_script_in_process, unit_field, write_config, write_csv, write_raster


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
    cfg = write_config(tmp_path / "cfg.yaml", raster, write_csv(tmp_path / "pois.csv", records),
                       data={"val_block_m": 50, "val_fraction": 0.2}, train={"epochs": 1})
    code, out, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    assert "1 validation POIs" in out and "too few to score: no best.pt is written" in out, out
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run" / "best.pt").exists()
