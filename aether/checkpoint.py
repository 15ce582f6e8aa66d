"""Checkpoints: one self-contained file, written atomically, checked when read.

Every checkpoint holds what inference needs (weights, config, input facts, text encoder).
`last.pt` also holds a "resume" entry: optimizer, scheduler, random-number states, the
position in training and the best score so far, so `train(..., resume=...)` continues exactly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from aether.config import Config, config_from_dict
from aether.errors import AetherError, first_line
from aether.files import atomic_write
from aether.model import AetherModel

FORMAT = "aether-checkpoint"
FORMAT_VERSION = 1


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through `atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Copy `source` to `path` through `atomic_write`."""
    with atomic_write(path) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def make_checkpoint(model: AetherModel, cfg: Config, text_identity: dict, text_dim: int,
                    epoch: int, metrics: dict, resume: dict | None = None) -> dict:
    """Everything inference and retrieval need, with nothing else beside the file.

    `epoch` is the last finished epoch and `metrics` its record; `resume` (last.pt only) is
    the training state that `aether.training.train` continues from.
    """
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.to_dict(),
        "input": {
            "n_bands": cfg.data.n_bands,
            "base_radius_m": cfg.data.base_radius_m,
            "aug_radius_m": cfg.data.aug_radius_m,
        },
        "text_encoder": {**text_identity, "dim": text_dim},
        "epoch": epoch,
        "metrics": metrics,
    }
    if resume is not None:
        ckpt["resume"] = resume
    return ckpt


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint; a truncated or foreign file is an AetherError."""
    path = Path(path)
    if not path.is_file():
        raise AetherError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise AetherError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): "
                          f"{first_line(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise AetherError(f"checkpoint {path} is not an AETHER checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise AetherError(f"checkpoint {path} has format version {ckpt.get('format_version')}; "
                          f"this AETHER reads version {FORMAT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[AetherModel, Config]:
    """Rebuild the model (eval mode) and its config from a loaded checkpoint."""
    cfg = config_from_dict(ckpt["config"])
    model = AetherModel(ckpt["input"]["n_bands"], ckpt["text_encoder"]["dim"], cfg.model.latent_dim,
                        cfg.model.hidden_dim, cfg.model.dropout, cfg.loss.temperature, cfg.loss.learn_temperature)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise AetherError(f"checkpoint weights do not match its config: {first_line(exc)}") from None
    return model.eval(), cfg
