"""A training run's curves (losses, validation recall, learning rate and temperatures) from its
metrics.jsonl (one JSON object per epoch, as training writes it), as one PNG. matplotlib is used
without pyplot (a Figure on the Agg canvas), so no global backend changes."""

from __future__ import annotations

import json
from pathlib import Path

from aether.core.errors import AetherError
from aether.core.files import atomic_write, check_output_file
from aether.model.metrics import KS

# which metrics.jsonl keys go in which panel, and how each is drawn
LOSS_KEYS = [("loss", "total"), ("ae_ae", "AE-AE"), ("ae_poi", "AE-POI")]
RECALL_KEYS = [
    (f"val_{direction}_r{k}", f"{name} R@{k}")
    for k in KS
    for direction, name in (("t2ae", "text→AE"), ("ae2t", "AE→text"))
]


def read_metrics(path: str | Path) -> list[dict]:
    """The epochs of a metrics.jsonl file, each a dict with at least 'epoch'."""
    path = Path(path)
    if not path.is_file():
        raise AetherError(f"metrics file {path} does not exist; train.py writes it as <run_dir>/metrics.jsonl")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AetherError(
                f"{path} line {number} is not JSON ({exc.msg}); expected one JSON object per epoch, as train.py writes"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), (int, float)):
            raise AetherError(
                f"{path} line {number} has no numeric 'epoch'; expected one JSON object per epoch, as train.py writes"
            )
        rows.append(row)
    if not rows:
        raise AetherError(f"metrics file {path} is empty; train it first (python train.py --cfg config.yaml)")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row["epoch"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(metrics: str | Path, out: str | Path) -> Path:
    """Write a PNG of losses (train solid, validation dashed), validation recalls, and
    learning rate with temperature from a metrics.jsonl file; returns the path."""
    out = Path(out)
    check_output_file(out, example="picture.png", suffixes=(".png",))
    rows = read_metrics(metrics)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13.5, 4.3), dpi=100, layout="constrained")
    loss_ax, recall_ax, lr_ax = fig.subplots(1, 3)
    colours = ["tab:blue", "tab:orange", "tab:green"]
    for colour, (suffix, name) in zip(colours, LOSS_KEYS):
        for split, style in (("train", "-"), ("val", "--")):
            epochs, values = _series(rows, f"{split}_{suffix}")
            if epochs:
                loss_ax.plot(epochs, values, style, color=colour, marker=".", label=f"{split} {name}")
    loss_ax.set(title="InfoNCE losses", xlabel="epoch", ylabel="loss")
    _legend_below(loss_ax)

    recall_colours = ["tab:purple", "tab:red", "tab:brown"]
    drawn = False
    for i, (key, name) in enumerate(RECALL_KEYS):
        epochs, values = _series(rows, key)
        if epochs:
            recall_ax.plot(
                epochs, values, "-" if i % 2 == 0 else "--", color=recall_colours[i // 2], marker=".", label=name
            )
            drawn = True
    recall_ax.set(title="validation recall", xlabel="epoch", ylabel="recall")
    if drawn:
        recall_ax.set_ylim(bottom=0)
        _legend_below(recall_ax)
    else:
        recall_ax.text(0.5, 0.5, "no validation metrics", ha="center", va="center", transform=recall_ax.transAxes)

    epochs, values = _series(rows, "lr")
    if epochs:
        lr_ax.plot(epochs, values, color="tab:gray", marker=".", label="learning rate")
    lr_ax.set(title="schedule", xlabel="epoch", ylabel="learning rate")
    epochs, values = _series(rows, "temperature")
    if epochs:
        temp_ax = lr_ax.twinx()
        temp_ax.plot(epochs, values, ":", color="tab:cyan", marker=".", label="temperature")
        temp_ax.set_ylabel("temperature")
        handles = lr_ax.get_legend_handles_labels()[0] + temp_ax.get_legend_handles_labels()[0]
        _legend_below(lr_ax, handles=handles)
    for ax in (loss_ax, recall_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"training curves: {metrics}", fontsize=10)
    with atomic_write(out) as f:
        fig.savefig(f, format="png")
    return out


def _legend_below(ax, **kwargs) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, fontsize=8, frameon=False, **kwargs)
