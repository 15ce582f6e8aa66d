"""`aether retrieve` (and `python retrieve.py`): ask an AETHER map a question in words."""

from __future__ import annotations

import argparse
import logging

from aether.cli.run import command
from aether.config.schema import DEVICES
from aether.core.cluster import Cluster
from aether.infer.spec import TILE_PX
from aether.model.projector import PRECISIONS
from aether.retrieval.at_scale import retrieve_at_scale
from aether.retrieval.search import SearchOptions, read_queries

DESCRIPTION = (
    "Score every pixel of an AETHER (or AlphaEarth) raster against text queries; per query write a "
    "similarity GeoTIFF, the top-k places as GeoJSON and a PNG heatmap."
)
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SearchOptions()
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint written by training, or one of the reference code's (.pth)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--emb",
        help="AETHER raster written by inference with this checkpoint, or a set of them (a quoted glob or a .txt list)",
    )
    source.add_argument(
        "--ae_tif",
        help="AlphaEarth raster, embedded on the fly through the checkpoint, or a set of "
        "tiles (a quoted glob or a .txt list)",
    )
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", action="append", help="query text (repeatable)")
    queries.add_argument("--queries", help="text file with one query per line (# starts a comment)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--top-k", type=int, default=defaults.top_k, help=f"places per query (default {defaults.top_k})"
    )
    parser.add_argument(
        "--nms-m",
        type=float,
        default=defaults.nms_m,
        help=f"non-maximum suppression radius in metres: no two places closer (default {defaults.nms_m:g})",
    )
    parser.add_argument("--tile", type=int, default=TILE_PX, help=f"tile side in pixels (default {TILE_PX})")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--text-backend", help="text encoder backend (default and only accepted: the checkpoint's)")
    parser.add_argument("--text-model", help="text encoder model (default and only accepted: the checkpoint's)")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="score as Dask tasks (tiles, or bands of one raster) on a local cluster of N processes",
    )
    cluster.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="score as Dask tasks on an existing Dask scheduler"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    texts = read_queries(args.queries) if args.queries else args.query
    options = SearchOptions(
        top_k=args.top_k,
        nms_m=args.nms_m,
        tile_px=args.tile,
        device=args.device,
        precision=args.precision,
        text_backend=args.text_backend,
        text_model=args.text_model,
    )
    results = retrieve_at_scale(
        texts,
        args.ckpt,
        args.out,
        emb_tif=args.emb,
        ae_tif=args.ae_tif,
        options=options,
        cluster=Cluster(args.workers, args.scheduler),
        progress=not args.no_progress,
    )
    for r in results:
        best = (
            f"best {r.hits[0]['score']:.3f} at ({r.hits[0]['lon']:.5f}, {r.hits[0]['lat']:.5f})"
            if r.hits
            else "no valid pixels"
        )
        logger.info(f"{r.query!r}: {r.tif.name}, {r.geojson.name}, {r.png.name}; {best}")


main = command(add_arguments, run_command, DESCRIPTION, "python retrieve.py")
