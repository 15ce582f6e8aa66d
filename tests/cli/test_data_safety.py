"""No run destroys or corrupts a file and exits 0.

Inference and retrieval refuse, in one line and exit code 2, an output that is one of the files
they read: the input raster, a source behind a VRT (through VRTs of VRTs, relative sources and
symbolic links included), a tile of a tile set, the checkpoint, the AETHER raster of a search.
Every input's SHA-256 is compared before and after. Two runs into the same output (inference),
output folder (retrieval) or run folder (training) cannot overlap: a child process holds the
run's lock through aether.core.files, a real run is refused while the child lives, and once the child
is killed with SIGKILL (its stale lock file left behind) the run succeeds.

Rasters are 40 x 50 px; the checkpoint is an untrained one (latent 16).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import rasterio
from rasterio.transform import from_origin

import aether.train.loop
from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from tests.helpers.fixtures import (
    ORIGIN,
    poi_records,
    run_script_in_process,
    unit_field,
    write_config,
    write_csv,
    write_raster,
    write_untrained_checkpoint,
    write_vrt_mosaic,
)

ROOT = Path(__file__).resolve().parents[2]
HEIGHT_PX, WIDTH_PX = 40, 50
INFER, RETRIEVE, TRAIN = "infer_aether_raster.py", "retrieve.py", "train.py"


# ---- tiny inputs and checks ----------------------------------------------------------------


def _part(path: Path, col: int = 0, seed: int = 0) -> Path:
    """A 40 x 50 px AlphaEarth-like raster, `col` tiles of 50 px east of ORIGIN."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_raster(
        path,
        unit_field(HEIGHT_PX, WIDTH_PX, seed=seed),
        transform=from_origin(ORIGIN[0] + col * WIDTH_PX * 10.0, ORIGIN[1], 10.0, 10.0),
    )


def _relative_vrt(path: Path, parts: list[Path]) -> Path:
    """A VRT mosaic of `parts` naming its sources relative to itself, as gdalbuildvrt does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_vrt_mosaic(path, parts)
    text = path.read_text(encoding="utf-8")
    for part in parts:
        text = text.replace(
            f"<SourceFilename>{part}</SourceFilename>",
            f'<SourceFilename relativeToVRT="1">{os.path.relpath(part, path.parent)}</SourceFilename>',
        )
    path.write_text(text, encoding="utf-8")
    return path


def _digests(folder: Path) -> dict[Path, str]:
    """SHA-256 of every file under `folder`."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)
    return run_script_in_process(script, [*args, "--no-progress"], monkeypatch, capsys)


