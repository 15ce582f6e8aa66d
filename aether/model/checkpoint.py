"""Checkpoints: one self-contained file, written atomically, checked when read.

Two formats are read, without executing pickled code (torch.load with weights_only):
- this project's ("aether-checkpoint", version 2; version 1, written before model.arch and the
  AE-AE temperature existed, reads as arch mlp with one temperature). Every checkpoint holds what
  inference needs (weights, config, input facts, text encoder); `last.pt` also holds a "resume"
  entry: optimizer, scheduler, random-number states, the position in training and the best score
  so far, so `train(..., resume=...)` continues exactly.
- the reference code's (inwind0212/AETHER: ae_state_dict, txt_state_dict, hyper_parameters, ...),
  translated on reading into this project's form, marked "origin": "reference".
Either is checked (keys, types, tensor shapes, finite weights) before anything uses it.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aether.config.schema import Config, validate_config
from aether.core.errors import AetherError, first_line
from aether.core.files import atomic_write
from aether.model.architectures import AetherModel
from aether.model.reference import REFERENCE_KEYS, describe_window, from_reference, is_reference_checkpoint
from aether.text.encoders import describe_encoder

logger = logging.getLogger(__name__)

FORMAT = "aether-checkpoint"
FORMAT_VERSION = 2


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through `atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Copy `source` to `path` through `atomic_write`."""
    with atomic_write(path) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


@dataclass(frozen=True)
class TextSpec:
    """The frozen text encoder a checkpoint's text projector was trained on, and its output size."""

    backend: str
    model: str
    dimensions: int | None
    dim: int

    @property
    def identity(self) -> dict:
        """backend, model and dimensions: what `aether.text.encoders` builds an encoder from and keys its cache by."""
        return {"backend": self.backend, "model": self.model, "dimensions": self.dimensions}

    def describe(self) -> str:
        return describe_encoder(self.identity)


