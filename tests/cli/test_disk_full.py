"""A full disk while writing: one line naming the file and "no space left", exit code 2, no partial
file left, and what was there before (an earlier run's last.pt) intact. Runs on a small tmpfs,
which the test mounts (CI runs as root); where mounting is not allowed the test is skipped."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.fixtures import (
    poi_records,
    run_script_in_process,
    unit_field,
    write_config,
    write_csv,
    write_raster,
    write_untrained_checkpoint,
)


def _tmpfs(folder: Path, options: str):
    """Mount a tmpfs with `options` on `folder` for the test, or skip where mounting is not allowed."""
    folder.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root, or not allowed)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    yield from _tmpfs(tmp_path / "disk", "size=1m")


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "no space left" in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_inference_on_a_full_disk(tmp_path, small_disk, monkeypatch, capsys):
    ae = write_raster(tmp_path / "ae.tif", unit_field(160, 160))
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    code, _, err = run_script_in_process(
        "infer_aether_raster.py",
        [
            "--ae_tif",
            str(ae),
            "--ckpt",
            str(ckpt),
            "--out",
            str(small_disk / "out.tif"),
            "--dtype",
            "float32",
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    assert "out.tif" in one_line(code, err)
    assert list(small_disk.iterdir()) == []  # no output, no partial file, no journal, no lock


def test_training_on_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, small_disk, monkeypatch, capsys):
    raster = write_raster(tmp_path / "ae.tif", unit_field(30, 30))
    pois = write_csv(tmp_path / "pois.csv", poi_records(40, 30, 30))
    cfg = write_config(
        tmp_path / "cfg.yaml", raster, pois, train={"epochs": 1, "batch_size": 8, "run_dir": str(small_disk / "run")}
    )
    code, _, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err  # a small model fits: 1 epoch, best.pt and last.pt
    good = hashlib.sha256((small_disk / "run" / "last.pt").read_bytes()).hexdigest()
    (small_disk / "filler").write_bytes(
        b"\0"
        * (
            1024 * 1024
            - (small_disk / "run" / "last.pt").stat().st_size
            - 8192
            - sum(p.stat().st_size for p in small_disk.rglob("*") if p.is_file())
        )
    )
    code, _, err = run_script_in_process(
        "train.py",
        ["--cfg", str(cfg), "--no-progress", "--set", "train.epochs=2", "--resume", str(small_disk / "run")],
        monkeypatch,
        capsys,
    )
    assert ".pt" in one_line(code, err)
    assert hashlib.sha256((small_disk / "run" / "last.pt").read_bytes()).hexdigest() == good
    leftovers = [p.name for p in (small_disk / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no temporary checkpoint, no lock


def test_retrieval_on_a_full_disk(tmp_path, small_disk, monkeypatch, capsys):
    from aether.infer.pipeline import embed_raster

    ae = write_raster(tmp_path / "ae.tif", unit_field(480, 480))
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    emb = embed_raster(str(ae), str(ckpt), str(tmp_path / "aether.tif"), progress=False)
    code, _, err = run_script_in_process(
        "retrieve.py",
        ["--ckpt", str(ckpt), "--emb", str(emb), "--query", "a cafe", "--out", str(small_disk / "r"), "--no-progress"],
        monkeypatch,
        capsys,
    )
    one_line(code, err)
    assert not any(p.name.startswith(".") or "partial" in p.name for p in small_disk.rglob("*")), list(
        small_disk.rglob("*")
    )


@pytest.fixture
def two_mib_disk(tmp_path):
    yield from _tmpfs(tmp_path / "disk2", "size=2m")


def test_retrieval_of_a_map_larger_than_the_disk(tmp_path, two_mib_disk, monkeypatch, capsys):
    """A 4 MB similarity map on a 2 MiB disk: the write that fails is one line, with nothing left."""
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    emb = write_raster(tmp_path / "aether.tif", unit_field(1000, 1000, bands=16), dtype="float32")
    code, _, err = run_script_in_process(
        "retrieve.py",
        [
            "--ckpt",
            str(ckpt),
            "--emb",
            str(emb),
            "--query",
            "a cafe",
            "--out",
            str(two_mib_disk / "r"),
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    assert "q01_a-cafe.tif" in one_line(code, err)
    assert list(two_mib_disk.iterdir()) == []


def fill(folder: Path) -> None:
    """Take every byte left on the file system of `folder`."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_resume_refused_on_a_full_disk_leaves_no_lock_file(tmp_path, small_disk, monkeypatch, capsys):
    raster = write_raster(tmp_path / "ae.tif", unit_field(30, 30))
    pois = write_csv(tmp_path / "pois.csv", poi_records(40, 30, 30))
    cfg = write_config(
        tmp_path / "cfg.yaml", raster, pois, train={"epochs": 1, "batch_size": 8, "run_dir": str(small_disk / "run")}
    )
    code, _, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    fill(small_disk)
    code, _, err = run_script_in_process(
        "train.py",
        ["--cfg", str(cfg), "--no-progress", "--set", "train.epochs=2", "--resume", str(small_disk / "run")],
        monkeypatch,
        capsys,
    )
    one_line(code, err)
    assert sorted(p.name for p in (small_disk / "run").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


@pytest.fixture
def read_only_disk(tmp_path):
    """A read-only tmpfs (as root, permission bits do not stop writes; a read-only mount does)."""
    yield from _tmpfs(tmp_path / "ro", "size=64k,ro")


@pytest.mark.parametrize(
    "script, args",
    [
        ("plot.py", ["pca", "--tif", "{ae}", "--out", "{ro}/p.png"]),
        ("infer_aether_raster.py", ["--ae_tif", "{ae}", "--ckpt", "{ckpt}", "--out", "{ro}/a.tif", "--no-progress"]),
        (
            "retrieve.py",
            ["--ckpt", "{ckpt}", "--ae_tif", "{ae}", "--query", "a cafe", "--out", "{ro}/r", "--no-progress"],
        ),
    ],
)
def test_a_read_only_output_folder_is_one_line(script, args, tmp_path, read_only_disk, monkeypatch, capsys):
    ae = write_raster(tmp_path / "ae.tif", unit_field(20, 20))
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    args = [a.format(ae=ae, ckpt=ckpt, ro=read_only_disk) for a in args]
    code, _, err = run_script_in_process(script, args, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
