"""The whole fetch: AlphaEarth of one year for a box (or a file's extent) into one local int8
GeoTIFF, or one per UTM zone.

Google publishes the annual embeddings as 8192 x 8192 COG tiles, one folder per year and UTM
zone, with an index Parquet of all tiles (`aether.data.fetch.index`). Two hosts serve the same
tiles: Source Cooperative (free, unsigned HTTPS; its tiles are stored bottom-up) and Google
Cloud Storage (a requester-pays bucket: a billing project and credentials). `fetch_alphaearth`
picks the tiles of one year that meet the box, and copies only the blocks it needs over HTTP
range requests, output window by output window, into one GeoTIFF in the AlphaEarth encoding.
Pixels are never resampled on the grid of the tiles of the output CRS (`aether.data.fetch.grid`);
tiles of another UTM zone are warped into it by nearest neighbour (`aether.data.fetch.reader`).
An interrupted fetch continues when the same command runs again (`aether.geo.resumable`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from tqdm.auto import tqdm

from aether.config.schema import Config
from aether.core import http
from aether.core.errors import AetherError
from aether.core.files import atomic_write_text, check_inputs_kept, check_output_file, folder_lock, output_lock
from aether.core.runtime import thread_budget
from aether.data.fetch.area import bbox_of_file, check_bbox
from aether.data.fetch.grid import Grid, choose_crs, output_grid, utm_zone, windows_of
from aether.data.fetch.index import (
    SourceTile,
    cached_index,
    cached_index_paths,
    index_url,
    read_index,
    select_tiles,
    tile_version,
)
from aether.data.fetch.reader import TileReader, read_window
from aether.geo.alphaearth import ATTRIBUTION, LICENSE, N_BANDS, NODATA_INT8, PIXEL_M, band_names
from aether.geo.blocks import create_sparse
from aether.geo.layout import ZSTD_LEVEL, geotiff_layout, output_block_px, raster_tag
from aether.geo.resumable import ResumableOutput
from aether.geo.tiles import write_mosaic_vrt

logger = logging.getLogger(__name__)

WINDOW_PX = 1024  # output window read and written at a time (a 64-band int8 window is 64 MiB)
GDAL_CACHE_MB = 512  # the source blocks of a row of windows, so neighbouring windows do not fetch them again
CHECKPOINT_S = 5.0
FETCH_VERSION = 2  # 2: tile versions and block checksums in the journal
MAX_MARGIN_M = 100_000


@dataclass(frozen=True)
class FetchOptions:
    """Where from and how: `source` "source-coop" (default; free), "gcs" (requester-pays:
    `billing_project`, or GS_USER_PROJECT, and credentials GDAL finds), or the URL or path of an
    index Parquet; `crs` the output CRS (default: the UTM zone holding most of the box), or
    `per_zone` one file per zone; `tile_px` the window read and written at a time;
    `checkpoint_s` how often finished windows are made durable; `margin_m` how far beyond a
    `like` file's extent to fetch (default the augmented window's radius, data.aug_radius_m)."""

    source: str = "source-coop"
    crs: str | None = None
    per_zone: bool = False
    billing_project: str | None = None
    tile_px: int = WINDOW_PX
    checkpoint_s: float = CHECKPOINT_S
    margin_m: float | None = None

    def check(self) -> FetchOptions:
        """Refuse, before any work, options a fetch cannot run with; returns itself."""
        if self.tile_px < 16 or self.tile_px > 8192 or self.tile_px % 16:
            raise AetherError(
                f"--tile must be a multiple of 16 pixels (GeoTIFF blocks) between 16 and 8192, got {self.tile_px}"
            )
        if not self.checkpoint_s >= 0:
            raise AetherError(f"--checkpoint-every must be >= 0 seconds, got {self.checkpoint_s}")
        if self.per_zone and self.crs is not None:
            raise AetherError(
                "--crs and --per-zone do not go together: --per-zone writes each UTM zone in its own "
                "CRS; leave out --crs, or --per-zone to get one file in that CRS"
            )
        if self.margin_m is not None and not 0 <= self.margin_m <= MAX_MARGIN_M:
            raise AetherError(f"--margin-m must be between 0 and {MAX_MARGIN_M:,} m, got {self.margin_m:g}")
        return self


@dataclass(frozen=True)
class _Request:
    """One fetch once its area and tiles are known."""

    url: str  # the index
    year: int
    bbox: tuple[float, float, float, float]
    options: FetchOptions
    progress: bool


def fetch_alphaearth(
    out: str, year: int, bbox=None, like: str | None = None, options: FetchOptions | None = None, progress: bool = True
) -> Path:
    """Fetch AlphaEarth of `year` over `bbox` (west, south, east, north in degrees) or the extent of
    the raster or POI file `like`, into the int8 GeoTIFF `out`, as `options` ask.

    Across UTM zones, one CRS is chosen and the other zones' tiles are warped into it by nearest
    neighbour; `options.per_zone` instead writes one file per zone into the folder `out`, plus
    `tiles.txt` (the set of tiles training and inference take) and `mosaic.vrt`. Returns the
    GeoTIFF (or `tiles.txt`) written.
    """
    options = (options or FetchOptions()).check()
    if (bbox is None) == (like is None):
        raise AetherError("give the area as --bbox WEST SOUTH EAST NORTH or as --like FILE (one of them)")
    if not isinstance(year, (int, np.integer)) or isinstance(year, bool):
        raise AetherError(f"--year must be a whole year such as 2024, got {year!r}")
    out = Path(out)
    http.timeout_s()  # a malformed GDAL_HTTP_TIMEOUT is one line before any work
    if options.per_zone:
        if out.exists() and not out.is_dir():
            raise AetherError(f"--per-zone writes a folder, and {out} is a file; give a folder name")
        if not out.parent.is_dir():
            raise AetherError(f"output folder {out.parent} does not exist")
    else:
        check_output_file(out, example=f"alphaearth_{year}.tif", suffixes=(".tif", ".tiff"))
    if like is not None:
        check_inputs_kept([out], {like: "the --like file"}, "choose another --out")
        margin_m = Config().data.aug_radius_m if options.margin_m is None else options.margin_m
        bbox = bbox_of_file(like, margin_m)
    request = _Request(index_url(options.source), int(year), check_bbox(bbox), options, progress)
    url = request.url
    billing_project = options.billing_project or os.environ.get("GS_USER_PROJECT")
    if url.startswith("gs://") and not billing_project:
        raise AetherError(
            "--source gcs reads a requester-pays bucket: give your Google Cloud billing project with "
            "--billing-project PROJECT (or GS_USER_PROJECT) and credentials GDAL finds (e.g. "
            "GOOGLE_APPLICATION_CREDENTIALS), or use --source source-coop (free, no account)"
        )
    path, _ = cached_index(url, billing_project if url.startswith("gs://") else None, progress)
    tiles = select_tiles(read_index(path, url), url, request.year, request.bbox)
    check_inputs_kept(
        _outputs(out, options.per_zone, tiles, request.year), _inputs(url, path, tiles), "choose another --out"
    )
    env = {"GDAL_CACHEMAX": GDAL_CACHE_MB * 2**20}
    if billing_project and url.startswith("gs://"):
        env["GS_USER_PROJECT"] = billing_project
    with rasterio.Env(**env):
        if not options.per_zone:
            grid_crs, why = choose_crs(tiles, request.bbox, options.crs)
            return _fetch_one(tiles, grid_crs, why, out, request)
        return _fetch_zones(tiles, out, request)


def _zones(tiles: list[SourceTile]) -> dict[str, list[SourceTile]]:
    """The tiles by UTM zone (or CRS), named as --per-zone names its files (34N, EPSG_3035, ...)."""
    zones: dict[str, list[SourceTile]] = {}
    for t in tiles:
        zone = utm_zone(t.crs)
        zones.setdefault(f"{zone[0]:02d}{zone[1]}" if zone else t.crs.replace(":", "_"), []).append(t)
    return dict(sorted(zones.items()))


def _zone_file(folder: Path, year: int, zone: str) -> Path:
    return folder / f"alphaearth_{year}_{zone}.tif"


def _outputs(out: Path, per_zone: bool, tiles: list[SourceTile], year: int) -> list[Path]:
    """Every file a fetch writes."""
    if not per_zone:
        return [out]
    return [*(_zone_file(out, year, zone) for zone in _zones(tiles)), out / "tiles.txt", out / "mosaic.vrt"]


def _inputs(url: str, index: Path, tiles: list[SourceTile]) -> dict[str, str]:
    """Every local file a fetch reads, and what it is: the index (or its cached copy and the copy's
    record) and each local tile."""
    found = {str(index): "the tile index --source names" if index == Path(url) else "the cached tile index"}
    if index != Path(url):
        found[str(cached_index_paths(url)[1])] = "the cached tile index's record"
    for t in tiles:
        if not t.url.startswith("/vsi"):
            found[t.url] = f"the source tile {t.path}"
    return found


def _fetch_zones(tiles: list[SourceTile], out: Path, request: _Request) -> Path:
    """One GeoTIFF per CRS of `tiles` into the folder `out`, with tiles.txt and mosaic.vrt."""
    zones = _zones(tiles)
    with folder_lock(out, ".fetch.lock", f"folder {out}", "choose another --out"):
        written = []
        for name, group in zones.items():
            written.append(
                _fetch_one(
                    group,
                    CRS.from_user_input(group[0].crs),
                    f"zone {name}",
                    _zone_file(out, request.year, name),
                    request,
                )
            )
        listing = out / "tiles.txt"
        atomic_write_text(listing, "".join(f"{p.name}\n" for p in written))
        write_mosaic_vrt([str(p) for p in written], out / "mosaic.vrt")
    logger.info(
        f"{len(written)} zone files in {out}; train and embed them as one set of tiles: {listing} (mosaic.vrt shows "
        f"them as one layer in GDAL 3.7 or newer, and QGIS built on it: older GDAL has no Int8 type; open the zone "
        f"files there)"
    )
    others = sorted(p.name for p in out.glob("alphaearth_*.tif") if p not in written)
    if others:
        logger.warning(
            f"{out} also holds {', '.join(others)}, from an earlier fetch: not in tiles.txt or mosaic.vrt "
            f"(delete them if they are not yours)"
        )
    return listing


def _fetch_one(tiles: list[SourceTile], grid_crs: CRS, why: str, out: Path, request: _Request) -> Path:
    """Fetch `tiles` into the one GeoTIFF `out` on the grid of the request's box in `grid_crs`."""
    url, year, bbox, tile_px = request.url, request.year, request.bbox, request.options.tile_px
    grid = output_grid(tiles, grid_crs, bbox)
    # tiles of the output CRS first: they are copied; the others only fill what those lack
    tiles = sorted(tiles, key=lambda t: (CRS.from_user_input(t.crs) != grid_crs, t.path))
    warped = sorted({t.crs for t in tiles if CRS.from_user_input(t.crs) != grid_crs})
    crs_name = grid_crs.to_string()
    logger.info(
        f"{len(tiles)} tile{'s' if len(tiles) > 1 else ''} of {year}; output {grid.width} x {grid.height} px of "
        f"{PIXEL_M:g} m in {crs_name} ({why})"
    )
    if warped:
        logger.info(
            f"tiles in {', '.join(warped)} are warped into {crs_name} by nearest neighbour where the {crs_name} tiles "
            f"have no pixels (--crs chooses another CRS, --per-zone writes one file per zone)"
        )
    fingerprint = {
        "version": FETCH_VERSION,
        "index": url,
        "year": year,
        "tiles": [t.url for t in tiles],
        "tile versions": [tile_version(t) for t in tiles],
        "crs": crs_name,
        "transform": list(grid.transform)[:6],
        "width": grid.width,
        "height": grid.height,
        "tile_px": tile_px,
    }
    run = json.dumps(fingerprint, sort_keys=True)
    tags = {
        "AEF_SOURCE_INDEX": url,
        "AEF_SOURCE_TILES": " ".join(t.path for t in tiles),
        "AEF_YEAR": str(year),
        "AEF_ATTRIBUTION": ATTRIBUTION,
        "AEF_LICENSE": LICENSE,
        "AEF_BBOX_WGS84": " ".join(f"{v:.6f}" for v in bbox),
        "AEF_WARPED": (
            f"tiles in {', '.join(warped)} warped into {crs_name} by nearest neighbour"
            if warped
            else "none: every pixel is a source tile's own"
        ),
        "AETHER_FETCH": run,
    }
    with output_lock(out):
        if raster_tag(out, "AETHER_FETCH") == run:
            logger.info(f"{out} is already fetched (same tiles and grid); nothing to do")
            return out
        readers = []
        try:
            for t in tiles:  # opening them first: an unreachable host leaves nothing behind
                readers.append(TileReader(t, grid))
            _write(readers, grid, out, fingerprint, tags, request)
        finally:
            for reader in readers:
                reader.close()
    logger.info(f"AlphaEarth: {ATTRIBUTION} ({LICENSE}); keep this attribution with {out.name}")
    return out


