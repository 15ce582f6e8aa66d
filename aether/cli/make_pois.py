"""`aether make-pois` (and `python make_pois.py`): any OpenStreetMap extract as the POI file training
takes. Keeps named amenity, shop, tourism, leisure, office, craft and historic objects (polygons
become a representative point) with their OSM id, name, category and a description from the
template, exactly as the bundled Helsinki example was made. Needs the `osm` extra (pyrosm)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aether.cli.run import command
from aether.core.errors import AetherError
from aether.core.files import check_output_file
from aether.data.osm import POI_KEYS, extract_pois, write_poi_geojson
from aether.data.poi import OSM_ATTRIBUTION
from aether.text.templates import DEFAULT_TEMPLATE

DESCRIPTION = "Extract named POIs from an .osm.pbf file as the GeoJSON training reads."
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pbf", required=True, help="OpenStreetMap extract (.osm.pbf), e.g. from download.geofabrik.de or BBBike"
    )
    parser.add_argument("--out", required=True, help="output GeoJSON (written atomically)")
    parser.add_argument(
        "--template",
        default=None,
        help=f"description template with {{name}}, {{key}}, {{value}} (default: {DEFAULT_TEMPLATE!r})",
    )


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    out = Path(args.out)
    check_output_file(out, {args.pbf: "the --pbf extract"}, example="poi.geojson", fix="choose another --out")
    pois = extract_pois(args.pbf, args.template or DEFAULT_TEMPLATE)
    if len(pois) == 0:
        raise AetherError(f"{args.pbf} has no named {'/'.join(POI_KEYS)} objects")
    path = write_poi_geojson(pois, out)
    counts = pois["key"].value_counts()
    logger.info(f"wrote {path}: {len(pois)} POIs ({', '.join(f'{k} {n}' for k, n in counts.items())})")
    logger.info(f"data {OSM_ATTRIBUTION}: keep this attribution with the file")


main = command(add_arguments, run_command, DESCRIPTION, "python make_pois.py")
