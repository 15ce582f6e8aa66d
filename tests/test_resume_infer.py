"""Interrupted inference through the real infer_aether_raster.py: SIGKILL and Ctrl-C leave the
output untouched, and --resume finishes with exactly the output of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from aether.inference import embed_raster
from aether.journal import partial_paths
from fixtures import unit_field, write_raster, write_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE_PX, TILE_PX = 256, 32  # 64 tiles: enough to interrupt part-way
N_TILES = (SIZE_PX // TILE_PX) ** 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    ae = write_raster(folder / "ae.tif", unit_field(SIZE_PX, SIZE_PX, seed=5, smooth=8), block=64)
    ckpt = write_untrained_checkpoint(folder / "best.pt")
    return ae, ckpt


def command(ae: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "infer_aether_raster.py", "--ae_tif", str(ae), "--ckpt", str(ckpt), "--out", str(out),
            "--tile", str(TILE_PX), "--precision", "fp32", "--checkpoint-every", "0", "--no-progress", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def start_and_interrupt(cmd: list[str], journal: Path, sig: int, min_done: int = 4) -> subprocess.Popen:
    """Start `cmd`, wait until its journal records `min_done` tiles, then send `sig`."""
    # a background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: restore it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
    embed_raster(str(ae), str(ckpt), str(out), precision="fp32", tile_px=TILE_PX, progress=False)
    return read_all(out)


def read_all(path: Path):
    with rasterio.open(path) as src:
        return src.read(), src.profile, src.descriptions, src.tags()


def assert_same_output(path: Path, reference) -> None:
    data, profile, descriptions, tags = read_all(path)
    np.testing.assert_array_equal(data, reference[0])
    assert profile == reference[1] and descriptions == reference[2] and tags == reference[3]


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)],
                         ids=["sigkill", "sigint"])
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
        "error: cannot resume: the interrupted run had other dtype; run without --resume to start over"]
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
