"""Resume and clean interruption, through the real train.py on a tiny generated data set.

A reference run trains 5 epochs uninterrupted. Other runs with the same seed are killed
(SIGKILL) or stopped (SIGTERM, SIGINT) part-way and resumed; their final weights must equal
the reference's bit for bit. Epochs are 60 small steps (batch 2, a few ms each); a signal sent
a third of the reference's epoch time after an epoch's checkpoint appears lands in the next
epoch, or, on a machine whose load changed since the reference ran, a later one: the epochs
left after it are what keeps such a run from ending before the signal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from aether.model.checkpoint import Checkpoint
from tests.helpers.fixtures import poi_records, run_script_in_process, unit_field, write_config, write_csv, write_raster

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 5
# one thread per run: the runs are compared bit for bit, and two can share the 2 cores
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
MESSAGE = re.compile(
    r"^interrupted by (SIG\w+) at epoch (\d+), step (\d+) of (\d+); checkpoint saved to (\S+); "
    r"resume with: (.+)$"
)


def command(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--cfg", str(cfg), "--set", f"train.run_dir={run_dir}", "--no-progress", *extra]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def epochs_in(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.endswith("}")]


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def wait_for_epoch(proc: subprocess.Popen, run_dir: Path, epoch: int) -> None:
    """Return once `epoch` is in metrics.jsonl and last.pt has been replaced after it: the run is
    then in the next epoch's steps."""
    before = inode(run_dir / "last.pt")
    deadline = time.monotonic() + 120
    while not (epoch in epochs_in(run_dir) and inode(run_dir / "last.pt") not in (None, before)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.005)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return Checkpoint.load(path).weights


