"""`aether evaluate` (and `python evaluate.py`): a checkpoint on its own held-out POIs, against an
untrained pair and chance."""

from __future__ import annotations

import argparse
import logging

from aether.cli.run import command
from aether.core.errors import AetherError
from aether.evaluation.downstream import DEFAULT_PROMPT, TASKS, LabelOptions, evaluate_labels, labels_markdown
from aether.evaluation.report import metrics_markdown
from aether.evaluation.run import EvalOptions, evaluate

DESCRIPTION = (
    "Evaluate an AETHER checkpoint on the held-out POIs of its own spatial split: retrieval, category "
    "retrieval, localisation and linear probes, against an untrained pair and chance. With --labels, "
    "instead: the paper's downstream comparison on your own zones (AlphaEarth, AETHER and untrained "
    "AETHER features per zone, the same linear model on the same spatially blocked folds)."
)
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalOptions()
    parser.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint written by training (e.g. ckpts/helsinki/best.pt), or one of the reference code's (.pth)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for metrics.json and metrics.md (default: eval/ beside the checkpoint)",
    )
    parser.add_argument(
        "--landuse", default=None, help="land-use polygons (GeoJSON, GeoPackage, ...) for the per-pixel land-use probe"
    )
    parser.add_argument(
        "--landuse-column", default=None, help=f"class column of --landuse (default: {d.landuse_column})"
    )
    parser.add_argument(
        "--search-radius-m",
        type=float,
        default=d.search_radius_m,
        help=f"localisation search radius around each POI, metres (default {d.search_radius_m:g})",
    )
    parser.add_argument(
        "--min-category-pois",
        type=int,
        default=d.min_category_pois,
        help=f"held-out POIs a category (or probe class) needs to be scored (default {d.min_category_pois})",
    )
    parser.add_argument("--folds", type=int, default=d.folds, help=f"spatially blocked probe folds (default {d.folds})")
    parser.add_argument(
        "--category-template",
        default=d.category_template,
        help=f"category query from {{key}} and {{value}} (default {d.category_template!r})",
    )
    parser.add_argument("--ae_tif", default=None, help="AlphaEarth raster, if it moved since training")
    parser.add_argument("--poi", default=None, help="POI file, if it moved since training")
    parser.add_argument(
        "--no-text",
        action="store_true",
        help="only the linear probes, which need no text: offline whatever the checkpoint's text encoder",
    )
    labels = parser.add_argument_group("downstream comparison on your own zones (--labels)")
    labels.add_argument("--labels", help="zones with labels: polygons (GeoPackage, GeoJSON, GeoParquet, ...)")
    labels.add_argument(
        "--target",
        help="the label column; for --task distribution, comma-separated share columns or a pattern (share_*)",
    )
    labels.add_argument(
        "--task", choices=TASKS, default="classification", help="what the target is (default classification)"
    )
    labels.add_argument("--id", help="the zones' id column (default: row number)")
    labels.add_argument(
        "--block-m",
        type=float,
        help="side of the folds' spatial blocks, metres (default: the checkpoint's data.val_block_m)",
    )
    labels.add_argument(
        "--zero-shot",
        action="store_true",
        help="also classify zones from the class names' text embeddings, with no training",
    )
    labels.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"zero-shot text per class, with {{label}} (default {DEFAULT_PROMPT!r})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    if args.labels is not None:
        return run_labels(args)
    for flag in ("target", "id", "block_m"):
        if getattr(args, flag) is not None:
            raise AetherError(f"--{flag.replace('_', '-')} goes with --labels (the zones file)")
    if args.zero_shot:
        raise AetherError("--zero-shot goes with --labels (the zones file)")
    if args.landuse_column is not None and args.landuse is None:
        raise AetherError("--landuse-column needs --landuse (the land-use polygon file)")
    options = EvalOptions(
        landuse=args.landuse,
        landuse_column=args.landuse_column or EvalOptions.landuse_column,
        search_radius_m=args.search_radius_m,
        min_category_pois=args.min_category_pois,
        folds=args.folds,
        category_template=args.category_template,
        ae_tif=args.ae_tif,
        poi=args.poi,
        text=not args.no_text,
    )
    metrics = evaluate(args.ckpt, args.out, options, progress=not args.no_progress)
    print(metrics_markdown(metrics))


def run_labels(args: argparse.Namespace) -> None:
    if args.target is None:
        raise AetherError("--labels needs --target, the column (or share columns) to predict")
    if args.landuse is not None or args.poi is not None or args.no_text:
        raise AetherError("--landuse, --poi and --no-text belong to the POI evaluation; --labels runs on its own")
    options = LabelOptions(
        labels=args.labels,
        target=args.target,
        task=args.task,
        id_column=args.id,
        folds=args.folds,
        block_m=args.block_m,
        zero_shot=args.zero_shot,
        prompt=args.prompt,
        ae_tif=args.ae_tif,
    )
    metrics = evaluate_labels(args.ckpt, args.out, options, progress=not args.no_progress)
    print(labels_markdown(metrics))


main = command(add_arguments, run_command, DESCRIPTION, "python evaluate.py")
