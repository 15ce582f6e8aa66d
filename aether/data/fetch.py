"""Fetching real AlphaEarth for any place: from the public tile index to one local int8 GeoTIFF.

Google publishes the annual embeddings as 8192 x 8192 COG tiles, one folder per year and UTM
zone, with an index Parquet of all tiles (one row per tile: `path`, `year`, `crs`, `utm_zone`,
its bounds in its own CRS `utm_west` .. `utm_north` and in WGS84 `wgs84_west` .. `wgs84_north`).
Two hosts serve the same tiles: Source Cooperative (free, unsigned HTTPS; its tiles are stored
bottom-up) and Google Cloud Storage (a requester-pays bucket: a billing project and credentials).

`fetch_alphaearth` reads the index (cached, revalidated by ETag), picks the tiles of one year
that meet a bounding box, and copies only the blocks it needs over HTTP range requests, output
window by output window, into one GeoTIFF in the AlphaEarth encoding. Pixels are never
resampled: on the grid of the tiles of the output CRS they are the tiles' own pixels, and tiles
of another UTM zone are warped into it by nearest neighbour. An interrupted fetch continues
when the same command runs again (a journal of finished windows beside the partial output).

The index is read with pyarrow (already a dependency) rather than aef-loader or aef-download:
ten columns of one Parquet file are all AETHER needs, while those packages bring obstore,
VirtualiZarr/Zarr or xarray stacks and target other outputs (data cubes, Zarr stores).
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from tqdm.auto import tqdm

from aether.core import http
from aether.geo.alphaearth import ATTRIBUTION, LICENSE, N_BANDS, NODATA_INT8, band_names
from aether.geo.blocks import create_sparse
from aether.core.log import log
from aether.model.devices import thread_budget
from aether.core.errors import AetherError, first_line, shown
from aether.core.files import (
    atomic_write,
    atomic_write_text,
    check_inputs_kept,
    folder_lock,
    output_lock,
)
from aether.geo.raster import (
    ZSTD_LEVEL,
    RasterInfo,
    block_sizes_identity,
    geotiff_layout,
    metres_per_degree,
    open_raster,
    output_block_px,
    raster_tag,
    read_bands,
    remote_identity,
)
from aether.geo.resumable import ResumableOutput

INDEX_URLS = {
    "source-coop": "https://data.source.coop/tge-labs/aef/v1/annual/aef_index.parquet",
    "gcs": "gs://alphaearth_foundations/satellite_embedding/v1/annual/aef_index.parquet",
}
GCS_HTTPS = "https://storage.googleapis.com/"
# Source Cooperative's own HTTPS name for its S3 bucket (same keys, unsigned)
S3_MIRRORS = {"s3://us-west-2.opendata.source.coop/": "https://data.source.coop/"}
INDEX_COLUMNS = ("path", "year", "crs", "utm_west", "utm_south", "utm_east", "utm_north",
                 "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
PIXEL_M = 10.0  # AlphaEarth's pixel size
WINDOW_PX = 1024  # output window read and written at a time (a 64-band int8 window is 64 MiB)
GDAL_CACHE_MB = 512  # the source blocks of a row of windows, so neighbouring windows do not fetch them again
CHECKPOINT_S = 5.0
MAX_OUTPUT_BYTES = 64 * 2**30  # larger requests are refused: fetch pieces instead
MAX_TILES = 256  # tiles one fetch reads at once (each is opened); more are refused: fetch pieces instead
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
FETCH_VERSION = 2  # 2: tile versions and block checksums in the journal
# the warper's approximation error in pixels: so small that each pixel is transformed exactly (rasterio's
# tolerance 0 leaves GDAL without a transformer)
WARP_TOLERANCE_PX = 1e-9


@dataclass(frozen=True)
class SourceTile:
    """One AlphaEarth tile, as a row of the index names it: where the tile is and what it covers."""

    path: str  # as the index names it
    url: str  # what GDAL opens
    year: int
    crs: str
    bounds: tuple[float, float, float, float]  # west, south, east, north in its own CRS
    wgs84: tuple[float, float, float, float]


@dataclass(frozen=True)
class Grid:
    """The output raster's grid (north-up)."""

    crs: CRS
    transform: Affine
    width: int
    height: int


def tile_version(tile: SourceTile) -> str:
    """What identifies a tile's content now (`aether.geo.raster.remote_identity`: its ETag or
    Last-Modified over HTTP, else its blocks' stored sizes), so that a tile re-published between an
    interrupted fetch and its continuation is not mixed with its earlier version."""
    if tile.url.startswith("/vsi"):
        return remote_identity(tile.url)
    try:
        size = os.stat(tile.url).st_size
    except OSError as exc:
        raise AetherError(f"cannot read tile {tile.url}: {exc.strerror}") from None
    return f"{size} bytes, {block_sizes_identity(tile.url)}"


# ---------------------------------------------------------------------------------------------
# Where: the bounding box


