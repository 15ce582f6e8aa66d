"""Embed an AlphaEarth raster with a checkpoint (the same as `aether infer`): python
infer_aether_raster.py --ae_tif IN.tif --ckpt CKPT --out OUT.tif"""

from aether.cli.infer import main

if __name__ == "__main__":
    main()
