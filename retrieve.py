"""Ask an AETHER map in words (the same as `aether retrieve`): python retrieve.py --ckpt CKPT --emb
AETHER.tif --query TEXT --out DIR"""

from aether.cli.retrieve import main

if __name__ == "__main__":
    main()
