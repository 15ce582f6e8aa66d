"""Many AlphaEarth tiles as one input: naming them, routing points to them, mosaicking outputs.

Google ships AlphaEarth as tiles, each in its own UTM zone. Wherever AETHER takes a raster it
also takes a set of tiles, named by a glob (`tiles/*.tif`) or a text file (`.txt`, one path or
URL per line, `#` starts a comment, relative paths are relative to the list). A VRT stays one
raster: it is a mosaic in one CRS, which tiles from several zones cannot share.

A point goes to exactly one tile (tiles from neighbouring zones overlap): the tile in which it
lies farthest, in metres, from the tile's edge, so its windows are the least clipped; equal
distances go to the tile listed first.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from aether.core.errors import AetherError
from aether.core.files import atomic_write_text, temp_file_beside
from aether.geo.gdal import gdal_path, is_remote, local_absolute, streaming_cache
from aether.geo.layout import geotiff_layout
from aether.geo.raster import RasterInfo, raster_files

LIST_SUFFIXES = (".txt", ".lst")
GLOB_CHARS = "*?["


def is_tile_set(spec: str) -> bool:
    """Does `spec` name a set of tiles (a glob or a list file) rather than one raster?"""
    spec = str(spec)
    if Path(spec).suffix.lower() in LIST_SUFFIXES:
        return True
    return not is_remote(spec) and any(c in spec for c in GLOB_CHARS) and not Path(spec).exists()


def expand_tiles(spec: str, what: str = "raster") -> list[str]:
    """The rasters `spec` names: the matches of a glob (sorted), the lines of a list file, or
    `spec` itself. Refuses an empty set and a set with a tile named twice."""
    spec = str(spec)
    if not is_tile_set(spec):
        return [spec]
    if Path(spec).suffix.lower() in LIST_SUFFIXES:
        try:
            lines = Path(spec).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise AetherError(f"{what} list {spec} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AetherError(f"cannot read {what} list {spec}: {exc}") from None
        base = Path(spec).resolve().parent
        paths = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        paths = [p if is_remote(p) or Path(p).is_absolute() else str(base / p) for p in paths]
        if not paths:
            raise AetherError(f"{what} list {spec} names no rasters (one path or URL per line)")
    else:
        paths = sorted(os.path.abspath(p) for p in glob.glob(spec))
        if not paths:
            raise AetherError(f"{what} pattern {spec} matches no files")
    twice = [p for p, n in Counter(gdal_path(p) for p in paths).items() if n > 1]
    if twice:
        raise AetherError(f"{what} set {spec} names {twice[0]} more than once")
    return paths


def tile_stems(paths: list[str]) -> list[str]:
    """One output name per tile (its file name without suffix), refusing two tiles with one name."""
    stems = [Path(p.rstrip("/")).stem for p in paths]
    twice = [s for s, n in Counter(stems).items() if n > 1]
    if twice:
        raise AetherError(f"two tiles are both named {twice[0]}; outputs are named after tiles, so rename one")
    return stems


def edge_distance_m(info: RasterInfo, x: np.ndarray, y: np.ndarray, lat_deg: np.ndarray) -> np.ndarray:
    """Ground distance in metres from each point (in the tile's CRS) to the nearest tile edge;
    -inf for points off the tile."""
    rows, cols = info.rowcol(x, y)
    inside = (rows >= 0) & (rows < info.height) & (cols >= 0) & (cols < info.width)
    sx, sy = info.pixel_size_m(lat_deg if info.is_geographic else None)
    cols_f, rows_f = ~info.transform @ (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    dx = np.minimum(cols_f, info.width - cols_f) * sx
    dy = np.minimum(rows_f, info.height - rows_f) * sy
    return np.where(inside, np.minimum(dx, dy), -np.inf)


def route_points(infos: list[RasterInfo], lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The tile (index into `infos`) that pools each point, -1 where no tile holds it: the tile
    in which the point lies farthest from the edge; ties go to the tile listed first."""
    from rasterio.warp import transform as warp_transform

    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    best = np.full(len(lon), -np.inf)
    owner = np.full(len(lon), -1, dtype=np.int64)
    for i, info in enumerate(infos):
        x, y = warp_transform("EPSG:4326", info.crs, lon.tolist(), lat.tolist()) if len(lon) else ([], [])
        d = edge_distance_m(info, np.asarray(x), np.asarray(y), lat)
        better = d > best  # strictly: a tie keeps the earlier tile
        owner[better], best[better] = i, d[better]
    return owner


def write_mosaic_vrt(tiles: list[str], out: Path) -> Path:
    """A VRT at `out` that mosaics the rasters `tiles` (same band count and type), atomically.

    Tiles in one CRS are placed as they are; tiles in several CRSs are each seen through a
    warped VRT (nearest neighbour, EPSG:4326) kept beside `out`, so the mosaic opens as one
    layer in QGIS and GDAL. Sources are named relative to the VRT, so the folder can move.
    """
    import rasterio

    def crs_and_box(path: str) -> tuple[str, tuple]:
        with rasterio.open(path) as src:
            return src.crs.to_string(), (src.bounds, src.res, src.width, src.height)

    with rasterio.open(tiles[0]) as src:
        count, dtype, nodata = src.count, src.dtypes[0], src.nodata
        descriptions, crs0 = src.descriptions, src.crs
    crss, boxes = zip(*map(crs_and_box, tiles))
    sources = list(tiles)
    if len(set(crss)) > 1:
        crs0 = rasterio.crs.CRS.from_epsg(4326)
        sources = _warped_sources(tiles, crs0, out.parent / f"{out.stem}.warped")
        boxes = [crs_and_box(path)[1] for path in sources]
    res_x = min(b[1][0] for b in boxes)
    res_y = min(b[1][1] for b in boxes)
    left, right = min(b[0].left for b in boxes), max(b[0].right for b in boxes)
    bottom, top = min(b[0].bottom for b in boxes), max(b[0].top for b in boxes)
    width, height = int(round((right - left) / res_x)), int(round((top - bottom) / res_y))
    nodata_xml = "" if nodata is None else f"    <NoDataValue>{nodata!r}</NoDataValue>\n"
    vrt_type = {
        "int8": "Int8",
        "int16": "Int16",
        "float32": "Float32",
        "float64": "Float64",
        "float16": "Float16",
        "uint8": "Byte",
    }.get(dtype, dtype)
    bands = []
    for b in range(1, count + 1):
        parts = [f'  <VRTRasterBand dataType="{vrt_type}" band="{b}">\n']
        if descriptions[b - 1]:
            parts.append(f"    <Description>{escape(descriptions[b - 1])}</Description>\n")
        parts.append(nodata_xml)
        for path, (bounds, _, w, h) in zip(sources, boxes):
            dx, dy = round((bounds.left - left) / res_x, 6), round((top - bounds.top) / res_y, 6)
            dw, dh = round((bounds.right - bounds.left) / res_x, 6), round((bounds.top - bounds.bottom) / res_y, 6)
            rel = os.path.relpath(path, out.parent)
            parts.append(
                f'    <ComplexSource>\n      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>\n'
                f"      <SourceBand>{b}</SourceBand>\n"
                f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>\n'
                f'      <DstRect xOff="{dx!r}" yOff="{dy!r}" xSize="{dw!r}" ySize="{dh!r}"/>\n'
                + (f"      <NODATA>{nodata!r}</NODATA>\n" if nodata is not None else "")
                + "    </ComplexSource>\n"
            )
        parts.append("  </VRTRasterBand>\n")
        bands.append("".join(parts))
    doc = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{escape(crs0.to_wkt())}</SRS>\n"
        f"  <GeoTransform>{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {-res_y!r}</GeoTransform>\n"
        + "".join(bands)
        + "</VRTDataset>\n"
    )
    atomic_write_text(out, doc)
    return out


