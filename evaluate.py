"""Evaluate a checkpoint (the same as `aether evaluate`): python evaluate.py --ckpt CKPT [--landuse
FILE]"""

from aether.cli.evaluate import main

if __name__ == "__main__":
    main()
