"""Fetching real AlphaEarth for any place: from the public tile index to one local int8 GeoTIFF.

`fetch_alphaearth` (run.py) is the whole fetch; area.py says where, index.py which tiles,
grid.py on which grid, reader.py how a tile's pixels reach that grid."""

from aether.data.fetch.index import INDEX_URLS, MAX_TILES, cache_dir, cached_index_paths
from aether.data.fetch.run import CHECKPOINT_S, WINDOW_PX, FetchOptions, fetch_alphaearth

__all__ = [
    "CHECKPOINT_S",
    "INDEX_URLS",
    "MAX_TILES",
    "WINDOW_PX",
    "FetchOptions",
    "cache_dir",
    "cached_index_paths",
    "fetch_alphaearth",
]
