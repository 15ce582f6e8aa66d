"""`aether train` (and `python train.py`): train AETHER's projectors on POIs and an AlphaEarth raster.

On several GPUs (or CPU processes): torchrun --nproc_per_node N train.py --cfg config.yaml ...
(train.batch_size stays the global batch; see aether.train.distributed). SIGINT (Ctrl-C) or
SIGTERM stops training after the current step with a resumable last.pt, one message saying how
to resume, and exit code 130 or 143.
"""

from __future__ import annotations

import argparse
import shlex

from aether.cli.run import command
from aether.config.load import load_config
from aether.core.cluster import Cluster
from aether.train.loop import train

DESCRIPTION = "Train AETHER projectors on POIs and an AlphaEarth raster."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg", required=True, help="YAML config file (docs/config.md); the reference code's works too"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR_OR_CKPT",
        help="continue an interrupted run exactly: its run folder (meaning its last.pt) or a checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a train.run_dir that holds a trained model, replacing it (refused otherwise)",
    )
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers", type=int, metavar="N", help="pool the POIs as Dask tasks on a local cluster of N worker processes"
    )
    cluster.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="pool the POIs on an existing Dask scheduler")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_command(args: argparse.Namespace, launcher: list[str]) -> None:
    cfg = load_config(args.cfg, args.overrides)
    again = shlex.join([*launcher, "--cfg", args.cfg, *(f"--set={o}" for o in args.overrides)])
    train(
        cfg,
        progress=not args.no_progress,
        resume=args.resume,
        command=again,
        cluster=Cluster(args.workers, args.scheduler),
        overwrite=args.overwrite,
    )


main = command(add_arguments, run_command, DESCRIPTION, "python train.py")
