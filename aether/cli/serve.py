"""`aether serve`: a local web app, a map that answers questions in words.

aether serve --ckpt CKPT (--emb AETHER.tif | --ae_tif AE.tif) [--poi POIS] [--port 8000] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import tempfile
from pathlib import Path

from aether.cli.run import command
from aether.core.errors import AetherError
from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from aether.model.checkpoint import Checkpoint
from aether.serve.app import ServeOptions, create_app, require_serve_extra

DESCRIPTION = (
    "A map in the browser that answers questions in words: the AETHER raster (and AlphaEarth's) as PCA "
    "colour, the POIs, a query box whose answers are heatmap layers with their top-k places, and "
    "'places like this' on a click. Local: nothing is fetched from the network but the optional basemap."
)
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint (its text encoder answers the questions)")
    parser.add_argument("--emb", help="AETHER raster (aether infer's output)")
    parser.add_argument("--ae_tif", help="AlphaEarth raster: its own PCA layer; without --emb, embedded at start")
    parser.add_argument("--poi", help="POIs to show (default: the checkpoint's training POIs, if the file is there)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--top-k", type=int, default=10, help="places listed per query (default 10)")
    parser.add_argument("--nms-m", type=float, default=100.0, help="no place within this many metres of a better one")


def check_port(host: str, port: int) -> None:
    """Refuse, before any work, a port that is taken or not allowed."""
    if not 1 <= port <= 65535:
        raise AetherError(f"--port must be from 1 to 65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AetherError(f"port {port} on {host} is in use; choose another with --port") from None
            raise AetherError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    require_serve_extra()
    import uvicorn

    if not args.emb and not args.ae_tif:
        raise AetherError("give --emb (an AETHER raster) or --ae_tif (an AlphaEarth raster, embedded at start)")
    for path, what in ((args.ckpt, "checkpoint"), (args.emb, "AETHER raster"), (args.ae_tif, "AlphaEarth raster")):
        if path and not Path(path).exists() and "://" not in path:
            raise AetherError(f"{what} {path} does not exist")
    check_port(args.host, args.port)
    poi = args.poi
    if poi is None:
        training = Checkpoint.load(args.ckpt).config.data.poi
        poi = training if training and Path(training).exists() else None
    with tempfile.TemporaryDirectory(prefix="aether-serve-") as work:
        emb = args.emb
        if emb is None:
            emb = str(Path(work) / "aether.tif")
            logger.info(f"embedding {args.ae_tif} with {Path(args.ckpt).name} for the map (int16)")
            embed_raster(args.ae_tif, args.ckpt, emb, EmbedOptions(dtype="int16"))
        options = ServeOptions(args.ckpt, emb, args.ae_tif, poi, args.top_k, args.nms_m)
        app = create_app(options, Path(work))
        if not is_loopback(args.host):
            logger.warning(
                f"listening on {args.host}, not only this machine: anyone who can reach it can see the maps and ask"
            )
        logger.info(f"AETHER map at http://{args.host}:{args.port}/  (Ctrl+C to stop)")
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
        finally:
            app.state.book.close()


main = command(add_arguments, run_command, DESCRIPTION, "aether serve")
