"""Ask an AETHER map a question in words:

    python retrieve.py --ckpt ckpts/helsinki/best.pt --emb ckpts/helsinki/aether.tif --query "quiet cafes near water" --out retrieval/
"""
import argparse

from aether.cli.run import run


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Score every pixel of an AETHER (or AlphaEarth) raster against text queries; per query write "
                    "a similarity GeoTIFF, the top-k places as GeoJSON and a PNG heatmap.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py, or one of the reference code's (.pth)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--emb", help="AETHER raster written by infer_aether_raster.py with this checkpoint, or a set "
                                      "of them (a quoted glob or a .txt list)")
    source.add_argument("--ae_tif", help="AlphaEarth raster, embedded on the fly through the checkpoint, or a set of "
                                         "tiles (a quoted glob or a .txt list)")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", action="append", help="query text (repeatable)")
    queries.add_argument("--queries", help="text file with one query per line (# starts a comment)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--top-k", type=int, default=10, help="places per query (default 10)")
    parser.add_argument("--nms-m", type=float, default=100.0,
                        help="non-maximum suppression radius in metres: no two places closer (default 100)")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--text-backend", help="text encoder backend (default and only accepted: the checkpoint's)")
    parser.add_argument("--text-model", help="text encoder model (default and only accepted: the checkpoint's)")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="score as Dask tasks (tiles, or bands of one raster) on a local cluster of N processes")
    cluster.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="score as Dask tasks on an existing Dask scheduler")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args()

    from aether.retrieval.search import read_queries, retrieve_at_scale

    texts = read_queries(args.queries) if args.queries else args.query
    results = retrieve_at_scale(texts, args.ckpt, args.out, emb_tif=args.emb, ae_tif=args.ae_tif,
                                workers=args.workers, scheduler=args.scheduler, top_k=args.top_k, nms_m=args.nms_m,
                                tile_px=args.tile, device=args.device, precision=args.precision,
                                text_backend=args.text_backend, text_model=args.text_model,
                                progress=not args.no_progress)
    for r in results:
        best = f"best {r.hits[0]['score']:.3f} at ({r.hits[0]['lon']:.5f}, {r.hits[0]['lat']:.5f})" if r.hits else "no valid pixels"
        print(f"{r.query!r}: {r.tif.name}, {r.geojson.name}, {r.png.name}; {best}")


if __name__ == "__main__":
    run(main)