def check_bbox(bbox) -> tuple[float, float, float, float]:
    """A bounding box west, south, east, north in degrees, refused with one line when it is not one."""
    try:
        west, south, east, north = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise AetherError(f"--bbox needs four numbers, west south east north in degrees, got {bbox!r}") from None
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        raise AetherError("--bbox has a value that is not a finite number")
    for name, lat in (("south", south), ("north", north)):
        if not -90 <= lat <= 90:
            raise AetherError(f"--bbox {name} {lat:g} is not a latitude (-90 to 90); give west south east north "
                              f"in degrees")
    for name, lon in (("west", west), ("east", east)):
        if not -180 <= lon <= 180:
            raise AetherError(f"--bbox {name} {lon:g} is not a longitude (-180 to 180); give west south east north "
                              f"in degrees")
    if west >= east:
        raise AetherError(f"--bbox west {west:g} is not west of east {east:g}; give west south east north (an area "
                          f"across the antimeridian is fetched as two boxes)")
    if south >= north:
        raise AetherError(f"--bbox south {south:g} is not south of north {north:g}; give west south east north")
    return west, south, east, north


def bbox_of_file(path: str, margin_m: float) -> tuple[float, float, float, float]:
    """The WGS84 extent of a raster or a POI file, grown by `margin_m` on every side (the augmented
    window of a POI at the edge must lie inside the fetched raster)."""
    from rasterio.warp import transform_bounds

    if not Path(path).exists():
        raise AetherError(f"--like file {path} does not exist")
    if Path(path).suffix.lower() in RASTER_SUFFIXES:
        try:
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise AetherError(f"--like raster {path} has no CRS")
                west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        except rasterio.errors.RasterioIOError as exc:
            raise AetherError(f"cannot open --like raster {path}: {first_line(exc)}") from None
    else:
        from aether.data.poi import read_poi_frame

        frame = read_poi_frame(path).to_crs("EPSG:4326")
        frame = frame[~(frame.geometry.is_empty | frame.geometry.isna())]
        if not len(frame):
            raise AetherError(f"--like file {path} has no geometries")
        west, south, east, north = (float(v) for v in frame.total_bounds)
    edge_lat = min(max(abs(south), abs(north)), 89.0)  # longitude degrees are shortest at the pole-ward edge
    m_lat, m_lon = metres_per_degree(np.array(edge_lat))
    dlat, dlon = margin_m / float(m_lat), margin_m / float(m_lon)
    return (max(west - dlon, -180.0), max(south - dlat, -90.0), min(east + dlon, 180.0), min(north + dlat, 90.0))


# ---------------------------------------------------------------------------------------------
# Which tiles: the index


def cache_dir() -> Path:
    """AETHER's cache folder: $AETHER_CACHE, else ~/.cache/aether; one line when it names a file."""
    folder = Path(os.environ.get("AETHER_CACHE") or Path.home() / ".cache" / "aether")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AetherError(f"cache folder {folder} cannot be made: {existing} is a file, not a folder; set "
                          f"AETHER_CACHE to a folder")
    return folder


def index_url(source: str) -> str:
    """The index a --source names: source-coop, gcs, or the URL (or local path) of an index."""
    return INDEX_URLS.get(source, source)


def _http_url(url: str) -> str:
    """An index URL as urllib fetches it (a gs:// object through Cloud Storage's HTTPS endpoint)."""
    if url.startswith("gs://"):
        return GCS_HTTPS + url[len("gs://"):]
    if url.startswith("s3://"):
        for prefix, https in S3_MIRRORS.items():
            if url.startswith(prefix):
                return https + url[len(prefix):]
        raise AetherError(f"index {url}: give an s3:// index as an https:// URL or a local file")
    return url


def cached_index_paths(url: str) -> tuple[Path, Path]:
    """Where the cache keeps the index at `url` and its validators (ETag, Last-Modified)."""
    folder = cache_dir() / "aef_index"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return folder / f"{key}.parquet", folder / f"{key}.json"


def _readable_parquet(path: Path) -> bool:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (pyarrow.ArrowException, OSError):
        return False
    return True


