"""Train AETHER: python train.py --cfg config.yaml [--set train.epochs=3 ...]"""
import argparse

from aether.cli import run


def main() -> None:
    parser = argparse.ArgumentParser(description="Train AETHER projectors on POIs and an AlphaEarth raster.")
    parser.add_argument("--cfg", required=True, help="YAML config file (see README: Config reference)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args()

    from aether.config import load_config
    from aether.training import train

    cfg = load_config(args.cfg, args.overrides)
    train(cfg, progress=not args.no_progress)


if __name__ == "__main__":
    run(main)
