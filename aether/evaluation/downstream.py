"""The paper's downstream comparison on a user's own zone labels: AlphaEarth, AETHER and an
untrained AETHER pair, each averaged per zone (`aether.infer.zonal`), the same linear model fitted
on the same spatially blocked folds.

Tasks: `classification` (a class column: macro-F1 and accuracy), `regression` (a number column:
R^2 and MAE) and `distribution` (columns that sum to 1 per zone, such as shares of classes: the KL
divergence of the predicted from the true distribution, as the paper's socio-economic mapping).
With `zero_shot`, zones are also classified with no training, by the cosine of their AETHER vector
to each class name's text embedding: AETHER's own advantage, AlphaEarth has no text side.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aether.core.errors import AetherError
from aether.core.files import atomic_write, atomic_write_text, check_writable_dir
from aether.evaluation.probes import spatial_folds
from aether.geo.raster import RasterInfo
from aether.geo.tiles import is_tile_set
from aether.geo.zones import read_zones
from aether.infer.zonal import ALPHAEARTH, projected_source, zone_sums
from aether.model.checkpoint import Checkpoint
from aether.model.embed import embed_texts, text_encoder_of
from aether.model.projector import unit_rows

logger = logging.getLogger(__name__)

TASKS = ("classification", "regression", "distribution")
FEATURE_SETS = {ALPHAEARTH: "AlphaEarth", "aether": "AETHER", "untrained": "untrained AETHER"}
METRICS = {  # per task: (name, label, higher is better)
    "classification": [("macro_f1", "macro-F1", True), ("accuracy", "accuracy", True)],
    "regression": [("r2", "R^2", True), ("mae", "MAE", False)],
    "distribution": [("kl", "KL divergence", False)],
}
DEFAULT_PROMPT = "a place of {label}"
SUM_TOLERANCE = 1e-3  # how far a distribution's shares may sum from 1
KL_FLOOR = 1e-6  # predicted shares are kept at least this, so KL stays finite
LABEL_SEED = 0
PENALTIES = np.logspace(-3, 1, 5)  # logistic regression's inverse penalty C, chosen by inner folds
INNER_FOLDS = 3


@dataclass(frozen=True)
class LabelOptions:
    """What `aether evaluate --labels` compares: `target` of the zones in `labels` (a column; for a
    distribution, comma-separated columns or a pattern such as share_*) as `task`."""

    labels: str
    target: str
    task: str = "classification"
    id_column: str | None = None
    folds: int = 5
    block_m: float | None = None  # the folds' spatial blocks (default: the checkpoint's data.val_block_m)
    zero_shot: bool = False
    prompt: str = DEFAULT_PROMPT
    ae_tif: str | None = None

    def check(self) -> LabelOptions:
        if self.task not in TASKS:
            raise AetherError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.folds < 2:
            raise AetherError(f"--folds must be at least 2, got {self.folds}")
        if self.block_m is not None and not self.block_m > 0:
            raise AetherError(f"--block-m must be positive, got {self.block_m}")
        if self.zero_shot and self.task != "classification":
            raise AetherError("--zero-shot classifies zones by class names: it needs --task classification")
        if self.zero_shot and "{label}" not in self.prompt:
            raise AetherError(f"--prompt must contain {{label}}, got {self.prompt!r}")
        return self


def target_values(attributes, options: LabelOptions, path: str) -> tuple[np.ndarray, list[str]]:
    """The task's target per zone, and its names (classes, the number column, or the share columns);
    refused in one line when the columns are missing or their values do not fit the task."""
    import pandas

    columns = [c for c in attributes.columns]
    if options.task == "distribution":
        names = []
        for part in (p.strip() for p in options.target.split(",") if p.strip()):
            matched = [c for c in columns if fnmatch.fnmatchcase(str(c), part)]
            if not matched:
                raise AetherError(f"labels file {path} has no column matching {part!r}; it has {_some(columns)}")
            names += [c for c in matched if c not in names]
        if len(names) < 2:
            raise AetherError(f"--target names {len(names)} column; a distribution needs two or more")
        values = attributes[names].apply(pandas.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1)
        sums = values.sum(axis=1)
        bad |= np.abs(sums - 1) > SUM_TOLERANCE
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise AetherError(
                f"labels file {path}: {int(bad.sum())} zones' shares in {', '.join(map(str, names))} are not "
                f"non-negative numbers summing to 1 (row {row} sums to {sums[row]:g})"
            )
        return values / sums[:, None], [str(n) for n in names]
    if options.target not in columns:
        raise AetherError(f"labels file {path} has no column {options.target!r}; it has {_some(columns)}")
    column = attributes[options.target]
    if options.task == "regression":
        values = pandas.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise AetherError(f"labels file {path}: column {options.target!r} row {row} is not a number")
        return values, [options.target]
    if column.isna().any():
        raise AetherError(
            f"labels file {path}: column {options.target!r} has {int(column.isna().sum())} empty values; "
            "drop those zones or give them a class"
        )
    values = column.astype(str).to_numpy()
    classes = sorted(set(values.tolist()))
    if len(classes) < 2:
        raise AetherError(f"labels file {path}: column {options.target!r} holds one class; a comparison needs two")
    return values, classes


def _some(columns) -> str:
    names = [str(c) for c in columns]
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "no columns"


def zone_features(source, zones, progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each feature set's mean vector per zone (rows in the zones' order) and which zones have pixels."""
    means = {name: np.zeros((len(zones), source.bands[name])) for name in source.names}
    has_pixels = np.zeros(len(zones), dtype=bool)
    for finished in zone_sums(source, zones, progress=progress):
        for name, sums in finished.items():
            if sums.count > 0:
                means[name][sums.index] = sums.total / sums.count
                has_pixels[sums.index] = True
    return means, has_pixels