def _assert_refused(code: int, stderr: str, *expected: str) -> str:
    """Exit code 2 and exactly one line on stderr, 'error: ...', holding every `expected` text."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0], stderr
    return lines[0]


# ---- 1. inference: an output that is a file the run reads -------------------------------------


def infer_out_is_a_vrt_source(tmp):
    a, b = _part(tmp / "a.tif"), _part(tmp / "b.tif", col=1, seed=1)
    return write_vrt_mosaic(tmp / "mosaic.vrt", [a, b]), b, "read through the input raster"


def infer_out_is_behind_a_vrt_of_a_vrt(tmp):
    a, b = _part(tmp / "parts" / "a.tif"), _part(tmp / "parts" / "b.tif", col=1, seed=1)
    inner = _relative_vrt(tmp / "parts" / "inner.vrt", [a, b])
    outer = _relative_vrt(tmp / "outer" / "outer.vrt", [inner])
    (tmp / "link").symlink_to(tmp / "parts")  # the output named through a symbolic link
    return outer, tmp / "link" / "a.tif", "read through the input raster"


def infer_out_is_a_source_of_a_vrt_with_an_xml_declaration(tmp):
    a, b = _part(tmp / "a.tif"), _part(tmp / "b.tif", col=1, seed=1)
    vrt = write_vrt_mosaic(tmp / "plain.vrt", [a, b])
    declared = tmp / "declared.vrt"  # GDAL reads a VRT that starts with <?xml ...?> as well
    declared.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + vrt.read_text(encoding="utf-8"), encoding="utf-8")
    vrt.unlink()
    return declared, b, "read through the input raster"


def infer_out_is_a_tile_of_a_glob(tmp):
    _part(tmp / "tiles" / "t1.tif"), _part(tmp / "tiles" / "t2.tif", col=1, seed=1)
    return tmp / "tiles" / "t*.tif", tmp / "tiles", "is an input tile"


def infer_out_is_a_tile_of_a_list(tmp):
    _part(tmp / "tiles" / "t1.tif"), _part(tmp / "tiles" / "t2.tif", col=1, seed=1)
    (tmp / "tiles.txt").write_text("tiles/t1.tif\ntiles/t2.tif\n", encoding="utf-8")
    return tmp / "tiles.txt", tmp / "tiles", "is an input tile"


def infer_out_is_the_checkpoint(tmp):
    return _part(tmp / "ae.tif"), tmp / "best.pt", "is the checkpoint"


@pytest.mark.parametrize(
    "build",
    [
        infer_out_is_a_vrt_source,
        infer_out_is_behind_a_vrt_of_a_vrt,
        infer_out_is_a_source_of_a_vrt_with_an_xml_declaration,
        infer_out_is_a_tile_of_a_glob,
        infer_out_is_a_tile_of_a_list,
        infer_out_is_the_checkpoint,
    ],
)
def test_inference_refuses_to_write_over_what_it_reads(build, tmp_path, monkeypatch, capsys):
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    ae_tif, out, expected = build(tmp_path)
    before = _digests(tmp_path)
    args = ["--ae_tif", str(ae_tif), "--ckpt", str(ckpt), "--out", str(out)]
    code, _, stderr = _run(INFER, args, monkeypatch, capsys)
    _assert_refused(code, stderr, expected, "choose another")
    assert _digests(tmp_path) == before, "an input changed or an output was left behind"


# ---- 2. retrieval: a map, places or heatmap written over the raster searched ------------------


def retrieve_emb_named_like_its_map(tmp, ckpt):
    ae = _part(tmp / "ae.tif")
    (tmp / "r").mkdir()
    emb = embed_raster(str(ae), str(ckpt), str(tmp / "r" / "q01_a-cafe.tif"), progress=False)
    return ["--emb", str(emb)]


def retrieve_alphaearth_vrt_source_named_like_a_map(tmp, ckpt):
    source = _part(tmp / "r" / "q01_a-cafe.tif")
    return ["--ae_tif", str(write_vrt_mosaic(tmp / "ae.vrt", [source]))]


def retrieve_tile_set_inside_the_output_folder(tmp, ckpt):
    ae = _part(tmp / "ae.tif")
    (tmp / "r").mkdir()
    embed_raster(str(ae), str(ckpt), str(tmp / "r" / "q01_a-cafe.tif"), progress=False)
    return ["--emb", str(tmp / "r" / "q*.tif")]


@pytest.mark.parametrize(
    "build",
    [
        retrieve_emb_named_like_its_map,
        retrieve_alphaearth_vrt_source_named_like_a_map,
        retrieve_tile_set_inside_the_output_folder,
    ],
)
def test_retrieval_refuses_to_write_over_what_it_reads(build, tmp_path, monkeypatch, capsys):
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    source = build(tmp_path, ckpt)
    before = _digests(tmp_path)
    code, _, stderr = _run(
        RETRIEVE, ["--ckpt", str(ckpt), *source, "--query", "a cafe", "--out", str(tmp_path / "r")], monkeypatch, capsys
    )
    _assert_refused(code, stderr, "q01_a-cafe.tif is", "choose another --out folder")
    assert _digests(tmp_path) == before, "an input changed or an output was left behind"


# ---- 3 and 4. two runs into one output ---------------------------------------------------------


@contextmanager
def _lock_held_by_child(code: str):
    """A child process that holds the lock `code` builds (through aether.core.files) until it is killed
    with SIGKILL at the end of the block; yields its pid once it holds the lock."""
    script = (
        f"import time\nfrom aether.core.files import *\n"
        f"with {code}:\n    print('locked', flush=True)\n    time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child.pid
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()


@pytest.mark.parametrize("tile_set", [False, True], ids=["one-raster", "tile-set"])
def test_second_inference_into_the_same_output_is_refused_until_the_first_dies(tile_set, tmp_path, monkeypatch, capsys):
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    if tile_set:
        _part(tmp_path / "tiles" / "t1.tif"), _part(tmp_path / "tiles" / "t2.tif", col=1, seed=1)
        ae_tif, out, written = tmp_path / "tiles" / "t*.tif", tmp_path / "out", tmp_path / "out" / "mosaic.vrt"
        out.mkdir()
    else:
        ae_tif = _part(tmp_path / "ae.tif")
        out = written = tmp_path / "aether.tif"
    args = ["--ae_tif", str(ae_tif), "--ckpt", str(ckpt), "--out", str(out)]
    lock = written.parent / f".{written.name}.lock"
    before = _digests(tmp_path)
    with _lock_held_by_child(f"output_lock({str(written)!r})") as pid:
        code, _, stderr = _run(INFER, args, monkeypatch, capsys)
        _assert_refused(
            code, stderr, f"{written} is being written by another run (pid {pid}); wait for it or choose another --out"
        )
        assert _digests(tmp_path) == {**before, lock: hashlib.sha256(lock.read_bytes()).hexdigest()}
    assert lock.exists(), "the killed holder's lock file should be left behind (and block nothing)"

    code, stdout, stderr = _run(INFER, args, monkeypatch, capsys)
    assert code == 0, stderr
    assert not lock.exists()
    with rasterio.open(written) as src:
        assert src.count == 16
        src.read()  # every block readable
    assert {p: d for p, d in _digests(tmp_path).items() if p in before} == before


def test_inference_beside_a_live_run_is_refused_and_resume_takes_over_a_killed_one(tmp_path, monkeypatch, capsys):
    """The tester's case: a real run (frozen with SIGSTOP once it has begun writing) and a second
    run of the same --out. 64 tiles of 16 px, each made durable, so the first run is still at work."""
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    ae = write_raster(tmp_path / "ae.tif", unit_field(128, 128, seed=3))
    out = tmp_path / "aether.tif"
    args = [
        "--ae_tif",
        str(ae),
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--tile",
        "16",
        "--precision",
        "fp32",
        "--checkpoint-every",
        "0",
    ]
    before = _digests(tmp_path)
    first = subprocess.Popen(
        [sys.executable, INFER, *args, "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        journal = tmp_path / ".aether.tif.partial.json"
        deadline = time.monotonic() + 60
        while not journal.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second started"
        code, _, stderr = _run(INFER, args, monkeypatch, capsys)
        _assert_refused(code, stderr, f"{out} is being written by another run (pid {first.pid})")
        assert not out.exists()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    assert journal.exists() and (tmp_path / ".aether.tif.lock").exists()  # what the killed run left

    code, stdout, stderr = _run(INFER, [*args, "--resume"], monkeypatch, capsys)
    assert code == 0, stderr
    reference = embed_raster(
        str(ae),
        str(ckpt),
        str(tmp_path / "reference.tif"),
        progress=False,
        options=EmbedOptions(tile_px=16, precision="fp32"),
    )
    with rasterio.open(out) as src, rasterio.open(reference) as ref:
        assert (src.read() == ref.read()).all()
    assert {p: d for p, d in _digests(tmp_path).items() if p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.tif", "aether.tif", "best.pt", "reference.tif"]


def test_second_retrieval_into_the_same_folder_is_refused_until_the_first_dies(tmp_path, monkeypatch, capsys):
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    emb = embed_raster(str(_part(tmp_path / "ae.tif")), str(ckpt), str(tmp_path / "aether.tif"), progress=False)
    out = tmp_path / "r"
    args = ["--ckpt", str(ckpt), "--emb", str(emb), "--query", "a cafe", "--out", str(out)]
    out.mkdir()
    before = _digests(tmp_path)
    with _lock_held_by_child(
        f"folder_lock({str(out)!r}, '.retrieve.lock', 'output folder {out}', 'choose another --out folder')"
    ) as pid:
        code, _, stderr = _run(RETRIEVE, args, monkeypatch, capsys)
        _assert_refused(code, stderr, f"output folder {out} is being written by another run (pid {pid})")
        assert list(out.iterdir()) == [out / ".retrieve.lock"]
    code, _, stderr = _run(RETRIEVE, args, monkeypatch, capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "q01_a-cafe.geojson",
        "q01_a-cafe.png",
        "q01_a-cafe.tif",
        "queries.json",
    ]
    assert {p: d for p, d in _digests(tmp_path).items() if p in before} == before


def test_second_training_into_the_same_run_folder_is_refused_until_the_first_dies(tmp_path, monkeypatch, capsys):
    ae = write_raster(tmp_path / "ae.tif", unit_field(HEIGHT_PX, WIDTH_PX))
    poi = write_csv(tmp_path / "pois.csv", poi_records(40, HEIGHT_PX, WIDTH_PX))
    cfg = write_config(tmp_path / "config.yaml", ae, poi, train={"epochs": 2, "batch_size": 8})
    run_dir = tmp_path / "run"
    code, _, stderr = _run(TRAIN, ["--cfg", str(cfg)], monkeypatch, capsys)
    assert code == 0, stderr
    assert not (run_dir / ".train.lock").exists()
    before = _digests(tmp_path)

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("a refused run built its data set (text encoding)")

    holder = f"folder_lock({str(run_dir)!r}, '.train.lock', 'run folder {run_dir}', 'set another train.run_dir')"
    with monkeypatch.context() as patch, _lock_held_by_child(holder) as pid:
        patch.setattr(aether.train.loop, "build_dataset", no_heavy_work)
        for extra in ([], ["--resume", str(run_dir)]):
            code, _, stderr = _run(TRAIN, ["--cfg", str(cfg), "--set", "train.epochs=3", *extra], monkeypatch, capsys)
            _assert_refused(
                code,
                stderr,
                f"run folder {run_dir} is being written by another run (pid {pid}); "
                f"wait for it or set another train.run_dir",
            )
        assert {p: d for p, d in _digests(tmp_path).items() if p.name != ".train.lock"} == before

    code, _, stderr = _run(
        TRAIN, ["--cfg", str(cfg), "--set", "train.epochs=3", "--resume", str(run_dir)], monkeypatch, capsys
    )
    assert code == 0, stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert not (run_dir / ".train.lock").exists()
