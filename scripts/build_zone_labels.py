"""Build the example's zone labels for `aether evaluate --labels`: the POI category mix of H3 cells
in places the projector never saw in training.

Writes <out> (default data/zones/helsinki_h3_poi_mix.geojson): the H3 cells (resolution RES) that
hold at least MIN_POIS of the example's POIs, all of them in the validation blocks of config.yaml's
spatial split (the POIs whose descriptions training held out), with `n_pois` and one column
`share_<key>` per OSM key (amenity, shop, ...): the share of the cell's POIs with that key, summing
to 1. This is the paper's socio-economic task (a zone's distribution over classes) in miniature:
does AETHER tell what people do in places it has not seen? © OpenStreetMap contributors, ODbL 1.0.

Usage: python scripts/build_zone_labels.py [--cfg config.yaml] [--res 11] [--min-pois 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import h3

from aether.cli.run import run
from aether.config.load import load_config
from aether.data.dataset import build_dataset
from aether.data.poi import OSM_ATTRIBUTION, read_poi_frame

REPO = Path(__file__).resolve().parents[1]
COORD_DECIMALS = 7


def build(cfg_path: Path, res: int, min_pois: int, out: Path) -> tuple[int, list[str]]:
    cfg = load_config(cfg_path)
    dataset, _, _ = build_dataset(cfg, progress=False, with_text=False)
    pois = dataset.pois
    frame = read_poi_frame(cfg.data.poi, cfg.data.lon_column, cfg.data.lat_column, cfg.data.poi_crs)
    key_of = dict(zip(frame[cfg.data.id_column].astype(str), frame["key"].astype(str)))
    keys = sorted({key_of[str(i)] for i in pois.ids})
    cells: dict[str, list[int]] = defaultdict(list)
    for row, (lon, lat) in enumerate(zip(pois.lon, pois.lat)):
        cells[h3.latlng_to_cell(float(lat), float(lon), res)].append(row)
    features = []
    for cell in sorted(cells):
        rows = cells[cell]
        if len(rows) < min_pois or not dataset.is_val[rows].all():
            continue
        counts = Counter(key_of[str(pois.ids[r])] for r in rows)
        shares = {f"share_{k}": round(counts.get(k, 0) / len(rows), 6) for k in keys}
        ring = [[round(lng, COORD_DECIMALS), round(lat, COORD_DECIMALS)] for lat, lng in h3.cell_to_boundary(cell)]
        features.append(
            {
                "type": "Feature",
                "properties": {"h3": cell, "n_pois": len(rows), **shares},
                "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    collection = {
        "type": "FeatureCollection",
        "name": out.stem,
        "attribution": OSM_ATTRIBUTION,
        "features": features,
    }
    out.write_text(json.dumps(collection, separators=(",", ":")) + "\n", encoding="utf-8")
    return len(features), keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", type=Path, default=REPO / "config.yaml")
    parser.add_argument("--res", type=int, default=11, help="H3 resolution (default 11: cells about 50 m across)")
    parser.add_argument("--min-pois", type=int, default=2, help="POIs a cell needs (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "zones" / "helsinki_h3_poi_mix.geojson")
    args = parser.parse_args()

    def build_and_say() -> None:
        n, keys = build(args.cfg, args.res, args.min_pois, args.out)
        print(f"wrote {args.out}: {n} H3 cells of resolution {args.res}, shares of {', '.join(keys)}")

    run(build_and_say)


if __name__ == "__main__":
    main()