def _write(readers: list[TileReader], grid: Grid, out: Path, fingerprint: dict, tags: dict, request: _Request) -> None:
    """Write the output window by window (`aether.geo.resumable.ResumableOutput`: a partial file beside
    `out` with a journal of finished windows, renamed to `out` at the end). An interrupted run (a
    signal, a kill, a lost connection) keeps both, and the same command continues from them.
    Windows that no tile meets are not fetched, compressed or written: they read as nodata."""
    tile_px, checkpoint_s, progress = request.options.tile_px, request.options.checkpoint_s, request.progress
    windows = windows_of(grid, tile_px)
    seen: set = set()
    window_bytes = []  # the compressed bytes of the source blocks each window reads first
    touched = []  # does any tile meet the window?
    for window in windows:
        total, meets = 0, False
        for k, reader in enumerate(readers):
            blocks = reader.blocks(window)
            meets |= bool(blocks)
            for block in blocks:
                if (k, block) in seen:
                    continue
                seen.add((k, block))
                total += reader.block_bytes(block)
        window_bytes.append(total)
        touched.append(meets)
    profile = dict(
        driver="GTiff",
        width=grid.width,
        height=grid.height,
        count=N_BANDS,
        dtype="int8",
        crs=grid.crs,
        transform=grid.transform,
        nodata=NODATA_INT8,
        **geotiff_layout("int8", output_block_px(tile_px)),
    )
    output = ResumableOutput(
        out,
        fingerprint,
        lambda path: create_sparse(path, profile, band_names(), tags),
        what="windows",
        checkpoint_s=checkpoint_s,
        level=ZSTD_LEVEL,
        threads=max(1, thread_budget() // 2),
        keep_on=(AetherError,),
    )
    with output:
        done = output.start(None, "another fetch")
        if output.resumed:
            logger.info(f"resuming: {len(done)} of {len(windows)} windows were fetched")
        empty = len(windows) - sum(touched)
        if empty:
            logger.info(
                f"{empty} of {len(windows)} windows meet no tile: they stay nodata, with nothing fetched or stored"
            )
        bar = tqdm(
            total=sum(window_bytes),
            initial=sum(window_bytes[i] for i in done),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="fetching",
            disable=not progress,
        )
        try:
            for i, window in enumerate(windows):
                if i in done:
                    continue
                if not touched[i]:
                    output.skip(i)
                    continue
                output.write(i, read_window(readers, window).transpose(1, 2, 0), window.row_off, window.col_off)
                bar.update(window_bytes[i])
            output.finish()
        except KeyboardInterrupt:
            logger.info(
                f"interrupted; the windows fetched so far are kept in {output.partial}: run the same command to "
                f"continue"
            )
            raise
        except AetherError as exc:  # a lost connection: what is done is kept
            raise AetherError(
                f"{exc} (the windows fetched so far are kept: run the same command to continue)"
            ) from None
        finally:
            bar.close()
