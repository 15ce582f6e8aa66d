"""`aether fetch-ae` (and `python fetch_ae.py`): real AlphaEarth for any place into one local int8
GeoTIFF. Reads the public tile index (cached), then only the blocks of the tiles that the area
needs, over HTTP range requests. Running the same command again continues an interrupted fetch."""

from __future__ import annotations

import argparse
import logging

from aether.cli.run import command
from aether.data.fetch import CHECKPOINT_S, INDEX_URLS, WINDOW_PX, FetchOptions, fetch_alphaearth

DESCRIPTION = "Fetch AlphaEarth embeddings of one year for an area into a GeoTIFF."
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    area = parser.add_mutually_exclusive_group(required=True)
    area.add_argument(
        "--bbox", nargs=4, type=float, metavar=("WEST", "SOUTH", "EAST", "NORTH"), help="area in degrees (WGS84)"
    )
    area.add_argument(
        "--like", metavar="FILE", help="the extent of a POI file or a raster, with the margin of the augmented window"
    )
    parser.add_argument(
        "--margin-m",
        type=float,
        metavar="METRES",
        help="with --like: how far beyond the file's extent to fetch (default 95, the augmented "
        "window's radius data.aug_radius_m; give your config's if you changed it)",
    )
    parser.add_argument("--year", type=int, required=True, help="year of the annual embeddings, e.g. 2024")
    parser.add_argument("--out", required=True, help="output GeoTIFF, written atomically (with --per-zone: a folder)")
    parser.add_argument(
        "--source",
        default="source-coop",
        help=f"where the tiles are: {', '.join(INDEX_URLS)} (requester-pays: needs "
        f"--billing-project), or the URL or path of an index Parquet (default source-coop)",
    )
    parser.add_argument("--billing-project", help="Google Cloud project billed for --source gcs (or GS_USER_PROJECT)")
    parser.add_argument("--crs", help="output CRS (default: the UTM zone of the tiles holding most of the area)")
    parser.add_argument(
        "--per-zone",
        action="store_true",
        help="one GeoTIFF per UTM zone in the folder --out, with tiles.txt (a set of tiles training "
        "takes) and mosaic.vrt, instead of warping other zones",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=WINDOW_PX,
        help=f"window side in pixels read and written at a time (default {WINDOW_PX})",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=CHECKPOINT_S,
        metavar="SECONDS",
        help=f"how often finished windows are made durable for a rerun (default {CHECKPOINT_S:g} s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    options = FetchOptions(
        source=args.source,
        crs=args.crs,
        per_zone=args.per_zone,
        billing_project=args.billing_project,
        tile_px=args.tile,
        checkpoint_s=args.checkpoint_every,
        margin_m=args.margin_m,
    )
    out = fetch_alphaearth(
        args.out, args.year, bbox=args.bbox, like=args.like, options=options, progress=not args.no_progress
    )
    logger.info(f"wrote {out}")


main = command(add_arguments, run_command, DESCRIPTION, "python fetch_ae.py")
