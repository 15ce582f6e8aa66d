"""What an AETHER raster is and how inference may be asked for it, declared once: output types with
their nodata and encodings, pooling modes, tile sizes, and `EmbedOptions` with its checks, for
the pipeline, the GPU tile path and the runs at scale alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import rasterio

from aether.core.errors import AetherError
from aether.geo.alphaearth import NODATA_INT8, NODATA_INT16

OUTPUT_DTYPES = ("int8", "int16", "float16", "float32")
NODATA = {"int8": NODATA_INT8, "int16": NODATA_INT16, "float16": float("nan"), "float32": float("nan")}
ENCODINGS = {
    "int8": "AlphaEarth int8: value = sign(q) * (q / 127.5)**2, nodata -128, unit vectors",
    "int16": "AETHER int16: value = q / 32767, nodata -32768, unit vectors",
}
# int16 by default: retrieval ranks from it as from vectors computed on the fly (scores within 5e-5);
# int8 (AlphaEarth's own encoding, half the size) moves scores by up to 0.007, which reorders close places
DEFAULT_DTYPE = "int16"
POOLINGS = ("window", "pixel")
TILE_PX = 512
MAX_TILE_PX = 4096  # largest --tile: a 4,096-pixel int8 tile is 1 GiB in and 2 GiB out, and several are in flight
STRIP_PX = 32768  # pixels of a tile pooled and projected at a time (8 MiB of float32 means)
CHECKPOINT_S = 5.0  # how often finished tiles are made durable for --resume
# of tiles and blocks in the partial output: 2 = bottom-up rasters tiled from the north, blocks written by
# aether.geo.blocks; 3 = each journaled block's checksum (a partial output of another layout is not resumed)
OUTPUT_LAYOUT = 3


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise AetherError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def check_tile_px(tile_px: int) -> None:
    """Refuse a tile side that is not whole blocks, or over MAX_TILE_PX (memory is bounded by the
    tile, so the tile must be bounded)."""
    if tile_px < 16 or tile_px % 16:
        raise AetherError(f"tile size must be a multiple of 16 pixels (GeoTIFF blocks), got {tile_px}")
    if tile_px > MAX_TILE_PX:
        raise AetherError(
            f"--tile {tile_px} is over the largest tile, {MAX_TILE_PX:,} pixels (several tiles are in "
            f"memory at once, each {tile_px}^2 x the bands); the tile is only the unit of work, the "
            f"output is the same: use {TILE_PX} (the default) or at most {MAX_TILE_PX:,}"
        )


@dataclass(frozen=True)
class EmbedOptions:
    """How an AlphaEarth raster becomes an AETHER raster (`aether.infer.pipeline.embed_raster`).

    `pooling`: "window" (each pixel sees the checkpoint's base-view window, as in training) or
    "pixel"; `dtype`: the output type (OUTPUT_DTYPES); `precision`: auto, bf16, fp16 or fp32;
    `tile_px`: the unit of work (the output is the same for any); `cog`: a Cloud-Optimized
    GeoTIFF with overviews; `device`: auto, cpu or cuda; `checkpoint_s`: how often finished tiles
    are made durable for a resume."""

    pooling: str = "window"
    dtype: str = DEFAULT_DTYPE
    precision: str = "auto"
    tile_px: int = TILE_PX
    cog: bool = False
    device: str = "auto"
    checkpoint_s: float = CHECKPOINT_S

    def check(self) -> EmbedOptions:
        """Refuse, before any work, options inference cannot run with; returns itself."""
        check_pooling(self.pooling)
        if self.dtype not in OUTPUT_DTYPES:
            raise AetherError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "float16" and not rasterio.dtypes.check_dtype("float16"):
            raise AetherError(
                f"--dtype float16 needs GDAL 3.11 or newer (this rasterio has GDAL "
                f"{rasterio.__gdal_version__}); use int16, int8 or float32"
            )
        check_tile_px(self.tile_px)
        if not self.checkpoint_s >= 0:
            raise AetherError(f"checkpoint interval must be 0 or more seconds, got {self.checkpoint_s}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def available_dtypes() -> list[str]:
    """The output types this rasterio's GDAL can write: int8, int16 and float32 always, float16
    from GDAL 3.11."""
    return [d for d in OUTPUT_DTYPES if d != "float16" or rasterio.dtypes.check_dtype("float16")]
