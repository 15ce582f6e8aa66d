"""What a training run starts from and continues: the run folder (locked, and not one that holds
another model), a checkpoint to resume exactly (same config, same data) or to start from
(`train.init_from`), and the random-number states and data digests a resume checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from aether.config.schema import Config
from aether.core.errors import AetherError
from aether.core.files import atomic_write, check_inputs_kept, folder_lock
from aether.data.dataset import PoiDataset
from aether.model.architectures import AetherModel
from aether.model.checkpoint import Checkpoint, TextSpec
from aether.text.encoders import build_text_encoder, describe_encoder
from aether.train import distributed

RUN_LOCK = ".train.lock"  # held in train.run_dir while a training run writes there


# Config keys that shape the model or the training trajectory: a resumed run must have the same.
# train.epochs may change (the schedule then follows the new count); file paths may move, the
# data themselves are compared by fingerprint once read.
RESUME_MUST_MATCH = (
    "data.n_bands",
    "data.base_radius_m",
    "data.aug_radius_m",
    "data.val_fraction",
    "data.val_block_m",
    "text.backend",
    "text.model",
    "text.dimensions",
    "model.arch",
    "model.latent_dim",
    "model.hidden_dim",
    "model.dropout",
    "model.gate",
    "loss.lam",
    "loss.temperature",
    "loss.ae_ae_temperature",
    "loss.learn_temperature",
    "loss.min_temperature",
    "train.batch_size",
    "train.lr",
    "train.weight_decay",
    "train.betas",
    "train.warmup_epochs",
    "train.min_lr_ratio",
    "train.seed",
)


# Config keys that shape the projectors: a checkpoint that training starts from (train.init_from) must have the same.
INIT_MUST_MATCH = ("model.arch", "model.latent_dim", "model.hidden_dim", "model.gate")


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir/.train.lock` for the block, so a second training into the same folder is
    refused in one line while this one lives (a dead run's lock blocks nothing: see
    `aether.core.files.RunLock`). Under torchrun rank 0 takes it and every rank learns whether it could.
    The folder is created here; a run that fails leaving it empty removes it again."""
    with contextlib.ExitStack() as stack:
        error = None
        if distributed.is_main():
            try:
                stack.enter_context(
                    folder_lock(run_dir, RUN_LOCK, f"run folder {run_dir}", "set another train.run_dir")
                )
            except AetherError as exc:
                error = str(exc)
        distributed.raise_if_any_failed(error)
        yield


