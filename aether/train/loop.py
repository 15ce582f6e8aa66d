"""Training: AdamW with warmup and a cosine schedule, spatial validation, checkpoints,
exact resume, and a clean stop on SIGINT / SIGTERM.

`train` checks the inputs and joins the processes; `_Training` then runs in steps: `prepare`
(data, model, optimizer, schedule), `restore` (from a checkpoint being resumed), `epoch` (the
optimizer steps, stopping cleanly on a signal) and `end_of_epoch` (validation, metrics.jsonl,
best.pt, last.pt), with one way out when the loss or weights stop being finite (`diverged`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aether.config.schema import Config
from aether.core.cluster import Cluster, dask_client
from aether.core.errors import AetherError, Interrupted
from aether.core.files import check_writable_dir
from aether.data.dataset import PoiDataset, build_dataset
from aether.model.architectures import AetherModel
from aether.model.checkpoint import Checkpoint, TextSpec
from aether.model.devices import pick_device
from aether.model.loss import AetherLoss
from aether.model.metrics import KS, recall_at_k
from aether.train import distributed
from aether.train.state import (
    carry_over_run_files,
    check_resume_data,
    check_run_dir_free,
    data_fingerprint,
    hold_run_dir,
    init_checkpoint,
    resume_checkpoint,
    rng_states,
    set_rng_states,
    start_from,
)

logger = logging.getLogger(__name__)


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


def global_batch_loss(
    net: torch.nn.Module,
    loss_fn: AetherLoss,
    scales: tuple[torch.Tensor, torch.Tensor],
    base: torch.Tensor,
    aug: torch.Tensor,
    text: torch.Tensor,
    shares: list[int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a global batch of which this process holds the rows `base`, `aug`, `text`
    (rank r holds shares[r] rows): projected here, joined across processes with their gradients.
    `scales`: the log logit scales of the AE-POI and AE-AE terms."""
    b, a, t = (distributed.gather_rows(z, shares) for z in net(base, aug, text))
    return loss_fn(b, a, t, *scales)


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask training to stop at the next step boundary instead
    of killing it (`signum` records which); a second signal raises KeyboardInterrupt at once.
    The previous handlers are restored on exit. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
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


def train(
    cfg: Config,
    progress: bool = True,
    dataset: PoiDataset | None = None,
    resume: str | Path | None = None,
    command: str | None = None,
    cluster: Cluster | None = None,
    overwrite: bool = False,
) -> Path:
    """Train on the data `cfg` names; return the path of the best checkpoint.

    `resume` (a run folder, meaning its last.pt, or a checkpoint file) continues that run where
    it stopped: weights, temperature, optimizer, scheduler, random-number states and position,
    so on CPU the result is bit for bit that of an uninterrupted run. SIGINT or SIGTERM during
    training finishes the current step, saves last.pt there and raises `Interrupted`, whose
    message shows how to resume (`command`, the command line that started the run, plus --resume).
    A Dask `cluster` pools the POIs as tasks on its workers.

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
    cluster = (cluster or Cluster()).check()
    resumed = resume_checkpoint(resume, cfg) if resume is not None else None
    init = init_checkpoint(cfg) if resumed is None else None  # a resumed run has its own weights
    device = pick_device(cfg.train.device)
    if cfg.train.batch_size < distributed.world_size():
        raise AetherError(
            f"config train.batch_size is {cfg.train.batch_size} but torchrun started "
            f"{distributed.world_size()} processes, each needing rows of every batch; "
            f"use train.batch_size >= {distributed.world_size()} or fewer processes"
        )
    if distributed.world_size() > 1 and cluster.given:
        raise AetherError(
            "--workers / --scheduler pool POIs in one training process; under torchrun every process "
            "pools its own copy, so run torchrun without them"
        )
    with distributed.process_group(device), hold_run_dir(run_dir):  # before any heavy work (text encoding)
        check_run_dir_free(run_dir, resumed.path if resumed else None, overwrite)
        run = _Training(cfg, device, progress and distributed.is_main(), command)
        run.prepare(dataset, cluster, resumed, init)
        if resumed is not None and not run.restore(resumed):
            return run.result_path
        return run.run()


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class _Position:
    """Where training is: the epoch and step to do next, the running totals of the epoch, the best
    validation score so far and the last epoch's record."""

    epoch: int = 1
    step: int = 0
    totals: dict | None = None
    best_score: float = -math.inf
    record: dict | None = None


