"""Checkpoints of this project's format that are dicts of the right kind but malformed, and
checkpoints whose weights are not finite: each is refused by `load_checkpoint` with one line
naming what is wrong, before anything uses it (the reference format's cases are in
test_reference.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from aether.core.errors import AetherError
from aether.model.checkpoint import FORMAT_VERSION, Checkpoint
from tests.helpers.fixtures import run_script_in_process, unit_field, write_raster, write_untrained_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    path = write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")
    return torch.load(path, weights_only=True)


def _drop(*keys):
    def edit(ckpt):
        target = ckpt
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return edit


def _set(value, *keys):
    def edit(ckpt):
        target = ckpt
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


def _nan_weight(ckpt):
    name = next(k for k in ckpt["model"] if k.endswith("weight"))
    ckpt["model"][name] = ckpt["model"][name].clone()
    ckpt["model"][name][0, 0] = math.nan
    ckpt["bad"] = name


def _inf_weight(ckpt):
    name = next(k for k in ckpt["model"] if k.endswith("bias"))
    ckpt["model"][name] = ckpt["model"][name].clone()
    ckpt["model"][name][0] = math.inf
    ckpt["bad"] = name


CASES = {
    "no model entry": (_drop("model"), "has no model"),
    "model not a dict": (_set([1, 2], "model"), "model must be dict, got list"),
    "no input entry": (_drop("input"), "has no input"),
    "n_bands as a string": (_set("64", "input", "n_bands"), "input.n_bands must be int, got str"),
    "n_bands as a bool": (_set(True, "input", "n_bands"), "input.n_bands must be int, got bool"),
    "no base radius": (_drop("input", "base_radius_m"), "has no input.base_radius_m"),
    "no text-encoder entry": (_drop("text_encoder"), "has no text_encoder"),
    "text-encoder dim missing": (_drop("text_encoder", "dim"), "has no text_encoder.dim"),
    "config not a dict": (_set("x", "config"), "config must be dict, got str"),
    "a weight that is not a tensor": (_set([0.0], "model", "ae.proj.0.bias"), "weight ae.proj.0.bias is a list"),
    "NaN weight": (_nan_weight, "holds NaN or infinite values"),
    "infinite weight": (_inf_weight, "holds NaN or infinite values"),
    "future format version": (_set(FORMAT_VERSION + 1, "format_version"), f"format version {FORMAT_VERSION + 1}"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_checkpoints_are_refused_in_one_line(tmp_path, good, case):
    edit, expected = CASES[case]
    ckpt = copy.deepcopy(good)
    edit(ckpt)
    bad_weight = ckpt.pop("bad", None)
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    with pytest.raises(AetherError) as err:
        Checkpoint.load(path)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    if bad_weight:
        assert bad_weight in message


def test_cli_refuses_a_nan_checkpoint_without_writing(tmp_path, good, monkeypatch, capsys):
    """Today's failure mode: a diverged checkpoint made inference write int8 zeros everywhere."""
    ckpt = copy.deepcopy(good)
    _nan_weight(ckpt)
    ckpt.pop("bad")
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    ae = write_raster(tmp_path / "ae.tif", unit_field(20, 20))
    out = tmp_path / "out.tif"
    code, _, err = run_script_in_process(
        "infer_aether_raster.py",
        ["--ae_tif", str(ae), "--ckpt", str(path), "--out", str(out), "--no-progress"],
        monkeypatch,
        capsys,
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "NaN" in lines[0], err
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["ae.tif", "nan.pt"]


def test_an_aether_raster_is_tied_to_the_model_not_the_file(tmp_path, monkeypatch, capsys):
    """Retraining the same config gives the same weights in a file of other bytes (date, metrics):
    its AETHER rasters are accepted. Other weights or another base window are refused, naming the
    part that differs."""
    from aether.infer.pipeline import embed_raster

    first = write_untrained_checkpoint(tmp_path / "first.pt", seed=0)
    raw = torch.load(first, weights_only=True)
    raw["metrics"], raw["epoch"] = {"train_loss": 1.0}, 7
    same = tmp_path / "same_weights.pt"
    torch.save(raw, same)
    assert same.read_bytes() != first.read_bytes()
    other_window = copy.deepcopy(raw)
    other_window["input"]["base_radius_m"] = 95.0
    torch.save(other_window, tmp_path / "window.pt")
    write_untrained_checkpoint(tmp_path / "other.pt", seed=1)
    ae = write_raster(tmp_path / "ae.tif", unit_field(20, 20))
    emb = embed_raster(str(ae), str(first), str(tmp_path / "aether.tif"), progress=False)

    def retrieve(ckpt: str) -> tuple[int, str]:
        code, _, err = run_script_in_process(
            "retrieve.py",
            [
                "--ckpt",
                str(tmp_path / ckpt),
                "--emb",
                str(emb),
                "--query",
                "a cafe",
                "--out",
                str(tmp_path / ckpt[:-3]),
                "--no-progress",
            ],
            monkeypatch,
            capsys,
        )
        return code, err

    assert retrieve("same_weights.pt")[0] == 0
    code, err = retrieve("other.pt")
    assert code == 2 and "AE projector weights differ; text projector weights differ" in err, err
    code, err = retrieve("window.pt")
    assert code == 2 and "base window: radius 45 m there, radius 95 m here" in err, err
    assert "weights differ" not in err
