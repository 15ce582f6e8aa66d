"""Embed an AlphaEarth raster with a trained AETHER checkpoint:

    python infer_aether_raster.py --ae_tif IN.tif --ckpt ckpts/helsinki/best.pt --out OUT.tif

Many tiles (a quoted glob or a .txt list) give one output per tile in a folder, plus mosaic.vrt;
--workers N (a local Dask cluster) or --scheduler tcp://HOST:PORT runs the work as Dask tasks:

    python infer_aether_raster.py --ae_tif "tiles/*.tif" --ckpt best.pt --out aether_tiles/ --workers 4
"""
import argparse

from aether.cli.run import run


def main() -> None:
    from aether.geo.raster import output_dtypes

    parser = argparse.ArgumentParser(description="Turn an AlphaEarth raster into an AETHER raster.")
    parser.add_argument("--ae_tif", required=True,
                        help="AlphaEarth raster (GeoTIFF, VRT or URL; int8 or float; any CRS), or a set of tiles: "
                             "a quoted glob or a .txt file with one path or URL per line")
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint written by train.py (best.pt or last.pt), or one of the reference code's (.pth)")
    parser.add_argument("--out", required=True,
                        help="output GeoTIFF, written atomically (for a set of tiles: a folder, one GeoTIFF per tile "
                             "plus mosaic.vrt)")
    parser.add_argument("--pooling", choices=["window", "pixel"], default="window",
                        help="window: the training base-view mean around each pixel (default); pixel: single pixels")
    parser.add_argument("--dtype", choices=output_dtypes(), default="int8",
                        help="output type; int8 uses AlphaEarth's quantization (default); float16 needs GDAL 3.11 "
                             "or newer, so it is offered only where rasterio's GDAL has it")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="projector arithmetic (autocast); auto: bf16 on CUDA or a CPU with native bf16, else fp32")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512)")
    parser.add_argument("--cog", action="store_true", help="write a Cloud-Optimized GeoTIFF with overviews")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same command from the tiles it had finished")
    parser.add_argument("--checkpoint-every", type=float, default=5.0, metavar="SECONDS",
                        help="how often finished tiles are made durable for --resume (default 5 s)")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="run as Dask tasks on a local cluster of N worker processes (tiles, or bands of one raster)")
    cluster.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run as Dask tasks on an existing Dask scheduler")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args()

    from aether.infer.at_scale import embed_at_scale

    out = embed_at_scale(args.ae_tif, args.ckpt, args.out, workers=args.workers, scheduler=args.scheduler,
                         progress=not args.no_progress, pooling=args.pooling, dtype=args.dtype,
                         precision=args.precision, tile_px=args.tile, cog=args.cog, device=args.device,
                         resume=args.resume, checkpoint_s=args.checkpoint_every)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
