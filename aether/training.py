"""Training: AdamW with warmup and a cosine schedule, spatial validation, checkpoints."""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aether.checkpoint import atomic_torch_save, make_checkpoint
from aether.config import Config
from aether.dataset import PoiDataset, build_dataset, log
from aether.errors import AetherError
from aether.loss import AetherLoss
from aether.metrics import recall_at_k
from aether.model import AetherModel

KS = (1, 5, 10)


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AetherError("device cuda was asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    return torch.device(name)


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written; create nothing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise AetherError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AetherError(f"{what}: cannot write to {existing} (permission denied)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate_split(model: AetherModel, loss_fn: AetherLoss, base, aug, text) -> dict[str, float]:
    """Both loss terms and text-to-AE / AE-to-text Recall@k on one split (all rows at once)."""
    model.eval()
    b, a, t = model.ae(base), model.ae(aug), model.text(text)
    _, parts = loss_fn(b, a, t, model.log_logit_scale)
    out = {f"val_{k}": v for k, v in parts.items()}
    for k, v in recall_at_k(t, b, KS).items():
        out[f"val_t2ae_r{k}"] = v
    for k, v in recall_at_k(b, t, KS).items():
        out[f"val_ae2t_r{k}"] = v
    return out


def train(cfg: Config, progress: bool = True, dataset: PoiDataset | None = None) -> Path:
    """Train on the data `cfg` names; return the path of the best checkpoint."""
    run_dir = Path(cfg.train.run_dir)
    check_writable_dir(run_dir, "config train.run_dir")
    start = time.time()
    seed_everything(cfg.train.seed)
    encoder = None
    if dataset is None:
        dataset, _, encoder = build_dataset(cfg, progress=progress)
    identity = encoder.identity if encoder is not None else {"backend": cfg.text.backend, "model": cfg.text.model,
                                                             "dimensions": cfg.text.dimensions}
    device = pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    run_dir.mkdir(parents=True, exist_ok=True)
    train_rows = np.flatnonzero(~dataset.is_val)
    val_rows = np.flatnonzero(dataset.is_val)
    log(f"split: {len(train_rows)} train, {len(val_rows)} validation POIs (spatial blocks of {cfg.data.val_block_m:g} m)")
    if len(train_rows) < 2:
        raise AetherError(f"only {len(train_rows)} training POIs; contrastive training needs at least 2")
    base, aug, text = tensor(dataset.base), tensor(dataset.aug), tensor(dataset.text)
    model = AetherModel(dataset.base.shape[1], dataset.text.shape[1], cfg.model.latent_dim, cfg.model.hidden_dim,
                        cfg.model.dropout, cfg.loss.temperature, cfg.loss.learn_temperature).to(device)
    loss_fn = AetherLoss(cfg.loss.lam, cfg.loss.min_temperature)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batch = min(cfg.train.batch_size, len(train_rows))
    steps_per_epoch = max(1, len(train_rows) // batch)  # full batches only: InfoNCE needs its negatives
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(cfg.train.epochs * steps_per_epoch, cfg.train.warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    best_score, best_path = -math.inf, run_dir / "best.pt"
    bar = tqdm(range(1, cfg.train.epochs + 1), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=generator)]
        totals = {"loss": 0.0, "ae_ae": 0.0, "ae_poi": 0.0}
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch].to(device)
            loss, parts = loss_fn(model.ae(base[idx]), model.ae(aug[idx]), model.text(text[idx]), model.log_logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for k in totals:
                totals[k] += parts[k] / steps_per_epoch
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in totals.items()},
                  "lr": scheduler.get_last_lr()[0],
                  "temperature": 1.0 / float(loss_fn.logit_scale(model.log_logit_scale.detach()))}
        if len(val_rows) >= 2:
            vi = torch.from_numpy(val_rows).to(device)
            record.update(evaluate_split(model, loss_fn, base[vi], aug[vi], text[vi]))
        record["elapsed_s"] = round(time.time() - start, 2)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        score = record.get("val_t2ae_r10", -record["train_loss"])
        ckpt = make_checkpoint(model, cfg, identity, dataset.text.shape[1], epoch, record)
        atomic_torch_save(ckpt, run_dir / "last.pt")
        if score > best_score:
            best_score = score
            atomic_torch_save(ckpt, best_path)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        **({"R@10": f"{record['val_t2ae_r10']:.3f}"} if "val_t2ae_r10" in record else {}))
    bar.close()
    final = record
    if "val_t2ae_r10" in final:
        chance = min(1.0, 10 / len(val_rows))
        log(f"validation ({len(val_rows)} POIs): text-to-AE R@1/5/10 = {final['val_t2ae_r1']:.3f} / "
            f"{final['val_t2ae_r5']:.3f} / {final['val_t2ae_r10']:.3f} (chance R@10 = {chance:.3f}); "
            f"best R@10 = {best_score:.3f}")
    log(f"checkpoints: {best_path} (best), {run_dir / 'last.pt'} (last); metrics: {metrics_path}; "
        f"{time.time() - start:.1f} s")
    return best_path