@dataclass
class Checkpoint:
    """One trained model, as its file holds it: the single definition of the checkpoint format.

    Every checkpoint holds what inference needs (weights, config, the window radii, the text
    encoder); `last.pt` also holds `resume`, the state `aether.train.loop.train` continues from.
    `load` reads either format (this project's, any version; the reference code's, translated by
    `aether.model.reference`) and checks keys, types, shapes and finite weights first.
    """

    weights: dict[str, torch.Tensor]
    config: Config
    n_bands: int
    base_radius_m: float
    aug_radius_m: float
    text: TextSpec
    epoch: int | None = None
    metrics: dict = field(default_factory=dict)
    resume: dict | None = None  # training state, last.pt only
    origin: str = "aether"  # or "reference": read from the reference code's format
    reference: dict | None = None  # what a reference checkpoint says of itself (pix_radius, ...)
    upgraded_from: int | None = None  # the format version it was read from, when older
    path: Path | None = None  # the file it was read from

    @classmethod
    def of(
        cls, model: AetherModel, cfg: Config, text: TextSpec, epoch: int, metrics: dict, resume: dict | None = None
    ) -> Checkpoint:
        """A checkpoint of `model` trained with `cfg`: `epoch` is the last finished epoch and `metrics`
        its record; `resume` (last.pt only) the training state."""
        return cls(
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            cfg,
            cfg.data.n_bands,
            cfg.data.base_radius_m,
            cfg.data.aug_radius_m,
            text,
            epoch,
            metrics,
            resume,
        )

    def to_dict(self) -> dict:
        """The file's contents (format version FORMAT_VERSION)."""
        raw = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.weights,
            "config": self.config.to_dict(),
            "input": {"n_bands": self.n_bands, "base_radius_m": self.base_radius_m, "aug_radius_m": self.aug_radius_m},
            "text_encoder": {**self.text.identity, "dim": self.text.dim},
            "epoch": self.epoch,
            "metrics": self.metrics,
        }
        if self.resume is not None:
            raw["resume"] = self.resume
        if self.origin != "aether":
            raw.update(origin=self.origin, reference=self.reference)
        return raw

    def save(self, path: str | Path) -> None:
        """Write the checkpoint to `path`, atomically."""
        atomic_torch_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read and check a checkpoint of either format; a truncated, foreign or malformed file is an
        AetherError that says what was expected."""
        path = Path(path)
        if path.is_dir():
            held = [name for name in ("best.pt", "last.pt") if (path / name).is_file()]
            raise AetherError(
                f"checkpoint {path} is a folder; give a checkpoint file"
                + (f" such as {path / held[0]}" if held else "")
            )
        if not path.is_file():
            raise AetherError(f"checkpoint {path} does not exist")
        try:
            with warnings.catch_warnings():  # torch warns of pickle protocols before refusing a foreign file
                warnings.simplefilter("ignore")
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only met something other than tensors and plain data
            raise AetherError(
                f"checkpoint {path} cannot be read (truncated or not a checkpoint): it holds more than "
                f"tensors and plain data (pickled code or objects are refused, never run)"
            ) from None
        except Exception as exc:  # torch raises several types for a damaged file
            raise AetherError(
                f"checkpoint {path} cannot be read (truncated or not a checkpoint): {first_line(exc)}"
            ) from None
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            raw = _upgrade(raw, path)
        elif is_reference_checkpoint(raw):
            raw = from_reference(raw, path)
        else:
            raise AetherError(
                f"checkpoint {path} is neither an AETHER checkpoint (format {FORMAT!r}) nor one of the "
                f"reference code's (a dict with {', '.join(REFERENCE_KEYS)})"
            )
        _check_structure(raw, path)
        encoder = raw["text_encoder"]
        return cls(
            raw["model"],
            validate_config(raw["config"]),
            raw["input"]["n_bands"],
            float(raw["input"]["base_radius_m"]),
            float(raw["input"]["aug_radius_m"]),
            TextSpec(encoder["backend"], encoder["model"], encoder.get("dimensions"), encoder["dim"]),
            raw.get("epoch"),
            raw.get("metrics") or {},
            raw.get("resume"),
            raw.get("origin", "aether"),
            raw.get("reference"),
            raw.get("upgraded_from"),
            path,
        )

    def build_model(self) -> AetherModel:
        """The model (eval mode) with these weights."""
        model = AetherModel.from_config(self.config, self.n_bands, self.text.dim)
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as exc:
            raise AetherError(
                f"checkpoint weights do not match its config (model.arch {self.config.model.arch}): {first_line(exc)}"
            ) from None
        return model.eval()

    def identity(self) -> dict[str, str]:
        """What determines the AETHER vectors this checkpoint makes and the queries it answers, part
        by part: digests of the AE and text projectors' weights (with the architecture), the base
        window and the text encoder. Retraining the same config gives the same identity, whatever
        the file's bytes (which hold the date, metrics and training state)."""
        arch = self.config.model.arch

        def digest(prefix: str) -> str:
            h = hashlib.sha256(f"{arch}\0{prefix}".encode())
            for key in sorted(k for k in self.weights if k.startswith(prefix)):
                tensor = self.weights[key].detach().cpu().contiguous()
                h.update(f"{key}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
                h.update(tensor.numpy().tobytes())
            return h.hexdigest()[:16]

        return {
            "AE projector": digest("ae."),
            "text projector": digest("text."),
            "base window": f"radius {self.base_radius_m:g} m",
            "text encoder": self.text.describe(),
        }

    def window(self) -> str | None:
        """For a reference checkpoint, its base window in the reference's terms and in metres."""
        return describe_window(self.reference["pix_radius"]) if self.origin == "reference" else None


def _upgrade(ckpt: dict, path: Path) -> dict:
    """A checkpoint of this project's format in the current version's form."""
    version = ckpt.get("format_version")
    if version == FORMAT_VERSION:
        return ckpt
    if version != 1:
        raise AetherError(
            f"checkpoint {path} has format version {version!r}; this AETHER reads versions 1 and {FORMAT_VERSION}"
        )
    config, weights = ckpt.get("config"), ckpt.get("model")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config = {**config, "model": {**config["model"], "arch": "mlp"}}  # version 1 had only the MLP
        config = validate_config(config).to_dict()  # the keys added since, at their defaults
    if isinstance(weights, dict) and "log_logit_scale" in weights:
        weights = {**weights, "log_logit_scale_ae_ae": weights["log_logit_scale"].clone()}  # one temperature
    return {**ckpt, "format_version": FORMAT_VERSION, "upgraded_from": 1, "config": config, "model": weights}


def _check_structure(ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint whose entries are missing, of the wrong type or not finite, naming the entry."""

    def need(container: dict, key: str, types, where: str):
        if not isinstance(container, dict) or key not in container:
            raise AetherError(f"checkpoint {path} has no {where}{key}; it is damaged or was not written by AETHER")
        value, allowed = container[key], types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise AetherError(f"checkpoint {path}: {where}{key} must be {names}, got {type(value).__name__}")
        return value

    weights = need(ckpt, "model", dict, "")
    need(ckpt, "config", dict, "")
    entry = need(ckpt, "input", dict, "")
    need(entry, "n_bands", int, "input.")
    need(entry, "base_radius_m", (int, float), "input.")
    need(entry, "aug_radius_m", (int, float), "input.")
    encoder = need(ckpt, "text_encoder", dict, "")
    need(encoder, "backend", str, "text_encoder.")
    need(encoder, "model", str, "text_encoder.")
    need(encoder, "dim", int, "text_encoder.")
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise AetherError(f"checkpoint {path}: weight {key} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AetherError(
                f"checkpoint {path}: weight {key} holds NaN or infinite values (training diverged); "
                f"use an earlier checkpoint"
            )