def assert_same_weights(path: Path, reference: Path) -> None:
    got, want = weights(path), weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def metrics_without_time(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Inputs, config and an uninterrupted reference run (which also fills the text cache)."""
    tmp = tmp_path_factory.mktemp("resume")
    raster = write_raster(tmp / "ae.tif", unit_field(40, 40, seed=7))
    records = poi_records(150, 40, 40, seed=1)
    cfg = write_config(
        tmp / "cfg.yaml",
        raster,
        write_csv(tmp / "pois.csv", records),
        model={"latent_dim": 16, "hidden_dim": 32, "dropout": 0.2},
        train={"epochs": EPOCHS, "batch_size": 2},
    )
    reference = run(command(cfg, tmp / "reference"))
    assert reference.returncode == 0, reference.stderr
    assert epochs_in(tmp / "reference") == list(range(1, EPOCHS + 1))
    return tmp, cfg, records


def epoch_seconds(run_dir: Path) -> float:
    """How long one epoch took (after the first, which includes the start-up)."""
    elapsed = [json.loads(line)["elapsed_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return min(b - a for a, b in zip(elapsed[1:], elapsed[2:]))


def killed_and_resumed(tmp: Path, cfg: Path) -> Path:
    """SIGKILL once epoch 1 is saved (no chance to save anything), then --resume the run folder."""
    run_dir = tmp / "killed"
    proc = start(command(cfg, run_dir))
    wait_for_epoch(proc, run_dir, 1)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert Checkpoint.load(run_dir / "last.pt").epoch < EPOCHS

    resumed = run(command(cfg, run_dir, "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    return run_dir


def stop_with(proc: subprocess.Popen, signum: int, run_dir: Path, delay_s: float) -> tuple[int, list[str]]:
    """Send `signum` `delay_s` into an epoch; check the exit code, the one message and the
    checkpoint; return the epoch it stopped in and the resume command it printed."""
    time.sleep(delay_s)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    match = MESSAGE.match(lines[-1])
    assert match and len(lines) == 1, stderr
    name, epoch, step, steps, path, how = match.groups()
    assert name == signal.Signals(signum).name and Path(path) == run_dir / "last.pt"
    assert 0 <= int(step) < int(steps)
    state = Checkpoint.load(path).resume
    assert (state["epoch"], state["step"]) == (int(epoch), int(step))
    return int(epoch), shlex.split(how)


def stopped_and_resumed(tmp: Path, cfg: Path) -> Path:
    """SIGTERM in epoch 2 (or later), resume with the printed command, SIGINT in a later epoch, resume
    from last.pt."""
    run_dir = tmp / "stopped"
    delay_s = epoch_seconds(tmp / "reference") / 3
    proc = start(command(cfg, run_dir))
    wait_for_epoch(proc, run_dir, 1)
    first, how = stop_with(proc, signal.SIGTERM, run_dir, delay_s)
    assert 2 <= first < EPOCHS and epochs_in(run_dir) == list(range(1, first))

    # the printed command, as given, resumes (with this interpreter and no progress bars)
    assert how[:2] == ["python", "train.py"] and how[-2:] == ["--resume", str(run_dir)]
    proc = start([sys.executable, *how[1:], "--no-progress"])
    wait_for_epoch(proc, run_dir, first)
    second, _ = stop_with(proc, signal.SIGINT, run_dir, delay_s)
    assert first < second <= EPOCHS and epochs_in(run_dir) == list(range(1, second))

    resumed = run(command(cfg, run_dir, "--resume", str(run_dir / "last.pt")))
    assert resumed.returncode == 0, resumed.stderr
    return run_dir


def test_killed_or_stopped_runs_resume_to_the_same_weights(setup):
    """The two interrupted runs go side by side (one thread each) to use both cores."""
    tmp, cfg, _ = setup
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(chain, tmp, cfg) for chain in (killed_and_resumed, stopped_and_resumed)]
        run_dirs = [r.result() for r in runs]
    reference = tmp / "reference"
    for run_dir in run_dirs:
        assert_same_weights(run_dir / "last.pt", reference / "last.pt")
        assert_same_weights(run_dir / "best.pt", reference / "best.pt")
        assert metrics_without_time(run_dir) == metrics_without_time(reference)  # no duplicate epochs


def train_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The real train.py run in this process (as test_bad_input does): exit code and stderr."""
    code, _, err = run_script_in_process("train.py", args[2:], monkeypatch, capsys)
    return code, err


def test_bad_resume_targets_exit_2_with_one_line(setup, monkeypatch, capsys):
    """Refused before anything is written; one case as a subprocess, the rest in-process."""
    tmp, cfg, records = setup
    reference = tmp / "reference"
    other_data = write_config(
        tmp / "other.yaml",
        tmp / "ae.tif",
        write_csv(tmp / "fewer.csv", records[:120]),
        model={"latent_dim": 16, "hidden_dim": 32, "dropout": 0.2},
        train={"epochs": EPOCHS, "batch_size": 2},
    )
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    proc = run(command(cfg, tmp / "new", "--resume", str(reference / "best.pt")))
    cases = [(proc.returncode, proc.stderr, "holds weights but no training state (best.pt never does)")]
    for args, expected in [
        (command(cfg, tmp / "new", "--resume", str(tmp / "nowhere")), "does not exist"),
        (command(cfg, tmp / "new", "--resume", str(tmp)), "holds no last.pt"),
        (
            command(cfg, reference, "--set", "model.latent_dim=8", "--resume", str(reference)),
            "model.latent_dim is 8 in this config but 16 in the checkpoint",
        ),
        (
            command(cfg, reference, "--set", "data.n_bands=32", "--resume", str(reference)),
            "data.n_bands is 32 in this config but 64 in the checkpoint",
        ),
        (
            command(cfg, reference, "--set", "text.model=paraphrase-MiniLM-L3-v2", "--resume", str(reference)),
            "text.model is 'paraphrase-MiniLM-L3-v2' in this config",
        ),
        (
            command(other_data, tmp / "new", "--resume", str(reference)),
            "training data changed since it was written (POI ids, descriptions, AlphaEarth windows, "
            "train/validation split differ)",
        ),
    ]:
        cases.append((*train_in_process(args, monkeypatch, capsys), expected))
    for code, stderr, expected in cases:
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot resume"), stderr
        assert expected in lines[0], stderr
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before
    assert not (tmp / "new").exists()


def test_resume_into_another_folder_for_more_epochs_then_nothing_to_do(setup, monkeypatch, capsys):
    """A finished run continued elsewhere with more epochs keeps its metrics and best.pt; a
    second resume finds nothing to train. The reference folder is left as it was."""
    tmp, cfg, _ = setup
    reference, longer = tmp / "reference", tmp / "longer"
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    args = command(cfg, longer, "--set", f"train.epochs={EPOCHS + 1}", "--resume", str(reference))
    code, stderr = train_in_process(args, monkeypatch, capsys)
    assert code == 0, stderr
    assert epochs_in(longer) == list(range(1, EPOCHS + 2))
    assert metrics_without_time(longer)[:EPOCHS] == metrics_without_time(reference)
    assert (longer / "best.pt").is_file() and Checkpoint.load(longer / "last.pt").epoch == EPOCHS + 1
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before

    args = command(cfg, longer, "--set", f"train.epochs={EPOCHS + 1}", "--resume", str(longer))
    code, out, err = run_script_in_process("train.py", args[2:], monkeypatch, capsys)
    assert code == 0, err
    assert "nothing to train" in out
    assert epochs_in(longer) == list(range(1, EPOCHS + 2))
