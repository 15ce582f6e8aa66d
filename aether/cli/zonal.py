"""`aether zonal`: per-zone features of an embedding raster, as GeoParquet.

aether zonal --emb RASTER (--zones ZONES.gpkg [--id COLUMN] | --h3 RES) [--stats mean,std,count,coverage]
    --out FEATURES.parquet
aether zonal --ae_tif AE.tif --ckpt CKPT (--zones ... | --h3 RES) --out FEATURES.parquet
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from aether.cli.run import command
from aether.core.errors import AetherError
from aether.core.files import check_output_file
from aether.geo.raster import open_raster
from aether.geo.zonal import STATS
from aether.geo.zones import h3_zones, read_zones
from aether.infer.zonal import TILE_PX, StoredVectors, ZonalOptions, projected_source, write_zonal

DESCRIPTION = (
    "Per-zone features of an embedding raster (AlphaEarth or AETHER, int8, int16 or float; or AETHER "
    "computed on the fly from AlphaEarth with --ae_tif and --ckpt): each band's statistics over each "
    "zone's pixels, weighted by the fraction of each pixel the zone covers (exactextract), written as "
    "GeoParquet."
)
SUFFIXES = (".parquet", ".geoparquet")
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    raster = parser.add_mutually_exclusive_group(required=True)
    raster.add_argument("--emb", help="embedding raster: AETHER (from aether infer) or AlphaEarth")
    raster.add_argument("--ae_tif", help="AlphaEarth raster, projected to AETHER on the fly with --ckpt")
    parser.add_argument("--ckpt", help="checkpoint that projects --ae_tif (window pooling, as aether infer)")
    zones = parser.add_mutually_exclusive_group(required=True)
    zones.add_argument("--zones", help="polygons: GeoPackage, GeoJSON, GeoParquet, Shapefile (any CRS)")
    zones.add_argument("--h3", type=int, metavar="RES", help="the H3 cells of resolution RES over the raster")
    parser.add_argument("--id", help="the zones' id column (default: the row number, as zone_id)")
    parser.add_argument(
        "--stats",
        default=",".join(STATS),
        help=f"comma-separated statistics: {', '.join(STATS)} (default all); mean and std give one column "
        "per band (BAND_mean, BAND_std), count the valid pixels weighted by coverage, coverage the "
        "share of the zone's area with valid pixels",
    )
    parser.add_argument("--out", required=True, help="output GeoParquet (.parquet), written atomically")
    parser.add_argument("--tile", type=int, default=TILE_PX, help=f"tile side read at a time (default {TILE_PX})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    started = time.perf_counter()
    options = ZonalOptions(tuple(s.strip() for s in args.stats.split(",") if s.strip()), args.tile).check()
    if args.ae_tif and not args.ckpt:
        raise AetherError("--ae_tif needs --ckpt, the checkpoint that projects it (or give an AETHER raster as --emb)")
    if args.emb and args.ckpt:
        raise AetherError("--ckpt goes with --ae_tif; --emb is read as it is stored")
    if args.id is not None and args.zones is None:
        raise AetherError("--id names a column of --zones; H3 cells are named by their index")
    out = Path(args.out)
    inputs = {p: what for p, what in ((args.emb or args.ae_tif, "the input raster"), (args.zones, "the zones file"))}
    if args.ckpt:
        inputs[args.ckpt] = "the checkpoint"
    check_output_file(out, {str(k): v for k, v in inputs.items() if k}, "features.parquet", SUFFIXES)
    if args.emb:
        source = StoredVectors(open_raster(args.emb, None))
    else:
        source = projected_source(args.ae_tif, args.ckpt)
    info = source.info
    zones = h3_zones(info, args.h3) if args.h3 is not None else read_zones(args.zones, info, args.id)
    logger.info(
        f"{len(zones):,} zones ({'H3 resolution ' + str(args.h3) if args.h3 is not None else args.zones}); "
        f"raster {info.width} x {info.height} px, {source.bands[source.names[0]]} bands"
    )
    summary = write_zonal(source, zones, out, options, progress=not args.no_progress)
    off = f"; {summary['off_raster']:,} with no valid pixel (statistics empty)" if summary["off_raster"] else ""
    logger.info(
        f"wrote {out}: {summary['zones']:,} zones x {summary['columns']} columns{off}; "
        f"{time.perf_counter() - started:.1f} s"
    )


main = command(add_arguments, run_command, DESCRIPTION, "aether zonal")
