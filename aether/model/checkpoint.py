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
import math
import pickle
import shutil
import warnings
from pathlib import Path

import torch

from aether.config.schema import Config, config_from_dict
from aether.core.log import log
from aether.core.errors import AetherError, first_line
from aether.core.files import atomic_write
from aether.model.architectures import AE_INNER_DIM, AetherModel
from aether.config.reference import clipped_temperature, radius_m, translate_config, window_text
from aether.text.encoders import describe_encoder

FORMAT = "aether-checkpoint"
FORMAT_VERSION = 2
_REFERENCE_KEYS = ("ae_state_dict", "txt_state_dict", "hyper_parameters")
# The reference AEProj's tensors by size name (its shortcut is the identity, with no tensors, when bands == d).
AE_SHAPES = {"proj.0.weight": ("256", "bands"), "proj.0.bias": ("256",), "proj.2.weight": ("d", "256"),
             "proj.2.bias": ("d",), "shortcut.weight": ("d", "bands"), "shortcut.bias": ("d",),
             "post_mlp.0.weight": ("hidden", "d"), "post_mlp.0.bias": ("hidden",), "post_mlp.3.weight": ("d", "hidden"),
             "post_mlp.3.bias": ("d",)}
_announced: set[str] = set()  # reference checkpoints whose window was already reported


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
    the training state that `aether.train.loop.train` continues from.
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
    """Read and check a checkpoint of either format, in this project's form; a truncated,
    foreign or malformed file is an AetherError that says what was expected."""
    path = Path(path)
    if path.is_dir():
        held = [name for name in ("best.pt", "last.pt") if (path / name).is_file()]
        raise AetherError(f"checkpoint {path} is a folder; give a checkpoint file"
                          + (f" such as {path / held[0]}" if held else ""))
    if not path.is_file():
        raise AetherError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only met something other than tensors and plain data
        raise AetherError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): it holds more than "
                          f"tensors and plain data (pickled code or objects are refused, never run)") from None
    except Exception as exc:  # torch raises several types for a damaged file
        raise AetherError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): "
                          f"{first_line(exc)}") from None
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        ckpt = _upgrade(raw, path)
    elif isinstance(raw, dict) and all(k in raw for k in _REFERENCE_KEYS[:2]):
        ckpt = _from_reference(raw, path)
    else:
        raise AetherError(f"checkpoint {path} is neither an AETHER checkpoint (format {FORMAT!r}) nor one of the "
                          f"reference code's (a dict with {', '.join(_REFERENCE_KEYS)})")
    _check_structure(ckpt, path)
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[AetherModel, Config]:
    """Rebuild the model (eval mode) and its config from a loaded checkpoint."""
    cfg = config_from_dict(ckpt["config"])
    model = AetherModel.from_config(cfg, ckpt["input"]["n_bands"], ckpt["text_encoder"]["dim"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise AetherError(f"checkpoint weights do not match its config (model.arch {cfg.model.arch}): "
                          f"{first_line(exc)}") from None
    return model.eval(), cfg


def model_identity(ckpt: dict) -> dict[str, str]:
    """What determines the AETHER vectors a checkpoint makes and the queries it answers, part by
    part: digests of the AE and text projectors' weights (with the architecture), the base window
    and the text encoder. Retraining the same config gives the same identity, whatever the file's
    bytes (which hold the date, metrics and training state)."""
    arch = ckpt["config"].get("model", {}).get("arch", "mlp")

    def digest(prefix: str) -> str:
        h = hashlib.sha256(f"{arch}\0{prefix}".encode())
        for key in sorted(k for k in ckpt["model"] if k.startswith(prefix)):
            tensor = ckpt["model"][key].detach().cpu().contiguous()
            h.update(f"{key}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
            h.update(tensor.numpy().tobytes())
        return h.hexdigest()[:16]

    return {"AE projector": digest("ae."), "text projector": digest("text."),
            "base window": f"radius {float(ckpt['input']['base_radius_m']):g} m",
            "text encoder": describe_encoder(ckpt["text_encoder"])}


def describe_window(ckpt: dict) -> str | None:
    """For a reference checkpoint, its base window in the reference's terms and in metres."""
    if ckpt.get("origin") != "reference":
        return None
    r = ckpt["reference"]["pix_radius"]
    return f"base window {window_text(r)} = radius {radius_m(r):g} m"


def _upgrade(ckpt: dict, path: Path) -> dict:
    """A checkpoint of this project's format in the current version's form."""
    version = ckpt.get("format_version")
    if version == FORMAT_VERSION:
        return ckpt
    if version != 1:
        raise AetherError(f"checkpoint {path} has format version {version!r}; this AETHER reads versions 1 and "
                          f"{FORMAT_VERSION}")
    config, weights = ckpt.get("config"), ckpt.get("model")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config = {**config, "model": {**config["model"], "arch": "mlp"}}  # version 1 had only the MLP
        config = config_from_dict(config).to_dict()  # the keys added since, at their defaults
    if isinstance(weights, dict) and "log_logit_scale" in weights:
        weights = {**weights, "log_logit_scale_ae_ae": weights["log_logit_scale"].clone()}  # one temperature
    return {**ckpt, "format_version": FORMAT_VERSION, "upgraded_from": 1, "config": config, "model": weights}


def _shape_error(path: Path, part: str, key: str, got, expected: str) -> AetherError:
    return AetherError(f"checkpoint {path}: {part} {key} has shape {tuple(got)}, expected {expected} "
                       f"(the reference's AEProj/TextProj)")


def _reference_shapes(path: Path, ae: dict, txt: dict) -> tuple[int, int, int, int, bool]:
    """Check the reference's state dicts against AEProj and TextProj; (n_bands, d, hidden,
    text_dim, has_gate)."""
    for part, state in (("ae_state_dict", ae), ("txt_state_dict", txt)):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AetherError(f"checkpoint {path}: {part} must be a dict of tensors")

    def tensor(part: str, state: dict, key: str, ndim: int) -> torch.Tensor:
        if key not in state:
            raise AetherError(f"checkpoint {path}: {part} has no {key} (the reference's "
                              f"{'AEProj' if part == 'ae_state_dict' else 'TextProj'} needs it)")
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
            raise _shape_error(path, "ae_state_dict", key, got, f"({', '.join(symbolic[key])}) = {shape} with "
                                                                f"bands = {n_bands}, d = {d}, hidden = {hidden}")
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


def _from_reference(raw: dict, path: Path) -> dict:
    """A reference-code checkpoint in this project's form (the shapes come from its tensors, the
    rest from its hyper_parameters)."""
    hp = raw.get("hyper_parameters")
    if not isinstance(hp, dict) or not isinstance(hp.get("data", {}), dict):
        raise AetherError(f"checkpoint {path}: hyper_parameters must be the reference's training config (a dict); "
                          f"it names the text encoder and the window")
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
    cfg = config_from_dict(config)
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
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "origin": "reference",
        "reference": {"pix_radius": pix_radius, "model_types": raw.get("model_types"),
                      "created_at": raw.get("created_at"), "cfg_hash": raw.get("cfg_hash")},
        "model": weights,
        "config": cfg.to_dict(),
        "input": {"n_bands": n_bands, "base_radius_m": cfg.data.base_radius_m,
                  "aug_radius_m": cfg.data.aug_radius_m},
        "text_encoder": {"backend": cfg.text.backend, "model": cfg.text.model, "dimensions": cfg.text.dimensions,
                         "dim": text_dim},
        "epoch": raw.get("epoch"),
        "metrics": {"train": raw.get("train_metrics"), "val": raw.get("val_metrics")},
    }
    if str(path.resolve()) not in _announced:
        _announced.add(str(path.resolve()))
        log(f"reference checkpoint {path.name}: {describe_window(ckpt)} "
            f"(a window of ground radius (pix_radius + 0.5) x 10 m, in each raster's own pixels)")
    return ckpt


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
            raise AetherError(f"checkpoint {path}: weight {key} holds NaN or infinite values (training diverged); "
                              f"use an earlier checkpoint")
