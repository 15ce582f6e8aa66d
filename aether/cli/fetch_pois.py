"""`aether fetch-pois`: the POIs of a box, or of a raster's or POI file's extent, from Overture Maps
Places or OpenStreetMap (Overpass), as the POI file `aether train` takes. Overture reads only the
row groups of the pinned release that meet the box; OpenStreetMap keeps what `aether make-pois`
keeps, described by the same template. Fetched parts are cached (AETHER_CACHE), so running the
same command again continues an interrupted run."""

from __future__ import annotations

import argparse
import logging

from aether.cli.run import command
from aether.data.places import overpass, overture
from aether.data.places.run import DEFAULT_MIN_CONFIDENCE, MAX_BOX_KM2, SOURCES, PoiRequest, fetch_pois
from aether.text.templates import DEFAULT_TEMPLATE

DESCRIPTION = "Fetch the POIs of an area from Overture Maps Places or OpenStreetMap as a POI file."
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    area = parser.add_mutually_exclusive_group(required=True)
    area.add_argument(
        "--bbox", nargs=4, type=float, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
        help=f"area in degrees (WGS84), at most {MAX_BOX_KM2:,.0f} km²",
    )  # fmt: skip
    area.add_argument("--like", metavar="FILE", help="the extent of a raster (e.g. fetch-ae's) or a POI file")
    parser.add_argument("--source", required=True, choices=SOURCES, help="Overture Maps Places or OpenStreetMap")
    parser.add_argument("--out", required=True, help="output .gpkg, .geojson or .parquet (written atomically)")
    parser.add_argument("--release", default=overture.RELEASE, help=f"Overture release (default {overture.RELEASE})")
    parser.add_argument(
        "--template", default=None,
        help=f"description template: Overture {{name}}, {{category}}, {{alternates}}, {{confidence}} (default "
        f"{overture.TEMPLATE!r}); OSM {{name}}, {{key}}, {{value}} (default {DEFAULT_TEMPLATE!r})",
    )  # fmt: skip
    parser.add_argument(
        "--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE,
        help=f"Overture: keep places with at least this confidence (0-1, default {DEFAULT_MIN_CONFIDENCE:g})",
    )  # fmt: skip
    parser.add_argument(
        "--overture-root", default=overture.ROOT,
        help=f"where Overture's releases are: s3://bucket/prefix (AWS_ENDPOINT_URL for another S3 server) "
        f"or a local folder (default {overture.ROOT})",
    )  # fmt: skip
    parser.add_argument("--overpass-url", default=overpass.URL, help=f"Overpass API (default {overpass.URL})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    request = PoiRequest(
        out=args.out, source=args.source, bbox=args.bbox, like=args.like, release=args.release,
        template=args.template, min_confidence=args.min_confidence, overture_root=args.overture_root,
        overpass_url=args.overpass_url,
    )  # fmt: skip
    out, n, read = fetch_pois(request, progress=not args.no_progress)
    detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in read.items())
    logger.info(f"wrote {out}: {n} POIs ({detail})")
    logger.info("keep the attribution recorded in the file with it")


main = command(add_arguments, run_command, DESCRIPTION, "aether fetch-pois")
