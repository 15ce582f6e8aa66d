"""Pictures of embedding rasters and training runs:

    python plot.py pca --tif RASTER.tif --out PICTURE.png [--fit-on OTHER.tif] [--max-px 1024] [--scale 1]
    python plot.py curves --metrics ckpts/helsinki/metrics.jsonl --out curves.png
"""
import argparse

from aether.cli.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw embedding rasters and training runs as PNG pictures.")
    commands = parser.add_subparsers(dest="command", required=True)
    pca = commands.add_parser("pca", help="an embedding raster (AlphaEarth or AETHER) as PCA false colour")
    pca.add_argument("--tif", required=True, help="embedding raster (GeoTIFF or VRT; int8 or float; any CRS)")
    pca.add_argument("--out", required=True, help="output PNG (RGBA, north-up, nodata transparent), written atomically")
    pca.add_argument("--fit-on", help="fit the PCA and colour stretch on this raster instead (same band count), "
                                      "so two rasters compare in the same colours")
    pca.add_argument("--max-px", type=int, default=1024, help="longer side of the picture in pixels (default 1024)")
    pca.add_argument("--scale", type=int, default=None,
                     help="repeat each picture pixel N x N times (default: enlarge a small raster's picture to at "
                          "least 512 pixels across)")
    curves = commands.add_parser("curves", help="training curves from metrics.jsonl")
    curves.add_argument("--metrics", required=True, help="metrics.jsonl written by train.py")
    curves.add_argument("--out", required=True, help="output PNG, written atomically")
    args = parser.parse_args()

    from aether.pictures import pca as pictures

    if args.command == "pca":
        out = pictures.render_pca(args.tif, args.out, fit_on=args.fit_on, max_px=args.max_px, scale=args.scale)
    else:
        out = pictures.plot_training_curves(args.metrics, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
