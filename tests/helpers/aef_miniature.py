"""A miniature of the published AlphaEarth layout, for the fetch tests (served on 127.0.0.1).

As on Source Cooperative: `tge-labs/aef/v1/annual/aef_index.parquet` (one row per tile: fid, path,
year, utm_zone, crs, utm_west/south/east/north, wgs84_west/south/east/north, location, and the
WGS84 footprint as a WKB polygon `geom`) and the tiles under `tge-labs/aef/v1/annual/YEAR/ZONE/`,
named `<image id>-<offset y>-<offset x>.tiff`, the index naming them by their s3:// address.
Each tile is a tiled int8 GeoTIFF of 64 bands (A00..A63, nodata -128), band-interleaved with ZSTD
and overviews, as the real 8192 px tiles are (1024 px blocks there, TILE_PX and BLOCK_PX here).
Two tiles sit on either side of the UTM 34/35 seam (24 degrees east) near Helsinki and overlap;
the zone 35 tile is stored bottom-up, as Source Cooperative stores its tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, from_origin

from aether.geo.alphaearth import N_BANDS, NODATA_INT8, band_names, quantize

TILE_PX, BLOCK_PX = 384, 128
PREFIX = "tge-labs/aef/v1/annual"
BUCKET = "s3://us-west-2.opendata.source.coop"
SEAM_LON, LAT = 24.0, 60.17
OVERLAP_M = 600  # each tile reaches this far across the seam
NODATA_COLS_35 = 30  # the zone 35 tile has no pixels in its westmost columns
NODATA_ROWS_34 = (100, 130)  # nor the zone 34 tile in these rows (north-up)


@dataclass(frozen=True)
class MiniTile:
    local: Path  # the file on disk
    key: str  # its key under the server root
    epsg: int
    year: int
    north_up: np.ndarray  # (64, h, w) int8 as seen north-up
    transform: Affine  # north-up transform


def embedding_field(size_px: int, seed: int, smooth_px: int = 8) -> np.ndarray:
    """(64, size, size) unit vectors that vary smoothly in space, like AlphaEarth (float32, quickly)."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((N_BANDS, size_px // smooth_px + 1, size_px // smooth_px + 1), dtype=np.float32)
    field = np.repeat(np.repeat(coarse, smooth_px, axis=1), smooth_px, axis=2)[:, :size_px, :size_px]
    field += 0.3 * rng.standard_normal(field.shape, dtype=np.float32)
    return field / np.linalg.norm(field, axis=0, keepdims=True)


def _write_tile(path: Path, data: np.ndarray, transform: Affine, epsg: int, bottom_up: bool) -> None:
    from rasterio.shutil import copy as rio_copy

    if bottom_up:
        data = data[:, ::-1, :]
        transform = transform @ Affine.translation(0, data.shape[1]) @ Affine.scale(1, -1)
    plain = path.with_suffix(".plain.tif")
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=N_BANDS,
        dtype="int8",
        crs=f"EPSG:{epsg}",
        transform=transform,
        nodata=NODATA_INT8,
        tiled=True,
        blockxsize=BLOCK_PX,
        blockysize=BLOCK_PX,
        interleave="band",
    )
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(band_names(), start=1):
            dst.set_band_description(i, name)
    with rasterio.open(plain, "r+") as dst:
        dst.build_overviews([2, 4, 8, 16, 32, 64, 128, 256], rasterio.enums.Resampling.nearest)
    # overviews and directories first, as in a COG
    rio_copy(
        str(plain),
        str(path),
        driver="GTiff",
        COPY_SRC_OVERVIEWS="YES",
        TILED="YES",
        BLOCKXSIZE=BLOCK_PX,
        BLOCKYSIZE=BLOCK_PX,
        INTERLEAVE="BAND",
        COMPRESS="ZSTD",
    )
    plain.unlink()


def build_miniature(root: Path) -> list[MiniTile]:
    """Write the miniature under `root`: tiles of 2024 in zones 34N and 35N, one of 2023 in 34N."""
    import geopandas
    from pyproj import Transformer
    from rasterio.warp import transform_bounds, transform_geom
    from shapely.geometry import box, shape

    tiles = []
    for seed, epsg in enumerate((32634, 32635)):
        x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(SEAM_LON, LAT)
        left = round(x / 10) * 10 - (TILE_PX * 10 - OVERLAP_M if epsg == 32634 else OVERLAP_M)
        top = round(y / 10) * 10 + TILE_PX * 5
        data = quantize(embedding_field(TILE_PX, seed))
        if epsg == 32635:
            data[:, :, :NODATA_COLS_35] = NODATA_INT8
        else:
            data[:, NODATA_ROWS_34[0] : NODATA_ROWS_34[1], :] = NODATA_INT8
        zone = f"{epsg - 32600}N"
        key = f"{PREFIX}/2024/{zone}/x{seed}mini{epsg}aef-0000000000-0000000000.tiff"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        transform = from_origin(left, top, 10.0, 10.0)
        _write_tile(path, data, transform, epsg, bottom_up=epsg == 32635)
        tiles.append(MiniTile(path, key, epsg, 2024, data, transform))
    older = tiles[0]
    key = f"{PREFIX}/2023/34N/x9mini32634old-0000000000-0000000000.tiff"
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    os.link(older.local, root / key)
    tiles.append(MiniTile(root / key, key, 32634, 2023, older.north_up, older.transform))

    rows = []
    for fid, t in enumerate(tiles, start=1):
        w, s, e, n = (t.transform.c, t.transform.f - TILE_PX * 10, t.transform.c + TILE_PX * 10, t.transform.f)
        ring = box(w, s, e, n).segmentize(TILE_PX * 10 / 8)
        footprint = shape(transform_geom(f"EPSG:{t.epsg}", "EPSG:4326", ring.__geo_interface__))
        ww, ss, ee, nn = transform_bounds(f"EPSG:{t.epsg}", "EPSG:4326", w, s, e, n, densify_pts=21)
        rows.append(
            {
                "fid": fid,
                "path": f"{BUCKET}/{t.key}",
                "year": t.year,
                "utm_zone": f"{t.epsg - 32600}N",
                "crs": f"EPSG:{t.epsg}",
                "utm_west": w,
                "utm_south": s,
                "utm_east": e,
                "utm_north": n,
                "wgs84_west": ww,
                "wgs84_south": ss,
                "wgs84_east": ee,
                "wgs84_north": nn,
                "location": None,
                "geom": footprint,
            }
        )
    frame = geopandas.GeoDataFrame(rows, geometry="geom", crs="EPSG:4326")
    frame["year"] = frame["year"].astype("int32")
    frame.to_parquet(root / PREFIX / "aef_index.parquet")
    return tiles


def index_url(server_url: str) -> str:
    """The miniature's index as a range server on its root serves it."""
    return f"{server_url}/{PREFIX}/aef_index.parquet"
