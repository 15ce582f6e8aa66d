"""The reference code's checkpoints (inwind0212/AETHER: `ae_state_dict`, `txt_state_dict`,
`hyper_parameters`, ...), read into this project's checkpoint format: every tensor's shape checked
against its AEProj and TextProj, its training config translated leniently (`aether.config.reference`),
and its window reported once in the metres it means."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from aether.config.reference import clipped_temperature, radius_m, translate_config, window_text
from aether.config.schema import validate_config
from aether.core.errors import AetherError
from aether.geo.alphaearth import PIXEL_M
from aether.model.architectures import AE_INNER_DIM

logger = logging.getLogger(__name__)

REFERENCE_KEYS = ("ae_state_dict", "txt_state_dict", "hyper_parameters")


# The reference AEProj's tensors by size name (its shortcut is the identity, with no tensors, when bands == d).
AE_SHAPES = {
    "proj.0.weight": ("256", "bands"),
    "proj.0.bias": ("256",),
    "proj.2.weight": ("d", "256"),
    "proj.2.bias": ("d",),
    "shortcut.weight": ("d", "bands"),
    "shortcut.bias": ("d",),
    "post_mlp.0.weight": ("hidden", "d"),
    "post_mlp.0.bias": ("hidden",),
    "post_mlp.3.weight": ("d", "hidden"),
    "post_mlp.3.bias": ("d",),
}


_announced: set[str] = set()  # reference checkpoints whose window was already reported


def _shape_error(path: Path, part: str, key: str, got, expected: str) -> AetherError:
    return AetherError(
        f"checkpoint {path}: {part} {key} has shape {tuple(got)}, expected {expected} (the reference's AEProj/TextProj)"
    )


def _reference_shapes(path: Path, ae: dict, txt: dict) -> tuple[int, int, int, int, bool]:
    """Check the reference's state dicts against AEProj and TextProj; (n_bands, d, hidden,
    text_dim, has_gate)."""
    for part, state in (("ae_state_dict", ae), ("txt_state_dict", txt)):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AetherError(f"checkpoint {path}: {part} must be a dict of tensors")

    def tensor(part: str, state: dict, key: str, ndim: int) -> torch.Tensor:
        if key not in state:
            raise AetherError(
                f"checkpoint {path}: {part} has no {key} (the reference's "
                f"{'AEProj' if part == 'ae_state_dict' else 'TextProj'} needs it)"
            )
        if state[key].dim() != ndim:
            raise AetherError(f"checkpoint {path}: {part} {key} has {state[key].dim()} dimensions, expected {ndim}")
        return state[key]

    w0 = tensor("ae_state_dict", ae, "proj.0.weight", 2)
    n_bands = w0.shape[1]
    d = tensor("ae_state_dict", ae, "proj.2.weight", 2).shape[0]
    hidden = tensor("ae_state_dict", ae, "post_mlp.0.weight", 2).shape[0]
    text_dim = tensor("txt_state_dict", txt, "proj.weight", 2).shape[1]
    sizes = {"256": AE_INNER_DIM, "bands": n_bands, "d": d, "hidden": hidden}
    symbolic = dict(AE_SHAPES if n_bands != d else {k: v for k, v in AE_SHAPES.items() if not k.startswith("shortcut")})
    expected = {key: tuple(sizes[n] for n in names) for key, names in symbolic.items()}
    for key, shape in expected.items():
        got = tensor("ae_state_dict", ae, key, len(shape)).shape
        if tuple(got) != shape:
            raise _shape_error(
                path,
                "ae_state_dict",
                key,
                got,
                f"({', '.join(symbolic[key])}) = {shape} with bands = {n_bands}, d = {d}, hidden = {hidden}",
            )
    has_gate = "gate" in ae
    if has_gate and tuple(ae["gate"].shape) != (1,):
        raise _shape_error(path, "ae_state_dict", "gate", ae["gate"].shape, "(1,)")
    extra = sorted(set(ae) - set(expected) - {"gate"})
    if extra:
        raise AetherError(f"checkpoint {path}: ae_state_dict has {extra[0]}, which the reference's AEProj does not")
    txt_expected = {"proj.weight": (d, text_dim), "proj.bias": (d,)}
    for key, shape in txt_expected.items():
        got = tensor("txt_state_dict", txt, key, len(shape)).shape
        if tuple(got) != shape:
            raise _shape_error(path, "txt_state_dict", key, got, f"{shape} (d = {d} from ae_state_dict)")
    extra = sorted(set(txt) - set(txt_expected))
    if extra:
        raise AetherError(f"checkpoint {path}: txt_state_dict has {extra[0]}, which the reference's TextProj does not")
    return n_bands, d, hidden, text_dim, has_gate


def is_reference_checkpoint(raw) -> bool:
    """Is this what torch.load read from one of the reference code's checkpoint files?"""
    return isinstance(raw, dict) and all(k in raw for k in REFERENCE_KEYS[:2])