def rng_states() -> dict:
    """The global random-number states (Python, NumPy, torch CPU and CUDA) as weights-only data."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(states["python"])
    saved = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


def data_fingerprint(dataset: PoiDataset) -> dict[str, str]:
    """SHA-256 digests of what training sees, by part: a resumed run must see the same."""

    def digest(*parts: bytes) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(part)
        return h.hexdigest()

    def text(items) -> bytes:
        return "\0".join(map(str, items)).encode("utf-8", "surrogatepass")

    return {
        "POI ids": digest(text(dataset.pois.ids)),
        "descriptions": digest(text(dataset.pois.texts)),
        "AlphaEarth windows": digest(
            np.ascontiguousarray(dataset.base).tobytes(), np.ascontiguousarray(dataset.aug).tobytes()
        ),
        "train/validation split": digest(np.ascontiguousarray(dataset.is_val).tobytes()),
    }


def _flatten(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def first_mismatch(ckpt: Checkpoint, cfg: Config, keys: tuple[str, ...]) -> tuple[str, object, object] | None:
    """The first of `keys` whose value in the checkpoint's config differs from `cfg`'s: (key, theirs, ours)."""
    saved, current = _flatten(ckpt.config.to_dict()), _flatten(cfg.to_dict())
    return next(((k, saved.get(k), current[k]) for k in keys if saved.get(k) != current[k]), None)


def resume_checkpoint(target: str | Path, cfg: Config) -> Checkpoint:
    """Find (a run folder means its last.pt), read and check the checkpoint to resume `cfg` from.

    Refuses, before any heavy work, a checkpoint without training state or one whose config
    differs from `cfg` in a key of RESUME_MUST_MATCH.
    """
    path = Path(target)
    if path.is_dir():
        path = path / "last.pt"
        if not path.is_file():
            raise AetherError(f"cannot resume: folder {target} holds no last.pt (is it a training run folder?)")
    elif not path.exists():
        raise AetherError(f"cannot resume: {target} does not exist (give a run folder or its last.pt)")
    ckpt = Checkpoint.load(path)
    if ckpt.resume is None:
        raise AetherError(
            f"cannot resume from {path}: it holds weights but no training state "
            f"(best.pt never does); resume from the run folder or its last.pt"
        )
    if ckpt.upgraded_from == 1 and cfg.loss.learn_temperature:
        raise AetherError(
            f"cannot resume from {path}: it was written by an AETHER with one learned temperature, "
            f"this one learns two; start a new run (train.init_from={path} keeps its weights)"
        )
    mismatch = first_mismatch(ckpt, cfg, RESUME_MUST_MATCH)
    if mismatch:
        key, theirs, ours = mismatch
        raise AetherError(
            f"cannot resume from {path}: {key} is {ours!r} in this config but {theirs!r} in the "
            f"checkpoint; resume with the config (and --set overrides) the run started with, or start "
            f"a new run in another train.run_dir"
        )
    return ckpt


def init_checkpoint(cfg: Config) -> Checkpoint | None:
    """The checkpoint train.init_from names (either format), checked against `cfg` before any
    heavy work: same projector shapes and the same text encoder (its text projector only
    understands that encoder's embeddings)."""
    if cfg.train.init_from is None:
        return None
    path = cfg.train.init_from
    run_dir = Path(cfg.train.run_dir)
    check_inputs_kept(
        [run_dir / "best.pt", run_dir / "last.pt"],
        {path: "the checkpoint train.init_from starts from"},
        "set train.run_dir to another folder, or copy the checkpoint elsewhere first",
    )
    ckpt = Checkpoint.load(path)
    mismatch = first_mismatch(ckpt, cfg, INIT_MUST_MATCH)
    if mismatch:
        key, theirs, ours = mismatch
        raise AetherError(
            f"config train.init_from: checkpoint {path} has {key} {theirs!r}, this config {ours!r}; "
            f"set {key}={theirs} to start from its weights"
        )
    if ckpt.n_bands != cfg.data.n_bands:
        raise AetherError(
            f"config train.init_from: checkpoint {path} takes {ckpt.n_bands} AlphaEarth "
            f"bands, this config data.n_bands = {cfg.data.n_bands}"
        )
    identity = build_text_encoder(cfg.text.backend, cfg.text.model, cfg.text.dimensions, cfg.text.base_url).identity
    theirs = ckpt.text.identity
    if theirs != identity:
        raise AetherError(
            f"config train.init_from: checkpoint {path} was trained with text encoder "
            f"{describe_encoder(theirs)}, this config uses {describe_encoder(identity)}; its text "
            f"projector only fits its own encoder: set text.backend, text.model and text.dimensions "
            f"to match"
        )
    return ckpt


def start_from(model: AetherModel, ckpt: Checkpoint, text_dim: int) -> None:
    """Load the projectors of an init_from checkpoint (the temperatures stay the config's)."""
    if ckpt.text.dim != text_dim:
        raise AetherError(
            f"config train.init_from: its text projector takes {ckpt.text.dim}-dimensional "
            f"embeddings, the text encoder gives {text_dim}"
        )
    weights = {k: v for k, v in ckpt.weights.items() if not k.startswith("log_logit_scale")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    wrong = [k for k in missing if not k.startswith("log_logit_scale")] + list(unexpected)
    if wrong:
        raise AetherError(f"config train.init_from: its weights do not fit this model ({wrong[0]})")


def check_resume_data(
    ckpt: Checkpoint, dataset: PoiDataset, fingerprint: dict[str, str], text_identity: dict | None
) -> None:
    """Refuse to resume on other data than the checkpoint was trained on."""
    path = ckpt.path
    n_bands, text_dim = dataset.base.shape[1], dataset.text.shape[1]
    if ckpt.n_bands != n_bands:
        raise AetherError(
            f"cannot resume from {path}: it was trained on {ckpt.n_bands} AlphaEarth bands, this raster has {n_bands}"
        )
    saved = ckpt.text
    current = TextSpec(**(text_identity or saved.identity), dim=text_dim)
    if current != saved:
        raise AetherError(
            f"cannot resume from {path}: it was trained with text encoder {saved.model} "
            f"({saved.dim} dimensions), this run uses {current.model} ({text_dim} dimensions)"
        )
    changed = [part for part, digest in fingerprint.items() if ckpt.resume["data"].get(part) != digest]
    if changed:
        raise AetherError(
            f"cannot resume from {path}: the training data changed since it was written "
            f"({', '.join(changed)} differ); resume with the same data.ae_tif, data.poi and column "
            f"settings, or start a new run in another train.run_dir"
        )


def carry_over_run_files(source_dir: Path, run_dir: Path, last_epoch: int) -> None:
    """Continue metrics.jsonl from the resumed run: keep its lines up to `last_epoch` (later ones
    were written after the checkpoint) and drop a line cut short by a kill. Resuming into another
    folder also takes the run's best.pt there, so 'best' keeps its meaning."""
    kept = []
    source = source_dir / "metrics.jsonl"
    if source.is_file():
        for line in source.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("epoch", math.inf) <= last_epoch:
                kept.append(line + "\n")
    with atomic_write(run_dir / "metrics.jsonl") as f:
        f.write("".join(kept).encode("utf-8"))
    if source_dir.resolve() != run_dir.resolve():
        if (source_dir / "best.pt").is_file():
            with atomic_write(run_dir / "best.pt") as f, open(source_dir / "best.pt", "rb") as src:
                shutil.copyfileobj(src, f)
        else:  # a best.pt there is another run's (the folder was given with --overwrite)
            (run_dir / "best.pt").unlink(missing_ok=True)


def check_run_dir_free(run_dir: Path, resume_from: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, to train into a folder that holds a trained model (best.pt or
    last.pt) unless `overwrite`, or unless the run resumes that very folder: a model is data."""
    if overwrite or (resume_from is not None and resume_from.parent.resolve() == run_dir.resolve()):
        return
    held = [name for name in ("best.pt", "last.pt") if (run_dir / name).exists()]
    if held:
        raise AetherError(
            f"run folder {run_dir} already holds a trained model ({', '.join(held)}); continue it with "
            f"--resume {run_dir}, train into another folder (--set train.run_dir=...), or replace it "
            f"with --overwrite"
        )
