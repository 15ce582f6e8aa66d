"""Interrupted inference through the real infer_aether_raster.py: SIGKILL and Ctrl-C leave the
output untouched, and --resume finishes with exactly the output of an uninterrupted run.

What a resume checks before it trusts the interrupted run's work: a partial output cut short or
changed is redone (never published), an input that changed behind the run (a VRT's sources, a
file replaced by another of the same size and time) is refused, a resume that fails keeps what it
started from, and a damaged journal is one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from aether.core.journal import partial_paths
from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from tests.helpers.fixtures import ORIGIN, unit_field, write_raster, write_untrained_checkpoint, write_vrt_mosaic

ROOT = Path(__file__).resolve().parents[2]
SIZE_PX, TILE_PX = 256, 32  # 64 tiles: enough to interrupt part-way
N_TILES = (SIZE_PX // TILE_PX) ** 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    ae = write_raster(folder / "ae.tif", unit_field(SIZE_PX, SIZE_PX, seed=5, smooth=8), block=64)
    ckpt = write_untrained_checkpoint(folder / "best.pt")
    return ae, ckpt


def command(ae: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "infer_aether_raster.py",
        "--ae_tif",
        str(ae),
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--tile",
        str(TILE_PX),
        "--precision",
        "fp32",
        "--checkpoint-every",
        "0",
        "--no-progress",
        *extra,
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def start_and_interrupt(cmd: list[str], journal: Path, sig: int, min_done: int = 4) -> subprocess.Popen:
    """Start `cmd`, wait until its journal records `min_done` tiles, then send `sig`."""
    # a background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: restore it
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["done"]) >= min_done:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    ae, ckpt = inputs
    out = tmp_path_factory.mktemp("reference") / "aether.tif"
    embed_raster(str(ae), str(ckpt), str(out), progress=False, options=EmbedOptions(precision="fp32", tile_px=TILE_PX))
    return read_all(out)


def read_all(path: Path):
    with rasterio.open(path) as src:
        return src.read(), src.profile, src.descriptions, src.tags()


def assert_same_output(path: Path, reference) -> None:
    data, profile, descriptions, tags = read_all(path)
    np.testing.assert_array_equal(data, reference[0])
    assert profile == reference[1] and descriptions == reference[2] and tags == reference[3]


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)], ids=["sigkill", "sigint"]
)
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, inputs, reference, sig, code):
    ae, ckpt = inputs
    out = tmp_path / "aether.tif"
    partial, journal = partial_paths(out)
    proc = start_and_interrupt(command(ae, ckpt, out), journal, sig)
    assert proc.returncode == code, proc.stderr.read()
    if sig == signal.SIGINT:
        assert "Continue with --resume" in proc.stderr.read() + proc.stdout.read()
    assert not out.exists(), "an interrupted run left an output"
    assert partial.exists() and journal.exists()
    done = len(json.loads(journal.read_text())["done"])
    assert 0 < done < N_TILES

    resumed = run(command(ae, ckpt, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    resumed_done = int(resumed.stdout.split("resuming: ")[1].split(" of")[0])
    assert resumed_done >= done
    assert_same_output(out, reference)
    assert not partial.exists() and not journal.exists()


def test_resume_refuses_other_options_and_a_fresh_run_starts_over(tmp_path, inputs, reference):
    ae, ckpt = inputs
    out = tmp_path / "aether.tif"
    partial, journal = partial_paths(out)
    start_and_interrupt(command(ae, ckpt, out), journal, signal.SIGKILL)

    other = run(command(ae, ckpt, out, "--resume", "--dtype", "float32"))
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        "error: cannot resume: the interrupted run had other dtype; run without --resume to start over"
    ]
    assert partial.exists() and journal.exists() and not out.exists()

    fresh = run(command(ae, ckpt, out))
    assert fresh.returncode == 0, fresh.stderr
    assert "discarding the partial output of an earlier interrupted run" in fresh.stdout
    assert_same_output(out, reference)
    assert not partial.exists() and not journal.exists()


def test_resume_without_an_interrupted_run_is_refused(tmp_path, inputs):
    ae, ckpt = inputs
    result = run(command(ae, ckpt, tmp_path / "aether.tif", "--resume"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: nothing to resume")
    assert os.listdir(tmp_path) == []


# ---- what a resume checks -----------------------------------------------------------------------


def block_offset(path: Path, row: int = 0, col: int = 0) -> tuple[int, int]:
    """Where GDAL says block (row, col) of `path` lies in the file, and its size."""
    with rasterio.open(path) as src:
        return (
            int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)),
            int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)),
        )


def interrupted(tmp_path: Path, ae: Path, ckpt: Path, min_done: int = 8) -> tuple[Path, Path, Path]:
    out = tmp_path / "aether.tif"
    partial, journal = partial_paths(out)
    proc = start_and_interrupt(command(ae, ckpt, out), journal, signal.SIGKILL, min_done)
    assert proc.returncode == -signal.SIGKILL
    return out, partial, journal


def test_a_partial_output_cut_short_is_redone_not_published(tmp_path, inputs, reference):
    ae, ckpt = inputs
    out, partial, journal = interrupted(tmp_path, ae, ckpt)
    first, _ = block_offset(partial)
    os.truncate(partial, first + (partial.stat().st_size - first) // 3)  # the journaled blocks, cut short

    resumed = run(command(ae, ckpt, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "failed their check" in resumed.stdout and "they are done again" in resumed.stdout
    assert_same_output(out, reference)  # every block decodes, every pixel is an uninterrupted run's


def test_bytes_changed_inside_a_journaled_block_are_redone(tmp_path, inputs, reference):
    ae, ckpt = inputs
    out, partial, journal = interrupted(tmp_path, ae, ckpt)
    offset, size = block_offset(partial)
    assert size > 200
    with open(partial, "r+b") as f:
        f.seek(offset + size // 2)
        chunk = f.read(64)
        f.seek(offset + size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))

    resumed = run(command(ae, ckpt, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "1 of the" in resumed.stdout and "failed their check" in resumed.stdout
    assert_same_output(out, reference)


def test_a_journal_whose_done_list_holds_non_numbers_is_one_line(tmp_path, inputs):
    ae, ckpt = inputs
    out, partial, journal = interrupted(tmp_path, ae, ckpt, min_done=2)
    saved = json.loads(journal.read_text())
    saved["done"] = ["one", "two"]
    journal.write_text(json.dumps(saved))
    result = run(command(ae, ckpt, out, "--resume"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: resume journal {journal} is damaged; run without --resume to start over"
    ]
    assert partial.exists() and journal.exists() and not out.exists()


def replace_keeping_size_and_time(path: Path, values: np.ndarray, **kwargs) -> None:
    """Write other pixels into `path` as a file of the same size and modification time (as cp -p and
    rsync -t leave a replaced file)."""
    st = path.stat()
    other = path.with_name("other_" + path.name)
    write_raster(other, values, **kwargs)
    assert other.stat().st_size == st.st_size
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_input_replaced_by_one_of_the_same_size_and_time_is_not_resumed(tmp_path, inputs):
    _, ckpt = inputs
    ae = write_raster(tmp_path / "ae.tif", unit_field(SIZE_PX, SIZE_PX, seed=5, smooth=8))  # uncompressed
    out, partial, journal = interrupted(tmp_path, ae, ckpt)
    replace_keeping_size_and_time(ae, unit_field(SIZE_PX, SIZE_PX, seed=6, smooth=8))

    result = run(command(ae, ckpt, out, "--resume"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: cannot resume: the interrupted run had other input content; run without --resume to start over"
    ]
    assert partial.exists() and journal.exists() and not out.exists()


def test_a_vrt_whose_sources_changed_is_not_resumed_into_a_mix(tmp_path, inputs):
    """The VRT file itself is the same; what it reads is not."""
    _, ckpt = inputs
    half = SIZE_PX // 2
    parts = [
        write_raster(
            tmp_path / f"part{i}.tif",
            unit_field(half, SIZE_PX, seed=10 + i, smooth=8),
            transform=from_origin(ORIGIN[0], ORIGIN[1] - 10.0 * half * i, 10.0, 10.0),
        )
        for i in range(2)
    ]
    vrt = write_vrt_mosaic(tmp_path / "mosaic.vrt", parts)
    out, partial, journal = interrupted(tmp_path, vrt, ckpt)
    vrt_bytes = vrt.read_bytes()
    replace_keeping_size_and_time(
        parts[1],
        unit_field(half, SIZE_PX, seed=99, smooth=8),
        transform=from_origin(ORIGIN[0], ORIGIN[1] - 10.0 * half, 10.0, 10.0),
    )
    assert vrt.read_bytes() == vrt_bytes

    result = run(command(vrt, ckpt, out, "--resume"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: cannot resume: the interrupted run had other input content; run without --resume to start over"
    ]
    assert partial.exists() and journal.exists() and not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, unmounted afterwards (skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root, or not allowed)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_resume_that_meets_a_full_disk_keeps_the_partial_output(tmp_path, small_disk, inputs, reference):
    ae, ckpt = inputs
    out, partial, journal = interrupted(small_disk, ae, ckpt)
    kept = partial.read_bytes(), json.loads(journal.read_text())["done"]
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill what is left of the disk
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass

    full = run(command(ae, ckpt, out, "--resume"))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1 and "no space left on device" in lines[0], full.stderr
    assert "is kept" in lines[0]
    assert partial.exists() and journal.exists() and not out.exists()
    assert set(kept[1]) <= set(json.loads(journal.read_text())["done"])

    filler.unlink()
    resumed = run(command(ae, ckpt, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    assert_same_output(out, reference)
