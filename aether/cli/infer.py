"""`aether infer` (and `python infer_aether_raster.py`): an AlphaEarth raster as an AETHER raster.

Many tiles (a quoted glob or a .txt list) give one output per tile in a folder, plus mosaic.vrt;
--workers N (a local Dask cluster) or --scheduler tcp://HOST:PORT runs the work as Dask tasks.
"""

from __future__ import annotations

import argparse
import logging

from aether.cli.run import command
from aether.config.schema import DEVICES
from aether.core.cluster import Cluster
from aether.infer.at_scale import embed_at_scale
from aether.infer.spec import CHECKPOINT_S, DEFAULT_DTYPE, POOLINGS, TILE_PX, EmbedOptions, available_dtypes
from aether.model.projector import PRECISIONS

DESCRIPTION = "Turn an AlphaEarth raster into an AETHER raster."
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ae_tif",
        required=True,
        help="AlphaEarth raster (GeoTIFF, VRT or URL; int8 or float; any CRS), or a set of tiles: "
        "a quoted glob or a .txt file with one path or URL per line",
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint written by training (best.pt or last.pt), or one of the reference code's (.pth)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output GeoTIFF, written atomically (for a set of tiles: a folder, one GeoTIFF per tile plus mosaic.vrt)",
    )
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="window",
        help="window: the training base-view mean around each pixel (default); pixel: single pixels",
    )
    parser.add_argument(
        "--dtype",
        choices=available_dtypes(),
        default=DEFAULT_DTYPE,
        help=f"output type (default {DEFAULT_DTYPE}: retrieval ranks from it as from vectors computed "
        f"on the fly); int8 is AlphaEarth's own encoding, half the size, scores up to 0.007 off; "
        f"float16 needs GDAL 3.11 or newer",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="projector arithmetic (autocast); auto: bf16 on CUDA or a CPU with native bf16, else fp32",
    )
    parser.add_argument("--tile", type=int, default=TILE_PX, help=f"tile side in pixels (default {TILE_PX})")
    parser.add_argument("--cog", action="store_true", help="write a Cloud-Optimized GeoTIFF with overviews")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command from the tiles it had finished",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=CHECKPOINT_S,
        metavar="SECONDS",
        help=f"how often finished tiles are made durable for --resume (default {CHECKPOINT_S:g} s)",
    )
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run as Dask tasks on a local cluster of N worker processes (tiles, or bands of one raster)",
    )
    cluster.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="run as Dask tasks on an existing Dask scheduler"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    options = EmbedOptions(
        pooling=args.pooling,
        dtype=args.dtype,
        precision=args.precision,
        tile_px=args.tile,
        cog=args.cog,
        device=args.device,
        checkpoint_s=args.checkpoint_every,
    )
    out = embed_at_scale(
        args.ae_tif,
        args.ckpt,
        args.out,
        options,
        Cluster(args.workers, args.scheduler),
        progress=not args.no_progress,
        resume=args.resume,
    )
    logger.info(f"wrote {out}")


main = command(add_arguments, run_command, DESCRIPTION, "python infer_aether_raster.py")