def cached_index(url: str, billing_project: str | None = None, progress: bool = True) -> tuple[Path, str]:
    """A local copy of the index at `url` (a local path is used as it is) and its version (ETag or
    date). The copy lives in `cache_dir()` with the ETag and Last-Modified it came with, and is
    revalidated on each call (If-None-Match / If-Modified-Since: an unchanged index costs one small
    request); a cached copy that cannot be read (cut short) is fetched again. A host that cannot be
    reached while a readable copy is cached: the copy is used, and said so."""
    if not url.startswith(("http://", "https://", "gs://", "s3://")):
        if not Path(url).is_file():
            raise AetherError(f"index {url} does not exist; give --source source-coop, gcs, or an index URL or file")
        st = os.stat(url)
        return Path(url), f"{st.st_size}-{st.st_mtime_ns}"
    data, meta_path = cached_index_paths(url)
    try:
        meta = json.loads(meta_path.read_text()) if data.is_file() else {}
        if not isinstance(meta, dict):
            meta = {}
    except (OSError, ValueError):
        meta = {}
    if meta and not _readable_parquet(data):
        log(f"the cached index {data} cannot be read (cut short?); fetching it again")
        meta = {}
    headers = {"User-Agent": "aether-fetch"}
    if billing_project:
        headers["x-goog-user-project"] = billing_project
    if meta.get("etag"):
        headers["If-None-Match"] = meta["etag"]
    if meta.get("last_modified"):
        headers["If-Modified-Since"] = meta["last_modified"]
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AetherError(f"cannot make the cache folder {data.parent}: {exc.strerror}; set AETHER_CACHE to a "
                          f"writable folder") from None
    try:
        with http.request(_http_url(url), headers) as answer, atomic_write(data) as f, \
                tqdm(total=int(answer.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     unit_divisor=1024, desc="index", disable=not progress, leave=False) as bar:
            for chunk in answer.chunks():
                f.write(chunk)
                bar.update(len(chunk))
            validators = {"etag": answer.headers.get("ETag"), "last_modified": answer.headers.get("Last-Modified")}
    except urllib.error.HTTPError as exc:
        if exc.code == 304 and meta:
            return data, meta.get("etag") or meta.get("last_modified") or ""
        hint = ""
        if exc.code in (401, 403) and url.startswith("gs://"):
            hint = ("; the bucket is requester-pays: the billing project must be yours and the request authorised, "
                    "or use --source source-coop (free, no account)")
        raise AetherError(f"cannot read the index {url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except AetherError as exc:  # unreachable, or too slow
        if meta:
            log(f"note: {exc}; using the index cached on {meta.get('fetched', '?')}")
            return data, meta.get("etag") or meta.get("last_modified") or ""
        raise AetherError(f"{exc}; check the network or the proxy, or choose another --source") from None
    meta = {"url": url, **validators, "fetched": email.utils.formatdate(usegmt=True)}
    atomic_write_text(meta_path, json.dumps(meta))
    return data, meta.get("etag") or meta.get("last_modified") or meta["fetched"]


def read_index(path: Path, url: str):
    """The index's columns that AETHER uses, as a pyarrow Table."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise AetherError(f"index {url} is not a Parquet file ({first_line(exc)})") from None
    missing = [c for c in INDEX_COLUMNS if c not in schema.names]
    if missing:
        raise AetherError(f"index {url} has no column {', '.join(missing)}: not an AlphaEarth tile index "
                          f"(aef_index.parquet)")
    try:
        return pq.read_table(path, columns=list(INDEX_COLUMNS))
    except (pyarrow.ArrowException, OSError) as exc:
        raise AetherError(f"index {url} cannot be read ({first_line(exc)})") from None


def tile_url(path: str, index: str) -> str:
    """The name GDAL opens for a tile the index at `index` names `path`.

    Tile paths are limited to what the index format uses: s3:// and gs:// objects, paths relative
    to the index (inside its folder), and http(s):// URLs on the index's own host (any host for a
    local index). An s3:// or gs:// object of an index fetched over http(s) is read from the host
    that served the index, under the same key (Source Cooperative serves
    s3://us-west-2.opendata.source.coop/KEY as https://data.source.coop/KEY; a mirror that copies
    the keys works the same way); otherwise gs:// is read through /vsigs/ (the billing project and
    credentials GDAL finds) and s3:// through Source Cooperative's HTTPS name or /vsis3/. Anything
    else (a /vsi path such as /vsistdin/ or /vsisubfile/, file://, another host) is refused: an
    index must not make AETHER read a local file or another host into the output."""
    def refuse(why: str) -> AetherError:
        return AetherError(f"index {index} names the tile {shown(path)}, {why}; tile paths must be s3://, gs://, "
                           f"relative to the index, or http(s):// on the index's host")

    remote_index = index.startswith(("http://", "https://"))
    scheme = path.split("://", 1)[0].lower() if "://" in path else None
    if path.startswith("/vsi") or scheme not in (None, "http", "https", "s3", "gs"):
        raise refuse("which AETHER does not read")
    if scheme in ("http", "https") or (scheme is None and remote_index):
        url = urllib.parse.urljoin(index, path) if remote_index else path
        if remote_index and urllib.parse.urlsplit(url)[:2] != urllib.parse.urlsplit(index)[:2]:
            raise refuse("on another host than the index")
        return "/vsicurl/" + url
    if scheme is None:
        folder = Path(index).resolve().parent
        tile = (folder / path).resolve()
        if Path(path).is_absolute() or folder not in tile.parents:
            raise refuse("outside the index's folder")
        return str(tile)
    parts = path.split("://", 1)[1].split("/", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise refuse("which is not a bucket and key")
    key = parts[1]
    if scheme == "gs" and index.startswith("gs://"):
        return "/vsigs/" + path[len("gs://"):]
    if remote_index and not index.startswith(GCS_HTTPS):
        split = urllib.parse.urlsplit(index)
        return f"/vsicurl/{split.scheme}://{split.netloc}/{key}"
    for prefix, https in S3_MIRRORS.items():
        if path.startswith(prefix):
            return "/vsicurl/" + https + path[len(prefix):]
    return f"/vsi{scheme}/" + path.split("://", 1)[1]


def _numbers(table, name: str, url: str, whole: bool = False) -> np.ndarray:
    """The index column `name` as float64 (or int64 for `whole` numbers); one line naming the first
    row whose value is not one."""
    import pandas

    raw = table.column(name).to_pandas()
    values = pandas.to_numeric(raw, errors="coerce")
    bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
    if whole:
        bad |= values.fillna(0) % 1 != 0
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        what = "a whole year" if whole else "a number"
        raise AetherError(f"index {url}: column {name}, row {row} (from 0) is {shown(raw.iloc[row])}, not {what}; "
                          f"the index is damaged or not an AlphaEarth tile index")
    return values.to_numpy(dtype=np.int64 if whole else np.float64)


def select_tiles(table, url: str, year: int, bbox: tuple[float, float, float, float]) -> list[SourceTile]:
    """The tiles of `year` that meet `bbox` (WGS84), checked in each tile's own CRS. A tile listed
    twice (the same path, or the same CRS and bounds) counts once; a tile whose WGS84 bounds wrap
    the antimeridian (west > east) is met from either side. One line when the index holds a value
    that is not one (naming the column and row), when the year is not in the index, when no tile
    covers the box, or when the box meets more than MAX_TILES tiles."""
    from rasterio.warp import transform_bounds

    years = _numbers(table, "year", url, whole=True)
    known = np.unique(years)
    if not len(known):
        raise AetherError(f"index {url} has no tiles")
    if year not in known:
        have = (f"{known[0]}-{known[-1]}" if len(known) == known[-1] - known[0] + 1
                else ", ".join(str(y) for y in known))
        raise AetherError(f"year {year} is not in the index {url} (it has {have})")
    w, s, e, n = (_numbers(table, f"wgs84_{side}", url) for side in ("west", "south", "east", "north"))
    utm = np.stack([_numbers(table, f"utm_{side}", url) for side in ("west", "south", "east", "north")], axis=1)
    west, south, east, north = bbox
    wraps = w > e  # across the antimeridian: from west to 180 and from -180 to east
    meets_lon = np.where(wraps, (east > w) | (west < e), (w < east) & (e > west))
    rows = np.flatnonzero((years == year) & meets_lon & (s < north) & (n > south))
    paths = table.column("path").to_pylist()
    crss = table.column("crs").to_pylist()
    box_in: dict[str, tuple] = {}
    seen_paths, seen_places = set(), set()
    tiles = []
    for i in rows:
        path, crs = paths[i], crss[i]
        if not isinstance(path, str) or not path:
            raise AetherError(f"index {url}: column path, row {i} (from 0) is {shown(path)}, not a tile's path")
        place = (crs, *utm[i])
        if path in seen_paths or place in seen_places:
            continue
        seen_paths.add(path)
        seen_places.add(place)
        if crs not in box_in:
            try:
                box_in[crs] = transform_bounds("EPSG:4326", CRS.from_user_input(crs), *bbox, densify_pts=21)
            except (rasterio.errors.CRSError, TypeError, ValueError) as exc:
                raise AetherError(f"index {url}: column crs, row {i} (from 0) is {shown(crs)}, not a CRS PROJ knows "
                                  f"({first_line(exc)})") from None
        bx0, by0, bx1, by1 = box_in[crs]
        bounds = tuple(float(v) for v in utm[i])
        if bx0 < bounds[2] and bx1 > bounds[0] and by0 < bounds[3] and by1 > bounds[1]:
            tiles.append(SourceTile(path, tile_url(path, url), year, crs, bounds,
                                    (float(w[i]), float(s[i]), float(e[i]), float(n[i]))))
            if len(tiles) > MAX_TILES:
                raise AetherError(f"the box meets more than {MAX_TILES} tiles of {year} in the index {url}; fetch a "
                                  f"smaller box (or several pieces)")
    if not tiles:
        raise AetherError(f"no AlphaEarth tile of {year} covers the box {west:g} {south:g} {east:g} {north:g} "
                          f"(the index {url} has none there: open ocean, or outside the product's coverage)")
    return sorted(tiles, key=lambda t: t.path)


# ---------------------------------------------------------------------------------------------
# On which grid


def utm_zone(crs: str) -> tuple[int, str] | None:
    """(zone number, 'N' or 'S') of a WGS84 UTM CRS (EPSG:326zz / 327zz), else None."""
    epsg = CRS.from_user_input(crs).to_epsg()
    if epsg and 32601 <= epsg <= 32660:
        return epsg - 32600, "N"
    if epsg and 32701 <= epsg <= 32760:
        return epsg - 32700, "S"
    return None


def zone_share(crs: str, bbox: tuple[float, float, float, float]) -> float:
    """The fraction of the box (in degrees) that lies in the UTM zone of `crs` (0 for another CRS)."""
    zone = utm_zone(crs)
    if zone is None:
        return 0.0
    west, south, east, north = bbox
    z0 = -180.0 + 6.0 * (zone[0] - 1)
    lon = max(0.0, min(east, z0 + 6.0) - max(west, z0)) / (east - west)
    lat0, lat1 = (0.0, 90.0) if zone[1] == "N" else (-90.0, 0.0)
    lat = max(0.0, min(north, lat1) - max(south, lat0)) / (north - south)
    return lon * lat


def choose_crs(tiles: list[SourceTile], bbox, crs: str | None = None) -> tuple[CRS, str]:
    """The output CRS and why: `crs` if given (a projected CRS in metres), else the CRS of the tiles
    whose UTM zone holds most of the box (ties: the first in EPSG order)."""
    if crs is not None:
        try:
            chosen = CRS.from_user_input(crs)
        except rasterio.errors.CRSError:
            raise AetherError(f"--crs {crs!r} is not a CRS (e.g. EPSG:32635)") from None
        if not chosen.is_projected or abs(chosen.linear_units_factor[1] - 1.0) > 1e-9:
            raise AetherError(f"--crs {crs}: give a projected CRS in metres (e.g. a UTM zone): AlphaEarth pixels are "
                              f"{PIXEL_M:g} m")
        return chosen, "as --crs asked"
    candidates = sorted({t.crs for t in tiles}, key=lambda c: (CRS.from_user_input(c).to_epsg() or 0, c))
    best = max(candidates, key=lambda c: zone_share(c, bbox))
    zone = utm_zone(best)
    why = (f"UTM {zone[0]}{zone[1]} holds {zone_share(best, bbox):.0%} of the box" if zone
           else "the tiles' CRS")
    return CRS.from_user_input(best), why


def output_grid(tiles: list[SourceTile], crs: CRS, bbox) -> Grid:
    """The grid covering `bbox` in `crs` with AlphaEarth's pixels: snapped to the pixel grid of the
    tiles in that CRS (so their pixels are copied, not resampled), or to whole 10 m in another CRS."""
    from rasterio.warp import transform_bounds

    x0 = y0 = 0.0
    for t in tiles:
        if CRS.from_user_input(t.crs) == crs:
            x0, y0 = t.bounds[0], t.bounds[1]
            break
    minx, miny, maxx, maxy = transform_bounds("EPSG:4326", crs, *bbox, densify_pts=21)
    eps = 1e-6
    left = x0 + math.floor((minx - x0) / PIXEL_M + eps) * PIXEL_M
    right = x0 + math.ceil((maxx - x0) / PIXEL_M - eps) * PIXEL_M
    bottom = y0 + math.floor((miny - y0) / PIXEL_M + eps) * PIXEL_M
    top = y0 + math.ceil((maxy - y0) / PIXEL_M - eps) * PIXEL_M
    width, height = int(round((right - left) / PIXEL_M)), int(round((top - bottom) / PIXEL_M))
    size = width * height * N_BANDS
    if size > MAX_OUTPUT_BYTES:
        raise AetherError(f"the box is {width * PIXEL_M / 1000:,.0f} x {height * PIXEL_M / 1000:,.0f} km: its "
                          f"AlphaEarth raster would be {size / 2**30:,.0f} GiB, more than the "
                          f"{MAX_OUTPUT_BYTES / 2**30:.0f} GiB AETHER fetches at once; fetch a smaller box (or pieces)")
    return Grid(crs, Affine(PIXEL_M, 0.0, left, 0.0, -PIXEL_M, top), max(width, 1), max(height, 1))


def windows_of(grid: Grid, tile_px: int) -> list[Window]:
    """The output cut into windows of `tile_px`, row by row (smaller at the right and bottom)."""
    return [Window(c, r, min(tile_px, grid.width - c), min(tile_px, grid.height - r))
            for r in range(0, grid.height, tile_px) for c in range(0, grid.width, tile_px)]


# ---------------------------------------------------------------------------------------------
# Reading tiles into the output grid


class TileReader:
    """One source tile seen on the output grid: its own pixels where it shares the grid (a plain
    windowed read, either row order), else warped by nearest neighbour with an exact transformer."""

    def __init__(self, tile: SourceTile, grid: Grid):
        self.tile, self.grid = tile, grid
        self.info: RasterInfo = open_raster(tile.url)
        if not self.info.is_int8:
            raise AetherError(f"tile {tile.url} is {self.info.dtype}, not AlphaEarth's int8")
        self.src = rasterio.open(self.info.path)
        nu = self.info.north_up_transform
        dc, dr = (grid.transform.c - nu.c) / PIXEL_M, (nu.f - grid.transform.f) / PIXEL_M
        self.aligned = (self.info.crs == grid.crs and abs(nu.a - PIXEL_M) < 1e-9 and abs(nu.e + PIXEL_M) < 1e-9
                        and abs(dc - round(dc)) < 1e-6 and abs(dr - round(dr)) < 1e-6)
        self.dc, self.dr = int(round(dc)), int(round(dr))
        self.vrt = None
        if not self.aligned:
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT

            self.vrt = WarpedVRT(self.src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                 height=grid.height, resampling=Resampling.nearest, tolerance=WARP_TOLERANCE_PX,
                                 src_nodata=NODATA_INT8, nodata=NODATA_INT8)
        planar = self.src.interleaving == rasterio.enums.Interleaving.band
        self.bands = range(1, self.info.count + 1) if planar else range(1, 2)

    def source_window(self, window: Window) -> tuple[int, int, int, int] | None:
        """File rows r0:r1 and columns c0:c1 of the tile that `window` of the output needs, or None."""
        if self.aligned:
            c0, c1 = window.col_off + self.dc, window.col_off + window.width + self.dc
            n0, n1 = window.row_off + self.dr, window.row_off + window.height + self.dr
            c0, c1, n0, n1 = max(c0, 0), min(c1, self.info.width), max(n0, 0), min(n1, self.info.height)
            if c0 >= c1 or n0 >= n1:
                return None
            r0 = self.info.north_up_rows(n0, n1 - n0)
            return r0, r0 + n1 - n0, c0, c1
        from rasterio.warp import transform_bounds

        t = self.grid.transform
        left, top = t @ (window.col_off, window.row_off)
        right, bottom = t @ (window.col_off + window.width, window.row_off + window.height)
        x0, y0, x1, y1 = transform_bounds(self.grid.crs, self.info.crs, left, bottom, right, top, densify_pts=21)
        cols, rows = ~self.info.transform @ (np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
        c0, c1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())), self.info.width)
        r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())), self.info.height)
        return (r0, r1, c0, c1) if c0 < c1 and r0 < r1 else None

    def blocks(self, window: Window) -> set[tuple[int, int]]:
        """The tile's storage blocks (block row, block column) that `window` reads."""
        span = self.source_window(window)
        if span is None:
            return set()
        r0, r1, c0, c1 = span
        bh, bw = self.info.block_shape
        return {(i, j) for i in range(r0 // bh, (r1 - 1) // bh + 1) for j in range(c0 // bw, (c1 - 1) // bw + 1)}

    def block_bytes(self, block: tuple[int, int]) -> int:
        """The compressed size of a block (all bands), as the file's directory gives it."""
        try:
            return sum(self.src.block_size(b, *block) for b in self.bands)
        except (rasterio.errors.RasterioError, ValueError):  # a driver that does not say: its raw size
            bh, bw = self.info.block_shape
            return bh * bw * self.info.count

    def read(self, window: Window) -> np.ndarray | None:
        """(bands, h, w) int8 of `window` on the output grid, -128 where the tile has nothing."""
        span = self.source_window(window)
        if span is None:
            return None
        if not self.aligned:
            try:
                return self.vrt.read(window=window)
            except rasterio.errors.RasterioIOError as exc:
                raise AetherError(f"cannot read tile {self.tile.url}: {first_line(exc)}") from None
        r0, r1, c0, c1 = span
        pixels = read_bands(self.src, Window(c0, r0, c1 - c0, r1 - r0), self.info)
        if self.info.bottom_up:
            pixels = pixels[:, ::-1, :]
        out = np.full((self.info.count, window.height, window.width), NODATA_INT8, dtype=np.int8)
        n0 = self.info.north_up_rows(r0, r1 - r0) - self.dr - window.row_off
        out[:, n0:n0 + r1 - r0, c0 - self.dc - window.col_off:c1 - self.dc - window.col_off] = pixels
        return out

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.src.close()


def read_window(readers: list[TileReader], window: Window) -> np.ndarray:
    """The output window: each pixel from the first reader (tiles of the output CRS first) that
    has it; -128 where none has."""
    block = np.full((N_BANDS, window.height, window.width), NODATA_INT8, dtype=np.int8)
    empty = np.ones((window.height, window.width), dtype=bool)
    for reader in readers:
        if not empty.any():
            break
        part = reader.read(window)
        if part is None:
            continue
        take = empty & ~(part == NODATA_INT8).any(axis=0)
        block[:, take] = part[:, take]
        empty &= ~take
    return block


# ---------------------------------------------------------------------------------------------
# The whole fetch


def fetch_alphaearth(out: str, year: int, bbox=None, like: str | None = None, source: str = "source-coop",
                     crs: str | None = None, per_zone: bool = False, billing_project: str | None = None,
                     tile_px: int = WINDOW_PX, checkpoint_s: float = CHECKPOINT_S, progress: bool = True,
                     margin_m: float | None = None) -> Path:
    """Fetch AlphaEarth of `year` over `bbox` (west, south, east, north in degrees) or the extent of
    the raster or POI file `like` (grown by `margin_m`, default the augmented window's radius
    `data.aug_radius_m`), into the int8 GeoTIFF `out`.

    `source`: "source-coop" (default; free), "gcs" (requester-pays: `billing_project`, or
    GS_USER_PROJECT, and credentials GDAL finds), or the URL or path of an index Parquet. Across UTM
    zones, one CRS is chosen (`crs`, else the zone holding most of the box) and the other zones'
    tiles are warped into it by nearest neighbour; `per_zone=True` instead writes one file per zone
    into the folder `out`, plus `tiles.txt` (the set of tiles training and inference take) and
    `mosaic.vrt`. Returns the GeoTIFF (or `tiles.txt`) written.
    """
    from aether.config.schema import Config

    if (bbox is None) == (like is None):
        raise AetherError("give the area as --bbox WEST SOUTH EAST NORTH or as --like FILE (one of them)")
    if not isinstance(year, (int, np.integer)) or isinstance(year, bool):
        raise AetherError(f"--year must be a whole year such as 2024, got {year!r}")
    if tile_px < 16 or tile_px > 8192 or tile_px % 16:
        raise AetherError(f"--tile must be a multiple of 16 pixels (GeoTIFF blocks) between 16 and 8192, got {tile_px}")
    if not checkpoint_s >= 0:
        raise AetherError(f"--checkpoint-every must be >= 0 seconds, got {checkpoint_s}")
    out = Path(out)
    if per_zone and crs is not None:
        raise AetherError("--crs and --per-zone do not go together: --per-zone writes each UTM zone in its own CRS; "
                          "leave out --crs, or --per-zone to get one file in that CRS")
    http.timeout_s()  # a malformed GDAL_HTTP_TIMEOUT is one line before any work
    if per_zone:
        if out.exists() and not out.is_dir():
            raise AetherError(f"--per-zone writes a folder, and {out} is a file; give a folder name")
        if not out.parent.is_dir():
            raise AetherError(f"output folder {out.parent} does not exist")
    else:
        if out.is_dir():
            raise AetherError(f"output {out} is a folder; give a file name such as {out / f'alphaearth_{year}.tif'}")
        if not out.parent.is_dir():
            raise AetherError(f"output folder {out.parent} does not exist")
        if out.suffix.lower() not in (".tif", ".tiff"):
            raise AetherError(f"output {out} must be a GeoTIFF (.tif)")
    if like is not None:
        check_inputs_kept([out], {like: "the --like file"}, "choose another --out")
        margin_m = Config().data.aug_radius_m if margin_m is None else margin_m
        if not 0 <= margin_m <= 100_000:
            raise AetherError(f"--margin-m must be between 0 and 100,000 m, got {margin_m:g}")
        bbox = bbox_of_file(like, margin_m)
    bbox = check_bbox(bbox)
    url = index_url(source)
    billing_project = billing_project or os.environ.get("GS_USER_PROJECT")
    if url.startswith("gs://") and not billing_project:
        raise AetherError("--source gcs reads a requester-pays bucket: give your Google Cloud billing project with "
                          "--billing-project PROJECT (or GS_USER_PROJECT) and credentials GDAL finds (e.g. "
                          "GOOGLE_APPLICATION_CREDENTIALS), or use --source source-coop (free, no account)")
    path, _ = cached_index(url, billing_project if url.startswith("gs://") else None, progress)
    tiles = select_tiles(read_index(path, url), url, int(year), bbox)
    check_inputs_kept(_outputs(out, per_zone, tiles, int(year)), _inputs(url, path, tiles), "choose another --out")
    env = {"GDAL_CACHEMAX": GDAL_CACHE_MB * 2**20}
    if billing_project and url.startswith("gs://"):
        env["GS_USER_PROJECT"] = billing_project
    with rasterio.Env(**env):
        if not per_zone:
            grid_crs, why = choose_crs(tiles, bbox, crs)
            return _fetch_one(tiles, grid_crs, why, bbox, out, url, int(year), tile_px, checkpoint_s, progress)
        return _fetch_zones(tiles, bbox, out, url, int(year), tile_px, checkpoint_s, progress)


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


def _fetch_zones(tiles: list[SourceTile], bbox, out: Path, url: str, year: int, tile_px: int, checkpoint_s: float,
                 progress: bool) -> Path:
    """One GeoTIFF per CRS of `tiles` into the folder `out`, with tiles.txt and mosaic.vrt."""
    from aether.geo.tiles import write_mosaic_vrt

    zones = _zones(tiles)
    with folder_lock(out, ".fetch.lock", f"folder {out}", "choose another --out"):
        written = []
        for name, group in zones.items():
            written.append(_fetch_one(group, CRS.from_user_input(group[0].crs), f"zone {name}", bbox,
                                      _zone_file(out, year, name), url, year, tile_px, checkpoint_s, progress))
        listing = out / "tiles.txt"
        atomic_write_text(listing, "".join(f"{p.name}\n" for p in written))
        write_mosaic_vrt([str(p) for p in written], out / "mosaic.vrt")
    log(f"{len(written)} zone files in {out}; train and embed them as one set of tiles: {listing} (mosaic.vrt shows "
        f"them as one layer in GDAL 3.7 or newer, and QGIS built on it: older GDAL has no Int8 type; open the zone "
        f"files there)")
    others = sorted(p.name for p in out.glob("alphaearth_*.tif") if p not in written)
    if others:
        log(f"note: {out} also holds {', '.join(others)}, from an earlier fetch: not in tiles.txt or mosaic.vrt "
            f"(delete them if they are not yours)")
    return listing


def _fetch_one(tiles: list[SourceTile], grid_crs: CRS, why: str, bbox, out: Path, url: str, year: int, tile_px: int,
               checkpoint_s: float, progress: bool) -> Path:
    """Fetch `tiles` into the one GeoTIFF `out` on the grid of `bbox` in `grid_crs`."""
    grid = output_grid(tiles, grid_crs, bbox)
    # tiles of the output CRS first: they are copied; the others only fill what those lack
    tiles = sorted(tiles, key=lambda t: (CRS.from_user_input(t.crs) != grid_crs, t.path))
    warped = sorted({t.crs for t in tiles if CRS.from_user_input(t.crs) != grid_crs})
    crs_name = grid_crs.to_string()
    log(f"{len(tiles)} tile{'s' if len(tiles) > 1 else ''} of {year}; output {grid.width} x {grid.height} px of "
        f"{PIXEL_M:g} m in {crs_name} ({why})")
    if warped:
        log(f"tiles in {', '.join(warped)} are warped into {crs_name} by nearest neighbour where the {crs_name} tiles "
            f"have no pixels (--crs chooses another CRS, --per-zone writes one file per zone)")
    fingerprint = {"version": FETCH_VERSION, "index": url, "year": year, "tiles": [t.url for t in tiles],
                   "tile versions": [tile_version(t) for t in tiles], "crs": crs_name, "transform": list(grid.transform)[:6], "width": grid.width,
                   "height": grid.height, "tile_px": tile_px}
    run = json.dumps(fingerprint, sort_keys=True)
    tags = {
        "AEF_SOURCE_INDEX": url,
        "AEF_SOURCE_TILES": " ".join(t.path for t in tiles),
        "AEF_YEAR": str(year),
        "AEF_ATTRIBUTION": ATTRIBUTION,
        "AEF_LICENSE": LICENSE,
        "AEF_BBOX_WGS84": " ".join(f"{v:.6f}" for v in bbox),
        "AEF_WARPED": (f"tiles in {', '.join(warped)} warped into {crs_name} by nearest neighbour" if warped
                       else "none: every pixel is a source tile's own"),
        "AETHER_FETCH": run,
    }
    with output_lock(out):
        if raster_tag(out, "AETHER_FETCH") == run:
            log(f"{out} is already fetched (same tiles and grid); nothing to do")
            return out
        readers = []
        try:
            for t in tiles:  # opening them first: an unreachable host leaves nothing behind
                readers.append(TileReader(t, grid))
            _write(readers, grid, out, fingerprint, tags, tile_px, checkpoint_s, progress)
        finally:
            for reader in readers:
                reader.close()
    print(f"AlphaEarth: {ATTRIBUTION} ({LICENSE}); keep this attribution with {out.name}")
    return out


def _write(readers: list[TileReader], grid: Grid, out: Path, fingerprint: dict, tags: dict, tile_px: int,
           checkpoint_s: float, progress: bool) -> None:
    """Write the output window by window (`aether.geo.resumable.ResumableOutput`: a partial file beside
    `out` with a journal of finished windows, renamed to `out` at the end). An interrupted run (a
    signal, a kill, a lost connection) keeps both, and the same command continues from them.
    Windows that no tile meets are not fetched, compressed or written: they read as nodata."""
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
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=N_BANDS, dtype="int8",
                   crs=grid.crs, transform=grid.transform, nodata=NODATA_INT8,
                   **geotiff_layout("int8", output_block_px(tile_px)))
    output = ResumableOutput(out, fingerprint, lambda path: create_sparse(path, profile, band_names(), tags),
                             what="windows", checkpoint_s=checkpoint_s, level=ZSTD_LEVEL,
                             threads=max(1, thread_budget() // 2), keep_on=(AetherError,))
    with output:
        done = output.start(None, "another fetch")
        if output.resumed:
            log(f"resuming: {len(done)} of {len(windows)} windows were fetched")
        empty = len(windows) - sum(touched)
        if empty:
            log(f"{empty} of {len(windows)} windows meet no tile: they stay nodata, with nothing fetched or stored")
        bar = tqdm(total=sum(window_bytes), initial=sum(window_bytes[i] for i in done), unit="B", unit_scale=True,
                   unit_divisor=1024, desc="fetching", disable=not progress)
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
            log(f"interrupted; the windows fetched so far are kept in {output.partial}: run the same command to "
                f"continue")
            raise
        except AetherError as exc:  # a lost connection: what is done is kept
            raise AetherError(f"{exc} (the windows fetched so far are kept: run the same command to continue)") \
                from None
        finally:
            bar.close()
