"""Evaluate an AETHER checkpoint on its own held-out POIs: python evaluate.py --ckpt CKPT [--out DIR] ..."""
import argparse

from aether.cli.run import run


def main() -> None:
    from aether.evaluation.run import (DEFAULT_CATEGORY_TEMPLATE, FOLDS, MIN_CATEGORY_POIS, SEARCH_RADIUS_M)

    parser = argparse.ArgumentParser(
        description="Evaluate an AETHER checkpoint on the held-out POIs of its own spatial split: retrieval, "
                    "category retrieval, localisation and linear probes, against an untrained pair and chance.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. ckpts/helsinki/best.pt), or one of the reference code's (.pth)")
    parser.add_argument("--out", default=None, help="output folder for metrics.json and metrics.md "
                                                    "(default: eval/ beside the checkpoint)")
    parser.add_argument("--landuse", default=None, help="land-use polygons (GeoJSON, GeoPackage, ...) for the "
                                                        "per-pixel land-use probe")
    parser.add_argument("--landuse-column", default=None, help="class column of --landuse (default: landuse)")
    parser.add_argument("--search-radius-m", type=float, default=SEARCH_RADIUS_M,
                        help=f"localisation search radius around each POI, metres (default {SEARCH_RADIUS_M:g})")
    parser.add_argument("--min-category-pois", type=int, default=MIN_CATEGORY_POIS,
                        help=f"held-out POIs a category (or probe class) needs to be scored (default {MIN_CATEGORY_POIS})")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"spatially blocked probe folds (default {FOLDS})")
    parser.add_argument("--category-template", default=DEFAULT_CATEGORY_TEMPLATE,
                        help=f"category query from {{key}} and {{value}} (default {DEFAULT_CATEGORY_TEMPLATE!r})")
    parser.add_argument("--ae_tif", default=None, help="AlphaEarth raster, if it moved since training")
    parser.add_argument("--poi", default=None, help="POI file, if it moved since training")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args()
    from aether.core.errors import AetherError
    from aether.evaluation.run import evaluate

    if args.landuse_column is not None and args.landuse is None:
        raise AetherError("--landuse-column needs --landuse (the land-use polygon file)")

    evaluate(args.ckpt, args.out, args.landuse, args.landuse_column or "landuse", args.search_radius_m,
             args.min_category_pois, args.folds, args.category_template, args.ae_tif, args.poi,
             progress=not args.no_progress)


if __name__ == "__main__":
    run(main)
