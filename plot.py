"""Pictures (the same as `aether plot`): python plot.py pca --tif RASTER --out PNG | python plot.py
curves --metrics metrics.jsonl --out PNG"""

from aether.cli.plot import main

if __name__ == "__main__":
    main()
