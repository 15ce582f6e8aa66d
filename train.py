"""Train AETHER's projectors (the same as `aether train`): python train.py --cfg config.yaml [--set
KEY=VALUE] [--resume RUN_DIR]"""

from aether.cli.train import main

if __name__ == "__main__":
    main()