class _Training:
    """One training run, once its inputs are checked and its processes (if several) joined."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool, command: str | None):
        self.cfg, self.device, self.progress, self.command = cfg, device, progress, command
        self.run_dir = Path(cfg.train.run_dir)
        self.main = distributed.is_main()
        self.start = time.time()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.best_path, self.last_path = self.run_dir / "best.pt", self.run_dir / "last.pt"
        self.at = _Position(record={})
        self.first_epoch = 1
        self.resumed = False
        self.bar = None

    # ---- prepare ---------------------------------------------------------------------------------

    def prepare(
        self, dataset: PoiDataset | None, cluster: Cluster, resumed: Checkpoint | None, init: Checkpoint | None
    ) -> None:
        """The data (pooled, encoded, split), the model (from `init`'s projectors if given), the
        optimizer and the learning-rate schedule; a new run's folder."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        encoder = None
        if dataset is None:
            with dask_client(cluster) as client:
                dataset, _, encoder = build_dataset(
                    cfg, progress=self.progress, client=client, min_train_pois=max(2, distributed.world_size())
                )
        identity = (
            encoder.identity
            if encoder is not None
            else {"backend": cfg.text.backend, "model": cfg.text.model, "dimensions": cfg.text.dimensions}
        )
        self.fingerprint = data_fingerprint(dataset)
        if resumed is not None:
            check_resume_data(resumed, dataset, self.fingerprint, encoder.identity if encoder else None)
        seed_everything(cfg.train.seed)
        self.train_rows = np.flatnonzero(~dataset.is_val)
        self.val_rows = np.flatnonzero(dataset.is_val)
        logger.info(
            f"split: {len(self.train_rows)} train, {len(self.val_rows)} validation POIs "
            + (
                f"(spatial blocks of {cfg.data.val_block_m:g} m)"
                if cfg.data.val_fraction > 0
                else "(data.val_fraction = 0)"
            )
        )
        if len(self.train_rows) < max(2, distributed.world_size()):
            raise AetherError(
                f"only {len(self.train_rows)} training POIs; contrastive training needs at least 2"
                + (
                    f", and one for each of the {distributed.world_size()} processes"
                    if distributed.world_size() > 2
                    else ""
                )
            )
        if self.main:  # only now: a refusal above leaves no empty run folder
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.base, self.aug, self.text = (self._tensor(a) for a in (dataset.base, dataset.aug, dataset.text))
        self.text_spec = TextSpec(**identity, dim=dataset.text.shape[1])
        model = AetherModel.from_config(cfg, dataset.base.shape[1], self.text_spec.dim)
        if init is not None:
            start_from(model, init, self.text_spec.dim)
            logger.info(f"starting from the projectors of {cfg.train.init_from}")
        self.model = model.to(self.device)
        self.net = distributed.wrap(self.model, self.device)
        distributed.seed_own_stream(cfg.train.seed)
        self.loss_fn = AetherLoss(cfg.loss.lam, cfg.loss.min_temperature)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.train.lr,
            betas=tuple(cfg.train.betas),
            weight_decay=cfg.train.weight_decay,
        )
        self.batch = min(cfg.train.batch_size, len(self.train_rows))
        self.steps_per_epoch = max(1, len(self.train_rows) // self.batch)  # full batches: InfoNCE needs negatives
        self.shares, self.mine = distributed.shard_sizes(self.batch), distributed.my_rows(self.batch)
        total, warmup = cfg.train.epochs * self.steps_per_epoch, cfg.train.warmup_epochs * self.steps_per_epoch
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total, warmup, cfg.train.min_lr_ratio)
        )
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.keep_best = len(self.val_rows) >= 2  # "best" needs a validation score; training loss would mean nothing
        if resumed is None and self.main:
            for old in (self.best_path, self.last_path):  # a folder with a model gets here only with --overwrite
                if old.exists():
                    logger.info(f"replacing {old} (--overwrite)")
                    old.unlink()
            self.metrics_path.write_text("")

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @property
    def result_path(self) -> Path:
        return self.best_path if self.keep_best else self.last_path

    # ---- restore ---------------------------------------------------------------------------------

    def restore(self, resumed: Checkpoint) -> bool:
        """Continue where `resumed` stopped: weights, optimizer, schedule, shuffle and random states,
        position, best score, metrics.jsonl (and best.pt, into another folder). False when the
        checkpoint is already past train.epochs (nothing to train)."""
        state = resumed.resume
        self.model.load_state_dict(resumed.weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.generator.set_state(state["epoch_generator"])
        by_rank = state.get("rng_by_rank", [state["rng"]])
        if len(by_rank) == distributed.world_size():
            set_rng_states(by_rank[distributed.rank()])
        elif self.main:  # another process count: rank 0 continues the saved stream, the others their own
            set_rng_states(state["rng"])
        self.at = _Position(state["epoch"], state["step"], state["totals"], state["best_score"], resumed.metrics)
        self.first_epoch, self.resumed = self.at.epoch, True
        self.start -= state["elapsed_s"]
        if self.main:
            carry_over_run_files(resumed.path.parent, self.run_dir, self.at.epoch - 1)
        saved_epochs, epochs = resumed.config.train.epochs, self.cfg.train.epochs
        logger.info(
            f"resuming {resumed.path} at epoch {self.at.epoch}, step {self.at.step} of {self.steps_per_epoch}"
            + (
                f" (train.epochs is {epochs} here, {saved_epochs} in the checkpoint: the learning-rate "
                f"schedule follows {epochs})"
                if saved_epochs != epochs
                else ""
            )
        )
        if self.at.epoch > epochs:
            logger.info(f"nothing to train: the checkpoint is past train.epochs = {epochs}")
            return False
        return True

    # ---- run -------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Every epoch left, then the summary; the path of the checkpoint to use."""
        cfg = self.cfg
        self.bar = tqdm(
            range(self.at.epoch, cfg.train.epochs + 1),
            initial=self.at.epoch - 1,
            total=cfg.train.epochs,
            desc="training",
            unit="epoch",
            disable=not self.progress,
        )
        with StopOnSignal() as stop:
            for epoch in self.bar:
                self.epoch(epoch, stop)
                self.end_of_epoch(epoch)
        self.bar.close()
        self.summary()
        return self.result_path

    def epoch(self, epoch: int, stop: StopOnSignal) -> None:
        """The optimizer steps of `epoch` (from the resumed step, in the first epoch of a resumed run)."""
        self.model.train()
        if epoch > self.first_epoch or self.at.totals is None:
            self.at.totals = {"loss": 0.0, "ae_ae": 0.0, "ae_poi": 0.0}
        self.epoch_generator = self.generator.get_state()
        order = torch.from_numpy(self.train_rows)[torch.randperm(len(self.train_rows), generator=self.generator)]
        for step in range(self.at.step if epoch == self.first_epoch else 0, self.steps_per_epoch):
            signum = distributed.max_over_ranks(stop.signum or 0)  # all ranks stop at the same step
            if signum:
                self.stop(epoch, step, signum)
            idx = order[step * self.batch : (step + 1) * self.batch][self.mine].to(self.device)
            loss, parts = global_batch_loss(
                self.net,
                self.loss_fn,
                temperature_scales(self.model),
                self.base[idx],
                self.aug[idx],
                self.text[idx],
                self.shares,
            )
            if not math.isfinite(parts["loss"]):  # the same global loss on every rank: all stop here
                self.diverged(epoch, step + 1, f"the loss is {parts['loss']}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            for k in self.at.totals:
                self.at.totals[k] += parts[k] / self.steps_per_epoch
        if not weights_finite(self.model):  # the last step's update
            self.diverged(epoch, self.steps_per_epoch, "the weights are not finite")

    def stop(self, epoch: int, step: int, signum: int) -> None:
        """A signal asked the run to stop before `step`: last.pt there, and `Interrupted`."""
        if not weights_finite(self.model):  # the step before the signal diverged: keep the last good last.pt
            self.diverged(epoch, step, "the weights are not finite")
        self.save_last(epoch, step, self.epoch_generator, self.at.totals)
        self.bar.close()
        how = (
            f"{self.command} --resume {shlex.quote(str(self.run_dir))}"
            if self.command
            else f"train(cfg, resume={str(self.run_dir)!r})"
        )
        raise Interrupted(
            f"interrupted by {signal.Signals(signum).name} at epoch {epoch}, step {step} of "
            f"{self.steps_per_epoch}; checkpoint saved to {self.last_path}; resume with: {how}",
            128 + signum,
        )

    def diverged(self, epoch: int, step: int, what: str) -> None:
        """Stop a run whose loss or weights stopped being finite, in one line saying what last.pt still
        holds (nothing of this run is saved after the divergence)."""
        self.bar.close()
        if epoch > self.first_epoch:
            kept = f"{self.last_path} holds epoch {epoch - 1}, the last finished epoch"
        elif self.resumed:
            kept = f"{self.last_path} is unchanged since this run resumed"
        else:
            kept = "no checkpoint was written"
        raise AetherError(
            f"training diverged at epoch {epoch}, step {step} of {self.steps_per_epoch}: {what}; "
            f"{kept}; lower train.lr (now {self.cfg.train.lr:g}) or check the inputs"
        )

    def end_of_epoch(self, epoch: int) -> None:
        """The epoch's record, validation, metrics.jsonl and best.pt (rank 0's), then last.pt."""
        model, totals = self.model, self.at.totals
        record = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in totals.items()},
            "lr": self.schedule.get_last_lr()[0],
            "temperature": 1.0 / float(self.loss_fn.logit_scale(model.log_logit_scale.detach())),
            "temperature_ae_ae": 1.0 / float(self.loss_fn.logit_scale(model.log_logit_scale_ae_ae.detach())),
        }
        self.at.record = record
        if self.main:
            if len(self.val_rows) >= 2:
                vi = torch.from_numpy(self.val_rows).to(self.device)
                record.update(evaluate_split(model, self.loss_fn, self.base[vi], self.aug[vi], self.text[vi]))
            record["elapsed_s"] = round(time.time() - self.start, 2)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            score = record.get("val_t2ae_r10", -math.inf)
            if self.keep_best and score > self.at.best_score:  # best.pt before last.pt: a kill between replays it
                self.at.best_score = score
                self._checkpoint(epoch, record).save(self.best_path)
        self.save_last(epoch + 1, 0, self.generator.get_state(), {k: 0.0 for k in totals})
        self.bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            **({"R@10": f"{record['val_t2ae_r10']:.3f}"} if "val_t2ae_r10" in record else {}),
        )

    def _checkpoint(self, epoch: int, record: dict, resume: dict | None = None) -> Checkpoint:
        return Checkpoint.of(self.model, self.cfg, self.text_spec, epoch, record, resume)

    def save_last(self, epoch: int, step: int, epoch_generator: torch.Tensor, totals: dict) -> None:
        """last.pt with the state to continue at `step` of `epoch` (the epoch's shuffle from
        `epoch_generator`). Every rank calls it (each one's random states go in), rank 0 writes it."""
        rngs = distributed.gather_objects(rng_states())
        if not self.main:
            return
        state = {
            "epoch": epoch,
            "step": step,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_generator": epoch_generator,
            "totals": dict(totals),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "rng": rngs[0],
            "best_score": self.at.best_score,
            "elapsed_s": time.time() - self.start,
            "data": self.fingerprint,
        }
        if len(rngs) > 1:
            state["rng_by_rank"] = rngs
        self._checkpoint(epoch - 1, self.at.record, state).save(self.last_path)

    def summary(self) -> None:
        cfg, final = self.cfg, self.at.record
        if not self.keep_best:
            why = (
                "no validation split (data.val_fraction = 0)"
                if cfg.data.val_fraction == 0
                else f"the spatial split holds {len(self.val_rows)} validation POIs (data.val_fraction = "
                f"{cfg.data.val_fraction:g}, blocks of {cfg.data.val_block_m:g} m), too few to score"
            )
            logger.info(f"{why}: no best.pt is written; last.pt holds the weights after the last epoch")
        if "val_t2ae_r10" in final:
            chance = min(1.0, 10 / len(self.val_rows))
            logger.info(
                f"validation ({len(self.val_rows)} POIs): text-to-AE R@1/5/10 = {final['val_t2ae_r1']:.3f} / "
                f"{final['val_t2ae_r5']:.3f} / {final['val_t2ae_r10']:.3f} (chance R@10 = {chance:.3f}); "
                f"best R@10 = {self.at.best_score:.3f}"
            )
        logger.info(
            f"checkpoints: {f'{self.best_path} (best), ' if self.keep_best else ''}{self.last_path} (last); "
            f"metrics: {self.metrics_path}; {time.time() - self.start:.1f} s"
        )
