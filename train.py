"""Train AETHER: python train.py --cfg config.yaml [--set train.epochs=3 ...] [--resume RUN_DIR]

On several GPUs (or CPU processes): torchrun --nproc_per_node N train.py --cfg config.yaml ...
(train.batch_size stays the global batch; see aether/distributed.py).

SIGINT (Ctrl-C) or SIGTERM stops training after the current step with a resumable last.pt,
one message saying how to resume, and exit code 130 or 143.
"""
import argparse
import os
import shlex
import sys

from aether.cli.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description="Train AETHER projectors on POIs and an AlphaEarth raster.")
    parser.add_argument("--cfg", required=True, help="YAML config file (see README: Config reference)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                        help="continue an interrupted run exactly: its run folder (meaning its last.pt) or a checkpoint")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="pool the POIs as Dask tasks on a local cluster of N worker processes")
    cluster.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="pool the POIs on an existing Dask scheduler")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into a train.run_dir that holds a trained model, replacing it (refused otherwise)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args()

    from aether.config.schema import load_config
    from aether.train.loop import train

    cfg = load_config(args.cfg, args.overrides)
    launcher = (["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] if "LOCAL_WORLD_SIZE" in os.environ
                else ["python"])
    command = shlex.join([*launcher, sys.argv[0], "--cfg", args.cfg, *(f"--set={o}" for o in args.overrides)])
    train(cfg, progress=not args.no_progress, resume=args.resume, command=command, workers=args.workers,
          scheduler=args.scheduler, overwrite=args.overwrite)


if __name__ == "__main__":
    run(main)