def _warped_sources(tiles: list[str], crs, folder: Path) -> list[str]:
    """Each tile seen in `crs` through a warped VRT (nearest neighbour) in `folder`, all on one grid
    (the finest pixel size any tile warps to, origin at whole pixels), so the mosaic places them
    without resampling a second time."""
    import math

    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.shutil import copy as rio_copy
    from rasterio.vrt import WarpedVRT

    folder.mkdir(exist_ok=True)
    defaults = []
    for path in tiles:
        with rasterio.open(path) as src, WarpedVRT(src, crs=crs) as vrt:
            defaults.append((vrt.bounds, min(vrt.res)))
    res = min(r for _, r in defaults)
    sources = []
    for i, (path, (bounds, _)) in enumerate(zip(map(local_absolute, tiles), defaults)):
        left, top = math.floor(bounds.left / res) * res, math.ceil(bounds.top / res) * res
        width = math.ceil((bounds.right - left) / res)
        height = math.ceil((top - bounds.bottom) / res)
        target = folder / f"{i:04d}_{Path(path).stem}.vrt"
        partial = folder / f".{target.name}.partial"
        with (
            rasterio.open(path) as src,
            WarpedVRT(
                src,
                crs=crs,
                resampling=Resampling.nearest,
                width=width,
                height=height,
                transform=Affine(res, 0, left, 0, -res, top),
            ) as vrt,
        ):
            rio_copy(vrt, str(partial), driver="VRT")
        _relative_sources(partial, target)
        sources.append(str(target))
    return sources


