"""The `aether` command, in the style of rasterio's `rio`: one entry point, a subcommand per task.

    aether train | infer | retrieve | evaluate | serve | zonal | plot | fetch-ae | make-pois | fetch-pois  [--help]

Each subcommand lives in its own module of this room and is imported only when it runs, so
`aether --help` answers at once; the top-level scripts (train.py, ...) run the same modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aether import __version__
from aether.cli.run import launcher, run

# subcommand: (module, one line for `aether --help`)
COMMANDS = {
    "train": ("aether.cli.train", "train AETHER's projectors on POIs and an AlphaEarth raster"),
    "infer": ("aether.cli.infer", "turn an AlphaEarth raster into an AETHER raster"),
    "retrieve": ("aether.cli.retrieve", "ask an AETHER map questions in words"),
    "evaluate": ("aether.cli.evaluate", "evaluate a checkpoint on its held-out POIs against baselines"),
    "serve": ("aether.cli.serve", "a map in the browser that answers questions in words"),
    "zonal": ("aether.cli.zonal", "per-zone features of an embedding raster (polygons or H3 cells), as GeoParquet"),
    "plot": ("aether.cli.plot", "draw embedding rasters (PCA) and training curves"),
    "fetch-ae": ("aether.cli.fetch_ae", "fetch real AlphaEarth for a bounding box or a file's extent"),
    "make-pois": ("aether.cli.make_pois", "make the POI file training takes from an OpenStreetMap extract"),
    "fetch-pois": ("aether.cli.fetch_pois", "fetch the POIs of an area from Overture Maps or OpenStreetMap"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="aether",
        description="AETHER: AlphaEarth embeddings aligned with "
        "points of interest and their text (Liu et al., arXiv 2510.09894).",
    )
    parser.add_argument("--version", action="version", version=f"aether {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # --help, --version, or one line naming what is wrong
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f"aether {argv[0]}", description=module.DESCRIPTION)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    run(lambda: module.run_command(args, launcher(f"aether {argv[0]}")))


if __name__ == "__main__":
    main()