def zone_lonlat(zones, info: RasterInfo) -> tuple[np.ndarray, np.ndarray]:
    """Each zone's centroid in degrees (the folds' blocks are laid on them)."""
    import shapely
    from pyproj import Transformer

    centroids = shapely.centroid(zones.in_raster_crs)
    to_degrees = Transformer.from_crs(info.crs, "EPSG:4326", always_xy=True)
    return to_degrees.transform(shapely.get_x(centroids), shapely.get_y(centroids))


def fold_metrics(x: np.ndarray, y: np.ndarray, folds: np.ndarray, task: str, classes: list[str]) -> list[dict]:
    """The task's metrics on each held-out fold of a standardised linear model fitted on the others."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    out = []
    for f in np.unique(folds):
        test, train = folds == f, folds != f
        with threadpool_limits(1, user_api="blas"):
            if task == "classification":
                predicted = _classes(x[train], y[train], x[test])
                present = sorted(set(y[test].tolist()))
                f1 = f1_score(y[test], predicted, labels=present, average="macro", zero_division=0)
                out.append({"macro_f1": float(f1), "accuracy": float(accuracy_score(y[test], predicted))})
            elif task == "regression":
                model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
                predicted = model.fit(x[train], y[train]).predict(x[test])
                r2 = float(r2_score(y[test], predicted)) if test.sum() > 1 else float("nan")
                out.append({"r2": r2, "mae": float(mean_absolute_error(y[test], predicted))})
            else:
                out.append({"kl": float(np.mean(kl_divergence(y[test], _shares(x[train], y[train], x[test]))))})
    return out


def prior_metrics(y: np.ndarray, folds: np.ndarray, task: str) -> list[dict]:
    """The same metrics for a prediction that ignores the zones: the training folds' most frequent
    class, mean value or mean distribution (what any feature set must beat)."""
    out = []
    for f in np.unique(folds):
        test, train = folds == f, folds != f
        if task == "distribution":
            q = np.maximum(np.broadcast_to(y[train].mean(axis=0), y[test].shape), KL_FLOOR)
            out.append({"kl": float(np.mean(kl_divergence(y[test], q / q.sum(axis=1, keepdims=True))))})
        elif task == "regression":
            error = np.abs(y[test] - y[train].mean())
            total = ((y[test] - y[test].mean()) ** 2).sum()
            r2 = 1 - ((y[test] - y[train].mean()) ** 2).sum() / total if test.sum() > 1 and total > 0 else float("nan")
            out.append({"r2": float(r2), "mae": float(error.mean())})
        else:
            values, counts = np.unique(y[train], return_counts=True)
            predicted = np.full(test.sum(), values[np.argmax(counts)])
            present = sorted(set(y[test].tolist()))
            from sklearn.metrics import f1_score

            f1 = f1_score(y[test], predicted, labels=present, average="macro", zero_division=0)
            out.append({"macro_f1": float(f1), "accuracy": float(np.mean(predicted == y[test]))})
    return out


def _penalty(x: np.ndarray, y: np.ndarray, fit_predict, score) -> float:
    """The inverse penalty C (of PENALTIES) whose fits score best on INNER_FOLDS folds of the
    training zones: a linear model on 64-128 features and a few dozen zones overfits at C = 1."""
    from sklearn.model_selection import KFold

    if len(x) < 2 * INNER_FOLDS:
        return 1.0
    splits = list(KFold(INNER_FOLDS, shuffle=True, random_state=LABEL_SEED).split(x))
    scores = []
    for c in PENALTIES:
        scores.append(np.mean([score(y[te], fit_predict(x[tr], y[tr], x[te], c)) for tr, te in splits]))
    return float(PENALTIES[int(np.argmax(scores))])


def _classes(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float | None = None) -> np.ndarray:
    """Predicted classes: standardised logistic regression, classes balanced, C chosen by inner folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        return np.full(len(x_test), y_train[0])
    if c is None:
        c = _penalty(
            x_train,
            y_train,
            _classes,
            lambda t, p: f1_score(t, p, labels=sorted(set(t)), average="macro", zero_division=0),
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced"))
    return model.fit(x_train, y_train).predict(x_test)


def _shares(x_train: np.ndarray, p_train: np.ndarray, x_test: np.ndarray, c: float | None = None) -> np.ndarray:
    """Predicted shares: multinomial logistic regression fitted to soft labels (each zone once per
    class, weighted by its share: the cross-entropy against the true distribution), C chosen by
    inner folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if c is None:
        c = _penalty(x_train, p_train, _shares, lambda t, q: -float(np.mean(kl_divergence(t, q))))
    n, k = p_train.shape
    scaler = StandardScaler().fit(x_train)
    rows = np.repeat(scaler.transform(x_train), k, axis=0)
    labels = np.tile(np.arange(k), n)
    weights = p_train.reshape(-1)
    keep = weights > 0
    present = np.unique(labels[keep])
    q = np.full((len(x_test), k), KL_FLOOR)
    if len(present) == 1:
        q[:, present[0]] = 1.0
    else:
        model = LogisticRegression(C=c, max_iter=2000).fit(rows[keep], labels[keep], sample_weight=weights[keep])
        q[:, model.classes_] = np.maximum(model.predict_proba(scaler.transform(x_test)), KL_FLOOR)
    return q / q.sum(axis=1, keepdims=True)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row (natural log), 0 log 0 taken as 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=1)


def zero_shot(aether_means: np.ndarray, classes: list[str], projector, prompt: str) -> np.ndarray:
    """Each zone's class by the cosine of its (normalised) AETHER vector to each class's prompt."""
    texts = embed_texts(projector, [prompt.format(label=c) for c in classes], text_encoder_of(projector.checkpoint))
    scores = unit_rows(aether_means.astype(np.float32)) @ texts.T
    return np.asarray(classes)[np.argmax(scores, axis=1)]


def summarise(per_fold: list[dict]) -> dict:
    """Mean and standard deviation over folds of each metric."""
    names = per_fold[0].keys()
    return {
        n: {
            "mean": float(np.nanmean([f[n] for f in per_fold])),
            "std": float(np.nanstd([f[n] for f in per_fold])),
            "folds": [f[n] for f in per_fold],
        }
        for n in names
    }


def evaluate_labels(ckpt: str | Path, out_dir: str | Path | None, options: LabelOptions, progress: bool = True) -> dict:
    """Compare AlphaEarth, AETHER and untrained AETHER features per zone on `options.target`; write
    labels.json, labels.md and labels.png into `out_dir` (default: eval/ beside the checkpoint)."""
    started = time.time()
    options.check()
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise AetherError(f"checkpoint {ckpt} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else ckpt.resolve().parent / "eval"
    check_writable_dir(out_dir, "output folder")
    checkpoint = Checkpoint.load(ckpt)
    cfg = checkpoint.config
    ae_tif = str(Path(options.ae_tif).resolve()) if options.ae_tif else cfg.data.ae_tif
    if is_tile_set(ae_tif) or not Path(ae_tif).exists():
        origin = "given" if options.ae_tif else "named by the checkpoint's config; pass --ae_tif if it moved"
        what = "names a set of tiles; pass one raster" if is_tile_set(ae_tif) else f"does not exist ({origin})"
        raise AetherError(f"AlphaEarth raster {ae_tif} {what}")
    source = projected_source(ae_tif, checkpoint, with_untrained=True, with_alphaearth=True)
    info = source.info
    zones = read_zones(options.labels, info, options.id_column)
    y, names = target_values(zones.attributes, options, options.labels)
    if options.zero_shot:
        text_encoder_of(source.projectors["aether"].checkpoint).check()  # before the raster is read
    means, has_pixels = zone_features(source, zones, progress)
    if (~has_pixels).all():
        raise AetherError(f"no zone of {options.labels} meets a valid pixel of {info.path}: do they overlap?")
    keep = np.flatnonzero(has_pixels)
    dropped = len(zones) - len(keep)
    lon, lat = zone_lonlat(zones, info)
    block_m = options.block_m or cfg.data.val_block_m
    folds = spatial_folds(np.asarray(lon)[keep], np.asarray(lat)[keep], block_m, options.folds, LABEL_SEED)
    y_kept = y[keep]
    results = {}
    for name in FEATURE_SETS:
        results[name] = summarise(fold_metrics(means[name][keep], y_kept, folds, options.task, names))
    prior = summarise(prior_metrics(y_kept, folds, options.task))
    metrics = {
        "labels": str(options.labels),
        "target": names if options.task != "classification" else options.target,
        "task": options.task,
        "zones": int(len(keep)),
        "zones_without_pixels": int(dropped),
        "folds": int(len(np.unique(folds))),
        "block_m": float(block_m),
        "classes": names if options.task == "classification" else None,
        "features": results,
        "prior": prior,
        "relative_change_vs_alphaearth_pct": relative_changes(results, options.task),
        "checkpoint": str(ckpt),
        "raster": info.path,
    }
    if options.zero_shot:
        from sklearn.metrics import accuracy_score, f1_score

        predicted = zero_shot(means["aether"][keep], names, source.projectors["aether"], options.prompt)
        metrics["zero_shot"] = {
            "prompt": options.prompt,
            "macro_f1": float(f1_score(y_kept, predicted, labels=names, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y_kept, predicted)),
            "chance_accuracy": float(max(np.mean(y_kept == c) for c in names)),
        }
    metrics["elapsed_s"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "labels.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out_dir / "labels.md", labels_markdown(metrics) + "\n")
    labels_picture(metrics, out_dir / "labels.png")
    logger.info(f"wrote {out_dir / 'labels.json'}, labels.md and labels.png; {metrics['elapsed_s']:.1f} s")
    return metrics


def relative_changes(results: dict, task: str) -> dict:
    """AETHER's and untrained AETHER's change of each mean metric against AlphaEarth, in percent of
    AlphaEarth's value (the paper's +7.2% F1, -23.6% KL)."""
    base = results[ALPHAEARTH]
    return {
        name: {
            metric: (100 * (results[name][metric]["mean"] - base[metric]["mean"]) / abs(base[metric]["mean"]))
            if base[metric]["mean"]
            else None
            for metric, _, _ in METRICS[task]
        }
        for name in FEATURE_SETS
        if name != ALPHAEARTH
    }


def labels_markdown(m: dict) -> str:
    """The comparison as a Markdown table (mean +- std over folds; change against AlphaEarth)."""
    target = m["target"] if isinstance(m["target"], str) else ", ".join(m["target"])
    lines = [
        f"{m['task'].capitalize()} of `{target}` on {m['zones']} zones of {m['labels']} "
        f"({m['folds']} spatially blocked folds, blocks of {m['block_m']:g} m"
        + (f"; {m['zones_without_pixels']} zones without valid pixels left out" if m["zones_without_pixels"] else "")
        + "):",
        "",
        "| metric (mean +- std over folds) | "
        + " | ".join(FEATURE_SETS.values())
        + " | prior | AETHER vs AlphaEarth |",
        "|---|" + "---|" * (len(FEATURE_SETS) + 2),
    ]
    for metric, label, higher in METRICS[m["task"]]:
        summary = [m["features"][n][metric] for n in FEATURE_SETS] + [m["prior"][metric]]
        cells = [f"{v['mean']:.3f} +- {v['std']:.3f}" for v in summary]
        change = m["relative_change_vs_alphaearth_pct"]["aether"][metric]
        better = "higher is better" if higher else "lower is better"
        shown = f"{change:+.1f}% ({better})" if change is not None else "n/a"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {shown} |")
    if "zero_shot" in m:
        z = m["zero_shot"]
        lines += [
            "",
            f"Zero-shot from words (no training; prompt {z['prompt']!r}): macro-F1 {z['macro_f1']:.3f}, "
            f"accuracy {z['accuracy']:.3f} (the most frequent class alone: {z['chance_accuracy']:.3f}). "
            "AlphaEarth has no text side to do this with.",
        ]
    lines += [
        "",
        "Prior: the training folds' "
        + {"classification": "most frequent class", "regression": "mean", "distribution": "mean distribution"}[
            m["task"]
        ]
        + ", ignoring the zones: what features must beat.",
    ]
    return "\n".join(lines)


def labels_picture(m: dict, out: Path) -> None:
    """Each metric's mean and spread over folds, per feature set, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = METRICS[m["task"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    colours = ["#888888", "#1f77b4", "#aec7e8"]
    for ax, (metric, label, higher) in zip(axes[0], metrics):
        means = [m["features"][n][metric]["mean"] for n in FEATURE_SETS]
        stds = [m["features"][n][metric]["std"] for n in FEATURE_SETS]
        ax.bar(list(FEATURE_SETS.values()), means, yerr=stds, color=colours, capsize=4)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    target = m["target"] if isinstance(m["target"], str) else f"{len(m['target'])} shares"
    fig.suptitle(f"{m['task']} of {target}: {m['zones']} zones, {m['folds']} spatial folds", fontsize=10)
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