def _relative_sources(written: Path, vrt: Path) -> None:
    """Move the VRT GDAL wrote at `written` to `vrt` (atomically), naming its sources relative to
    the VRT's folder."""
    import re

    text = written.read_text(encoding="utf-8")
    written.unlink()

    def relative(match: re.Match) -> str:
        name = match.group(2)
        if os.path.isabs(name):
            name = os.path.relpath(name, vrt.parent)
        return f'{match.group(1)} relativeToVRT="1">{escape(name)}<'

    text = re.sub(r"(<SourceDataset)[^>]*>([^<]*)<", relative, text)
    atomic_write_text(vrt, text)


def join_bands(parts: list[str], out: Path, tags: dict | None = None, finish=None) -> Path:
    """One GeoTIFF at `out` from GeoTIFF bands of rows of one raster (the outputs of tasks that
    split it), atomically, laid out as the parts are (blocks, ZSTD, the float predictor) and with
    the first part's tags (updated by `tags`) and band descriptions. Memory is GDAL's block cache:
    the bands are copied through a VRT, block by block. `finish(path)` may rewrite the file in
    place before the rename (e.g. into a COG)."""
    import rasterio
    from rasterio.shutil import copy as rio_copy

    with rasterio.open(parts[0]) as src:
        first_tags, descriptions, profile = src.tags(), src.descriptions, src.profile
    vrt = write_mosaic_vrt(parts, Path(parts[0]).parent / f".{out.name}.bands.vrt")
    fd, tmp = temp_file_beside(out, ".partial.tif")
    os.close(fd)
    try:
        with streaming_cache():
            rio_copy(str(vrt), str(tmp), driver="GTiff", **geotiff_layout(profile["dtype"], profile["blockxsize"]))
        with rasterio.open(tmp, "r+") as dst:
            dst.update_tags(**{**first_tags, **(tags or {})})
            for i, name in enumerate(descriptions, start=1):
                if name:
                    dst.set_band_description(i, name)
        if finish is not None:
            finish(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        vrt.unlink(missing_ok=True)
    return out


def input_files(rasters: list[str], ckpt: str | None = None, tile_set: str | None = None) -> dict[str, str]:
    """Every local file a run reads, and what it is (for a refusal): each raster and the files
    behind it (`raster_files`: VRT sources, through VRTs of VRTs), the list naming the set of tiles
    `tile_set` (the rasters are then its tiles), and the checkpoint."""
    files = {}
    if ckpt is not None:
        files[ckpt] = "the checkpoint"
    if tile_set is not None and Path(tile_set).suffix.lower() in LIST_SUFFIXES:
        files[tile_set] = "the list of input tiles"
    for raster in rasters:
        found = raster_files(raster)
        if not found:  # a URL: no local file
            continue
        files.setdefault(found[0], "the input raster" if tile_set is None else f"an input tile (of {tile_set})")
        for path in found[1:]:
            files.setdefault(path, f"read through the input raster {raster} (a VRT source)")
    return files
