"""`aether plot` (and `python plot.py`): embedding rasters and training runs as PNG pictures.

aether plot pca --tif RASTER.tif --out PICTURE.png [--fit-on OTHER.tif] [--max-px 1024] [--scale 1] [--plain]
aether plot curves --metrics ckpts/helsinki/metrics.jsonl --out curves.png
"""

from __future__ import annotations

import argparse
import logging

from aether.cli.run import command
from aether.pictures.curves import plot_training_curves
from aether.pictures.pca import MAX_PX, render_pca

DESCRIPTION = "Draw embedding rasters and training runs as PNG pictures."
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="picture", required=True)
    pca = commands.add_parser("pca", help="an embedding raster (AlphaEarth or AETHER) as PCA false colour")
    pca.add_argument("--tif", required=True, help="embedding raster (GeoTIFF or VRT; int8 or float; any CRS)")
    pca.add_argument("--out", required=True, help="output PNG, written atomically")
    pca.add_argument(
        "--fit-on",
        help="fit the PCA and colour stretch on this raster instead (same band count), "
        "so two rasters compare in the same colours",
    )
    pca.add_argument(
        "--max-px", type=int, default=MAX_PX, help=f"longer side of the map in raster pixels at most (default {MAX_PX})"
    )
    pca.add_argument(
        "--scale",
        type=int,
        default=None,
        help="repeat each picture pixel N x N times (default: enlarge a small raster's picture to at "
        "least 512 pixels across)",
    )
    pca.add_argument(
        "--plain",
        action="store_true",
        help="the picture's pixels alone (default: in a figure with a title, axes in the CRS and a scale bar)",
    )
    curves = commands.add_parser("curves", help="training curves from metrics.jsonl")
    curves.add_argument("--metrics", required=True, help="metrics.jsonl written by training")
    curves.add_argument("--out", required=True, help="output PNG, written atomically")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    if args.picture == "pca":
        out = render_pca(
            args.tif, args.out, fit_on=args.fit_on, max_px=args.max_px, scale=args.scale, frame=not args.plain
        )
    else:
        out = plot_training_curves(args.metrics, args.out)
    logger.info(f"wrote {out}")


main = command(add_arguments, run_command, DESCRIPTION, "python plot.py")
