"""Training: AdamW with warmup and a cosine schedule, spatial validation, checkpoints,
exact resume, and a clean stop on SIGINT / SIGTERM."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aether.train import distributed
from aether.model.checkpoint import atomic_copy, atomic_torch_save, load_checkpoint, make_checkpoint
from aether.cli.run import Interrupted
from aether.core.cluster import dask_client
from aether.config.schema import Config
from aether.core.log import log
from aether.data.dataset import PoiDataset, build_dataset
from aether.model.devices import pick_device
from aether.core.errors import AetherError
from aether.core.files import atomic_write, check_inputs_kept, folder_lock
from aether.model.loss import AetherLoss
from aether.model.metrics import recall_at_k
from aether.model.architectures import AetherModel
from aether.text.encoders import build_text_encoder, describe_encoder

KS = (1, 5, 10)
RUN_LOCK = ".train.lock"  # held in train.run_dir while a training run writes there

# Config keys that shape the model or the training trajectory: a resumed run must have the same.
# train.epochs may change (the schedule then follows the new count); file paths may move, the
# data themselves are compared by fingerprint once read.
RESUME_MUST_MATCH = (
    "data.n_bands", "data.base_radius_m", "data.aug_radius_m", "data.val_fraction", "data.val_block_m",
    "text.backend", "text.model", "text.dimensions",
    "model.arch", "model.latent_dim", "model.hidden_dim", "model.dropout", "model.gate",
    "loss.lam", "loss.temperature", "loss.ae_ae_temperature", "loss.learn_temperature", "loss.min_temperature",
    "train.batch_size", "train.lr", "train.weight_decay", "train.betas", "train.warmup_epochs", "train.min_lr_ratio",
    "train.seed",
)
# Config keys that shape the projectors: a checkpoint that training starts from (train.init_from) must have the same.
INIT_MUST_MATCH = ("model.arch", "model.latent_dim", "model.hidden_dim", "model.gate")


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written; create nothing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise AetherError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AetherError(f"{what}: cannot write to {existing} (permission denied)")


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
                stack.enter_context(folder_lock(run_dir, RUN_LOCK, f"run folder {run_dir}",
                                                "set another train.run_dir"))
            except AetherError as exc:
                error = str(exc)
        distributed.raise_if_any_failed(error)
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """The learning-rate factor at each step: linear warmup, then a cosine from 1 down to
    `min_ratio` (with no warmup, the reference's CosineAnnealingLR with eta_min = min_ratio x lr)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate_split(model: AetherModel, loss_fn: AetherLoss, base, aug, text) -> dict[str, float]:
    """Both loss terms and text-to-AE / AE-to-text Recall@k on one split (all rows at once)."""
    model.eval()
    b, a, t = model.ae(base), model.ae(aug), model.text(text)
    _, parts = loss_fn(b, a, t, *temperature_scales(model))
    out = {f"val_{k}": v for k, v in parts.items()}
    for k, v in recall_at_k(t, b, KS).items():
        out[f"val_t2ae_r{k}"] = v
    for k, v in recall_at_k(b, t, KS).items():
        out[f"val_ae2t_r{k}"] = v
    return out


def temperature_scales(model: AetherModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log logit scales in the order AetherLoss takes them: AE-POI, AE-AE."""
    return model.log_logit_scale, model.log_logit_scale_ae_ae


def global_batch_loss(net: torch.nn.Module, loss_fn: AetherLoss, scales: tuple[torch.Tensor, torch.Tensor],
                      base: torch.Tensor, aug: torch.Tensor, text: torch.Tensor,
                      shares: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a global batch of which this process holds the rows `base`, `aug`, `text`
    (rank r holds shares[r] rows): projected here, joined across processes with their gradients.
    `scales`: the log logit scales of the AE-POI and AE-AE terms."""
    b, a, t = (distributed.gather_rows(z, shares) for z in net(base, aug, text))
    return loss_fn(b, a, t, *scales)


def rng_states() -> dict:
    """The global random-number states (Python, NumPy, torch CPU and CUDA) as weights-only data."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(states["python"])
    saved = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
                         "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


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
        "AlphaEarth windows": digest(np.ascontiguousarray(dataset.base).tobytes(),
                                     np.ascontiguousarray(dataset.aug).tobytes()),
        "train/validation split": digest(np.ascontiguousarray(dataset.is_val).tobytes()),
    }


def _flatten(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def first_mismatch(ckpt: dict, cfg: Config, keys: tuple[str, ...]) -> tuple[str, object, object] | None:
    """The first of `keys` whose value in the checkpoint's config differs from `cfg`'s: (key, theirs, ours)."""
    saved, current = _flatten(ckpt["config"]), _flatten(cfg.to_dict())
    return next(((k, saved.get(k), current[k]) for k in keys if saved.get(k) != current[k]), None)


def resume_checkpoint(target: str | Path, cfg: Config) -> tuple[Path, dict]:
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
    ckpt = load_checkpoint(path)
    if "resume" not in ckpt:
        raise AetherError(f"cannot resume from {path}: it holds weights but no training state "
                          f"(best.pt never does); resume from the run folder or its last.pt")
    if ckpt.get("upgraded_from") == 1 and cfg.loss.learn_temperature:
        raise AetherError(f"cannot resume from {path}: it was written by an AETHER with one learned temperature, "
                          f"this one learns two; start a new run (train.init_from={path} keeps its weights)")
    mismatch = first_mismatch(ckpt, cfg, RESUME_MUST_MATCH)
    if mismatch:
        key, theirs, ours = mismatch
        raise AetherError(f"cannot resume from {path}: {key} is {ours!r} in this config but {theirs!r} in the "
                          f"checkpoint; resume with the config (and --set overrides) the run started with, or start "
                          f"a new run in another train.run_dir")
    return path, ckpt


def init_checkpoint(cfg: Config) -> dict | None:
    """The checkpoint train.init_from names (either format), checked against `cfg` before any
    heavy work: same projector shapes and the same text encoder (its text projector only
    understands that encoder's embeddings)."""
    if cfg.train.init_from is None:
        return None
    path = cfg.train.init_from
    run_dir = Path(cfg.train.run_dir)
    check_inputs_kept([run_dir / "best.pt", run_dir / "last.pt"], {path: "the checkpoint train.init_from starts from"},
                      "set train.run_dir to another folder, or copy the checkpoint elsewhere first")
    ckpt = load_checkpoint(path)
    mismatch = first_mismatch(ckpt, cfg, INIT_MUST_MATCH)
    if mismatch:
        key, theirs, ours = mismatch
        raise AetherError(f"config train.init_from: checkpoint {path} has {key} {theirs!r}, this config {ours!r}; "
                          f"set {key}={theirs} to start from its weights")
    if ckpt["input"]["n_bands"] != cfg.data.n_bands:
        raise AetherError(f"config train.init_from: checkpoint {path} takes {ckpt['input']['n_bands']} AlphaEarth "
                          f"bands, this config data.n_bands = {cfg.data.n_bands}")
    identity = build_text_encoder(cfg.text.backend, cfg.text.model, cfg.text.dimensions, cfg.text.base_url).identity
    theirs = {k: ckpt["text_encoder"].get(k) for k in identity}
    if theirs != identity:
        raise AetherError(f"config train.init_from: checkpoint {path} was trained with text encoder "
                          f"{describe_encoder(theirs)}, this config uses {describe_encoder(identity)}; its text "
                          f"projector only fits its own encoder: set text.backend, text.model and text.dimensions "
                          f"to match")
    return ckpt


def start_from(model: AetherModel, ckpt: dict, text_dim: int) -> None:
    """Load the projectors of an init_from checkpoint (the temperatures stay the config's)."""
    if ckpt["text_encoder"]["dim"] != text_dim:
        raise AetherError(f"config train.init_from: its text projector takes {ckpt['text_encoder']['dim']}-dimensional "
                          f"embeddings, the text encoder gives {text_dim}")
    weights = {k: v for k, v in ckpt["model"].items() if not k.startswith("log_logit_scale")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    wrong = [k for k in missing if not k.startswith("log_logit_scale")] + list(unexpected)
    if wrong:
        raise AetherError(f"config train.init_from: its weights do not fit this model ({wrong[0]})")


def check_resume_data(path: Path, ckpt: dict, dataset: PoiDataset, fingerprint: dict[str, str],
                      text_identity: dict | None) -> None:
    """Refuse to resume on other data than the checkpoint was trained on."""
    n_bands, text_dim = dataset.base.shape[1], dataset.text.shape[1]
    if ckpt["input"]["n_bands"] != n_bands:
        raise AetherError(f"cannot resume from {path}: it was trained on {ckpt['input']['n_bands']} AlphaEarth bands, "
                          f"this raster has {n_bands}")
    saved_text = ckpt["text_encoder"]
    current_text = {**(text_identity or saved_text), "dim": text_dim}
    if current_text != saved_text:
        raise AetherError(f"cannot resume from {path}: it was trained with text encoder {saved_text['model']} "
                          f"({saved_text['dim']} dimensions), this run uses {current_text['model']} "
                          f"({text_dim} dimensions)")
    changed = [part for part, digest in fingerprint.items() if ckpt["resume"]["data"].get(part) != digest]
    if changed:
        raise AetherError(f"cannot resume from {path}: the training data changed since it was written "
                          f"({', '.join(changed)} differ); resume with the same data.ae_tif, data.poi and column "
                          f"settings, or start a new run in another train.run_dir")


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
            atomic_copy(source_dir / "best.pt", run_dir / "best.pt")
        else:  # a best.pt there is another run's (the folder was given with --overwrite)
            (run_dir / "best.pt").unlink(missing_ok=True)


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask training to stop at the next step boundary instead
    of killing it (`signum` records which); a second signal raises KeyboardInterrupt at once.
    The previous handlers are restored on exit. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def check_run_dir_free(run_dir: Path, resume_from: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, to train into a folder that holds a trained model (best.pt or
    last.pt) unless `overwrite`, or unless the run resumes that very folder: a model is data."""
    if overwrite or (resume_from is not None and resume_from.parent.resolve() == run_dir.resolve()):
        return
    held = [name for name in ("best.pt", "last.pt") if (run_dir / name).exists()]
    if held:
        raise AetherError(f"run folder {run_dir} already holds a trained model ({', '.join(held)}); continue it with "
                          f"--resume {run_dir}, train into another folder (--set train.run_dir=...), or replace it "
                          f"with --overwrite")


def train(cfg: Config, progress: bool = True, dataset: PoiDataset | None = None,
          resume: str | Path | None = None, command: str | None = None,
          workers: int | None = None, scheduler: str | None = None, overwrite: bool = False) -> Path:
    """Train on the data `cfg` names; return the path of the best checkpoint.

    `resume` (a run folder, meaning its last.pt, or a checkpoint file) continues that run where
    it stopped: weights, temperature, optimizer, scheduler, random-number states and position,
    so on CPU the result is bit for bit that of an uninterrupted run. SIGINT or SIGTERM during
    training finishes the current step, saves last.pt there and raises `Interrupted`, whose
    message shows how to resume (`command`, the command line that started the run, plus --resume).
    `workers` (a local Dask cluster) or `scheduler` (an existing one) pools the POIs as Dask tasks.

    Under torchrun the N processes train together (see aether.train.distributed): train.batch_size is
    the global batch, every process takes its share of it and the loss is that of the whole
    batch, so with dropout 0 the weights are those of one process (up to float rounding). Only
    rank 0 validates, prints and writes files; last.pt resumes with any number of processes.
    A second training into the same train.run_dir is refused while this one runs (`hold_run_dir`),
    and a folder holding a trained model is refused unless the run resumes it or `overwrite`
    (which replaces its checkpoints and metrics).
    """
    run_dir = Path(cfg.train.run_dir)
    check_writable_dir(run_dir, "config train.run_dir")
    resume_path, resumed = resume_checkpoint(resume, cfg) if resume is not None else (None, None)
    init = init_checkpoint(cfg) if resumed is None else None  # a resumed run has its own weights
    device = pick_device(cfg.train.device)
    if cfg.train.batch_size < distributed.world_size():
        raise AetherError(f"config train.batch_size is {cfg.train.batch_size} but torchrun started "
                          f"{distributed.world_size()} processes, each needing rows of every batch; "
                          f"use train.batch_size >= {distributed.world_size()} or fewer processes")
    if distributed.world_size() > 1 and (workers is not None or scheduler is not None):
        raise AetherError("--workers / --scheduler pool POIs in one training process; under torchrun every process "
                          "pools its own copy, so run torchrun without them")
    with distributed.process_group(device), hold_run_dir(run_dir):  # before any heavy work (text encoding)
        check_run_dir_free(run_dir, resume_path, overwrite)
        return _train(cfg, device, progress and distributed.is_main(), dataset, resume_path, resumed, command,
                      workers, scheduler, init)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _diverged(epoch: int, step: int, steps_per_epoch: int, what: str, last_path: Path, first_epoch: int,
              resumed: bool, lr: float) -> str:
    """The one line that stops a run whose loss or weights stopped being finite, saying what
    `last_path` still holds (nothing of this run is saved after the divergence)."""
    if epoch > first_epoch:
        kept = f"{last_path} holds epoch {epoch - 1}, the last finished epoch"
    elif resumed:
        kept = f"{last_path} is unchanged since this run resumed"
    else:
        kept = "no checkpoint was written"
    return (f"training diverged at epoch {epoch}, step {step} of {steps_per_epoch}: {what}; {kept}; "
            f"lower train.lr (now {lr:g}) or check the inputs")


def _train(cfg: Config, device: torch.device, progress: bool, dataset: PoiDataset | None,
           resume_path: Path | None, resumed: dict | None, command: str | None,
           workers: int | None = None, scheduler: str | None = None, init: dict | None = None) -> Path:
    """`train` once the inputs are checked and the processes (if several) joined."""
    run_dir = Path(cfg.train.run_dir)
    main = distributed.is_main()
    start = time.time()
    seed_everything(cfg.train.seed)
    encoder = None
    if dataset is None:
        with dask_client(workers, scheduler) as client:
            dataset, _, encoder = build_dataset(cfg, progress=progress, client=client,
                                                min_train_pois=max(2, distributed.world_size()))
    identity = encoder.identity if encoder is not None else {"backend": cfg.text.backend, "model": cfg.text.model,
                                                             "dimensions": cfg.text.dimensions}
    fingerprint = data_fingerprint(dataset)
    if resumed is not None:
        check_resume_data(resume_path, resumed, dataset, fingerprint, encoder.identity if encoder else None)
    seed_everything(cfg.train.seed)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    train_rows = np.flatnonzero(~dataset.is_val)
    val_rows = np.flatnonzero(dataset.is_val)
    log(f"split: {len(train_rows)} train, {len(val_rows)} validation POIs "
        + (f"(spatial blocks of {cfg.data.val_block_m:g} m)" if cfg.data.val_fraction > 0 else "(data.val_fraction = 0)"))
    if len(train_rows) < max(2, distributed.world_size()):
        raise AetherError(f"only {len(train_rows)} training POIs; contrastive training needs at least 2"
                          + (f", and one for each of the {distributed.world_size()} processes"
                             if distributed.world_size() > 2 else ""))
    if main:  # only now: a refusal above leaves no empty run folder
        run_dir.mkdir(parents=True, exist_ok=True)
    base, aug, text = tensor(dataset.base), tensor(dataset.aug), tensor(dataset.text)
    text_dim = dataset.text.shape[1]
    model = AetherModel.from_config(cfg, dataset.base.shape[1], text_dim)
    if init is not None:
        start_from(model, init, text_dim)
        log(f"starting from the projectors of {cfg.train.init_from}")
    model = model.to(device)
    net = distributed.wrap(model, device)
    distributed.seed_own_stream(cfg.train.seed)
    loss_fn = AetherLoss(cfg.loss.lam, cfg.loss.min_temperature)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
    batch = min(cfg.train.batch_size, len(train_rows))
    steps_per_epoch = max(1, len(train_rows) // batch)  # full batches only: InfoNCE needs its negatives
    shares, mine = distributed.shard_sizes(batch), distributed.my_rows(batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(cfg.train.epochs * steps_per_epoch, cfg.train.warmup_epochs * steps_per_epoch,
                                      cfg.train.min_lr_ratio))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    metrics_path = run_dir / "metrics.jsonl"
    best_score, best_path, last_path = -math.inf, run_dir / "best.pt", run_dir / "last.pt"
    keep_best = len(val_rows) >= 2  # "best" needs a validation score; on training loss it would mean nothing
    first_epoch, first_step, totals, record = 1, 0, None, {}
    if resumed is None:
        if main:
            for old in (best_path, last_path):  # a folder with a model gets here only with --overwrite
                if old.exists():
                    log(f"replacing {old} (--overwrite)")
                    old.unlink()
            metrics_path.write_text("")
    else:
        state = resumed["resume"]
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["epoch_generator"])
        by_rank = state.get("rng_by_rank", [state["rng"]])
        if len(by_rank) == distributed.world_size():
            set_rng_states(by_rank[distributed.rank()])
        elif main:  # another process count: rank 0 continues the saved stream, the others their own
            set_rng_states(state["rng"])
        first_epoch, first_step, totals = state["epoch"], state["step"], state["totals"]
        best_score, record = state["best_score"], resumed["metrics"]
        start -= state["elapsed_s"]
        if main:
            carry_over_run_files(resume_path.parent, run_dir, first_epoch - 1)
        saved_epochs = resumed["config"]["train"]["epochs"]
        log(f"resuming {resume_path} at epoch {first_epoch}, step {first_step} of {steps_per_epoch}"
            + (f" (train.epochs is {cfg.train.epochs} here, {saved_epochs} in the checkpoint: the learning-rate "
               f"schedule follows {cfg.train.epochs})" if saved_epochs != cfg.train.epochs else ""))
        if first_epoch > cfg.train.epochs:
            log(f"nothing to train: the checkpoint is past train.epochs = {cfg.train.epochs}")
            return best_path if keep_best else last_path

    def save_last(epoch: int, step: int, epoch_generator: torch.Tensor, totals: dict) -> None:
        """last.pt with the state to continue at `step` of `epoch` (epoch's shuffle from `epoch_generator`).
        Every rank calls it (each one's random states go in), rank 0 writes it."""
        rngs = distributed.gather_objects(rng_states())
        if not main:
            return
        state = {"epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch, "epoch_generator": epoch_generator,
                 "totals": dict(totals), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rngs[0], "best_score": best_score, "elapsed_s": time.time() - start,
                 "data": fingerprint}
        if len(rngs) > 1:
            state["rng_by_rank"] = rngs
        atomic_torch_save(make_checkpoint(model, cfg, identity, text_dim, epoch - 1, record, resume=state), last_path)

    bar = tqdm(range(first_epoch, cfg.train.epochs + 1), initial=first_epoch - 1, total=cfg.train.epochs,
               desc="training", unit="epoch", disable=not progress)
    with StopOnSignal() as stop:
        for epoch in bar:
            model.train()
            if epoch > first_epoch or totals is None:
                totals = {"loss": 0.0, "ae_ae": 0.0, "ae_poi": 0.0}
            epoch_generator = generator.get_state()
            order = torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=generator)]
            for step in range(first_step if epoch == first_epoch else 0, steps_per_epoch):
                signum = distributed.max_over_ranks(stop.signum or 0)  # all ranks stop at the same step
                if signum:
                    if not weights_finite(model):  # the step before the signal diverged: keep the last good last.pt
                        bar.close()
                        raise AetherError(_diverged(epoch, step, steps_per_epoch, "the weights are not finite",
                                                    last_path, first_epoch, resumed is not None, cfg.train.lr))
                    save_last(epoch, step, epoch_generator, totals)
                    bar.close()
                    how = (f"{command} --resume {shlex.quote(str(run_dir))}" if command
                           else f"train(cfg, resume={str(run_dir)!r})")
                    raise Interrupted(f"interrupted by {signal.Signals(signum).name} at epoch {epoch}, "
                                      f"step {step} of {steps_per_epoch}; checkpoint saved to {last_path}; "
                                      f"resume with: {how}", 128 + signum)
                idx = order[step * batch:(step + 1) * batch][mine].to(device)
                loss, parts = global_batch_loss(net, loss_fn, temperature_scales(model), base[idx], aug[idx],
                                                text[idx], shares)
                if not math.isfinite(parts["loss"]):  # the same global loss on every rank: all stop here
                    bar.close()
                    raise AetherError(_diverged(epoch, step + 1, steps_per_epoch, f"the loss is {parts['loss']}",
                                                last_path, first_epoch, resumed is not None, cfg.train.lr))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for k in totals:
                    totals[k] += parts[k] / steps_per_epoch
            if not weights_finite(model):  # the last step's update
                bar.close()
                raise AetherError(_diverged(epoch, steps_per_epoch, steps_per_epoch, "the weights are not finite",
                                            last_path, first_epoch, resumed is not None, cfg.train.lr))
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in totals.items()},
                      "lr": scheduler.get_last_lr()[0],
                      "temperature": 1.0 / float(loss_fn.logit_scale(model.log_logit_scale.detach())),
                      "temperature_ae_ae": 1.0 / float(loss_fn.logit_scale(model.log_logit_scale_ae_ae.detach()))}
            if main:  # validation, metrics.jsonl and best.pt are rank 0's
                if len(val_rows) >= 2:
                    vi = torch.from_numpy(val_rows).to(device)
                    record.update(evaluate_split(model, loss_fn, base[vi], aug[vi], text[vi]))
                record["elapsed_s"] = round(time.time() - start, 2)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                score = record.get("val_t2ae_r10", -math.inf)
                if keep_best and score > best_score:  # best.pt before last.pt: a kill between them replays this epoch
                    best_score = score
                    atomic_torch_save(make_checkpoint(model, cfg, identity, text_dim, epoch, record), best_path)
            save_last(epoch + 1, 0, generator.get_state(), {k: 0.0 for k in totals})
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            **({"R@10": f"{record['val_t2ae_r10']:.3f}"} if "val_t2ae_r10" in record else {}))
    bar.close()
    final = record
    if not keep_best:
        why = ("no validation split (data.val_fraction = 0)" if cfg.data.val_fraction == 0 else
               f"the spatial split holds {len(val_rows)} validation POIs (data.val_fraction = "
               f"{cfg.data.val_fraction:g}, blocks of {cfg.data.val_block_m:g} m), too few to score")
        log(f"{why}: no best.pt is written; last.pt holds the weights after the last epoch")
    if "val_t2ae_r10" in final:
        chance = min(1.0, 10 / len(val_rows))
        log(f"validation ({len(val_rows)} POIs): text-to-AE R@1/5/10 = {final['val_t2ae_r1']:.3f} / "
            f"{final['val_t2ae_r5']:.3f} / {final['val_t2ae_r10']:.3f} (chance R@10 = {chance:.3f}); "
            f"best R@10 = {best_score:.3f}")
    log(f"checkpoints: {f'{best_path} (best), ' if keep_best else ''}{last_path} (last); metrics: {metrics_path}; "
        f"{time.time() - start:.1f} s")
    return best_path if keep_best else last_path
