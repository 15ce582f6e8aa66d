"""Turn any OpenStreetMap extract into the POI file training takes:

    python make_pois.py --pbf city.osm.pbf --out data/poi/city_poi.geojson

Keeps named amenity, shop, tourism, leisure, office, craft and historic objects (polygons become
a representative point) with their OSM id, name, category and a description from the template,
exactly as the bundled Helsinki example was made. Needs pyrosm (in requirements.txt).
"""
import argparse

from aether.cli.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description="Extract named POIs from an .osm.pbf file as the GeoJSON train.py reads.")
    parser.add_argument("--pbf", required=True, help="OpenStreetMap extract (.osm.pbf), e.g. from download.geofabrik.de")
    parser.add_argument("--out", required=True, help="output GeoJSON (written atomically)")
    parser.add_argument("--template", default=None,
                        help='description template with {name}, {key}, {value} '
                             '(default: "A place of {value}, a type of {key}, named {name}.")')
    args = parser.parse_args()

    from pathlib import Path

    from aether.core.errors import AetherError
    from aether.core.files import check_inputs_kept
    from aether.data.osm import extract_pois, write_poi_geojson
    from aether.data.poi import DEFAULT_TEMPLATE

    out = Path(args.out)
    if out.is_dir():
        raise AetherError(f"output {out} is a folder; give a file name such as {out / 'poi.geojson'}")
    if not out.parent.is_dir():
        raise AetherError(f"output folder {out.parent} does not exist")
    check_inputs_kept([out], {args.pbf: "the --pbf extract"}, "choose another --out")
    pois = extract_pois(args.pbf, args.template or DEFAULT_TEMPLATE)
    if len(pois) == 0:
        raise AetherError(f"{args.pbf} has no named amenity/shop/tourism/leisure/office/craft/historic objects")
    path = write_poi_geojson(pois, out)
    counts = pois["key"].value_counts()
    print(f"wrote {path}: {len(pois)} POIs ({', '.join(f'{k} {n}' for k, n in counts.items())})")
    print("data (c) OpenStreetMap contributors, ODbL 1.0: keep this attribution with the file")


if __name__ == "__main__":
    run(main)