def describe_window(pix_radius: int) -> str:
    """The reference's base window in its own terms and in metres."""
    return f"base window {window_text(pix_radius)} = radius {radius_m(pix_radius):g} m"


def from_reference(raw: dict, path: Path) -> dict:
    """A reference-code checkpoint as the entries of this project's format (the shapes come from its
    tensors, the rest from its hyper_parameters), for `aether.model.checkpoint.Checkpoint` to read."""
    hp = raw.get("hyper_parameters")
    if not isinstance(hp, dict) or not isinstance(hp.get("data", {}), dict):
        raise AetherError(
            f"checkpoint {path}: hyper_parameters must be the reference's training config (a dict); "
            f"it names the text encoder and the window"
        )
    n_bands, d, hidden, text_dim, has_gate = _reference_shapes(path, raw["ae_state_dict"], raw["txt_state_dict"])
    try:
        config = translate_config(hp, lenient=True)  # how it was trained: read to use it, not to train again
    except AetherError as exc:
        raise AetherError(f"checkpoint {path} hyper_parameters: {exc}") from None
    config.setdefault("model", {}).update(latent_dim=d, hidden_dim=hidden, gate=has_gate)
    config.setdefault("data", {})["n_bands"] = n_bands
    temps = raw.get("temps") if isinstance(raw.get("temps"), dict) else {}
    loss = config.setdefault("loss", {})
    for key, target in (("tau_xt", "temperature"), ("tau_ii", "ae_ae_temperature")):
        if isinstance(temps.get(key), (int, float)) and not isinstance(temps[key], bool) and math.isfinite(temps[key]):
            loss[target] = clipped_temperature(float(temps[key]))
    cfg = validate_config(config)
    cfg.text.cache_dir = str(path.resolve().parent / "cache")  # its own, on the machine it was trained on, is not here
    if cfg.text.backend == "openai" and cfg.text.dimensions is None:
        cfg.text.dimensions = text_dim  # the reference asks OpenAI for emb_dim, which the text projector takes
    weights = {f"ae.{k}": v for k, v in raw["ae_state_dict"].items()}
    weights.update({f"text.{k}": v for k, v in raw["txt_state_dict"].items()})
    tau_ae = cfg.loss.ae_ae_temperature or cfg.loss.temperature
    weights["log_logit_scale"] = torch.tensor(math.log(1.0 / cfg.loss.temperature))
    weights["log_logit_scale_ae_ae"] = torch.tensor(math.log(1.0 / tau_ae))
    pix_radius = int(hp["data"]["pix_radius"])  # translate_config has checked it
    ckpt = {
        "origin": "reference",
        "reference": {
            "pix_radius": pix_radius,
            "model_types": raw.get("model_types"),
            "created_at": raw.get("created_at"),
            "cfg_hash": raw.get("cfg_hash"),
        },
        "model": weights,
        "config": cfg.to_dict(),
        "input": {"n_bands": n_bands, "base_radius_m": cfg.data.base_radius_m, "aug_radius_m": cfg.data.aug_radius_m},
        "text_encoder": {
            "backend": cfg.text.backend,
            "model": cfg.text.model,
            "dimensions": cfg.text.dimensions,
            "dim": text_dim,
        },
        "epoch": raw.get("epoch"),
        "metrics": {"train": raw.get("train_metrics"), "val": raw.get("val_metrics")},
    }
    if str(path.resolve()) not in _announced:
        _announced.add(str(path.resolve()))
        logger.info(
            f"reference checkpoint {path.name}: {describe_window(pix_radius)} (a window of ground radius "
            f"(pix_radius + 0.5) x {PIXEL_M:g} m, in each raster's own pixels)"
        )
    return ckpt
