"""The installed `aether` command: one entry point whose subcommands are the top-level scripts."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys

import pytest

from aether.cli.main import COMMANDS
from aether.cli.run import launcher
from aether.core.errors import DISTRIBUTION

AETHER = shutil.which("aether")
needs_command = pytest.mark.skipif(AETHER is None, reason="the package is not installed (pip install -e .)")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AETHER, *args], capture_output=True, text=True, timeout=120)


@needs_command
def test_help_lists_every_subcommand():
    done = run("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


@needs_command
def test_version_is_the_installed_distributions():
    done = run("--version")
    assert done.stdout.strip() == f"aether {importlib.metadata.version(DISTRIBUTION)}"


@needs_command
def test_an_unknown_subcommand_is_one_line_and_exit_code_2():
    done = run("trian")
    assert done.returncode == 2
    assert "invalid choice: 'trian'" in done.stderr and "Traceback" not in done.stderr


@needs_command
def test_a_subcommand_runs_its_script_with_one_line_errors(tmp_path):
    done = run("infer", "--ae_tif", str(tmp_path / "none.tif"), "--ckpt", str(tmp_path / "x.pt"), "--out", "o.tif")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: checkpoint {tmp_path / 'x.pt'} does not exist"]


@pytest.mark.parametrize(
    "script, argv0, expected",
    [
        ("aether train", "/venv/bin/aether", ["--no-python", "aether", "train"]),
        ("python train.py", "train.py", ["train.py"]),
    ],
)
def test_the_resume_line_under_torchrun_starts_the_same_command(monkeypatch, script, argv0, expected):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", [argv0])
    assert launcher(script) == ["torchrun", "--nproc_per_node=2", *expected]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launcher(script) == script.split()
