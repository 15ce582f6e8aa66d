"""Which tiles: AlphaEarth's public tile index (`aef_index.parquet`: one row per tile, with its path,
year, CRS and bounds in its own CRS and in WGS84), fetched over HTTP with a deadline and cached
(revalidated by ETag), its values checked, and the tiles of a year that meet a box selected.

The index is read with pyarrow (already a dependency) rather than aef-loader or aef-download:
eleven columns of one Parquet file are all AETHER needs, while those packages bring obstore,
VirtualiZarr/Zarr or xarray stacks and target other outputs (data cubes, Zarr stores).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from tqdm.auto import tqdm

from aether.core import http
from aether.core.errors import AetherError, first_line, shown
from aether.core.files import atomic_write, atomic_write_text
from aether.geo.identity import block_sizes_identity, remote_identity

logger = logging.getLogger(__name__)

INDEX_URLS = {
    "source-coop": "https://data.source.coop/tge-labs/aef/v1/annual/aef_index.parquet",
    "gcs": "gs://alphaearth_foundations/satellite_embedding/v1/annual/aef_index.parquet",
}


GCS_HTTPS = "https://storage.googleapis.com/"


# Source Cooperative's own HTTPS name for its S3 bucket (same keys, unsigned)
S3_MIRRORS = {"s3://us-west-2.opendata.source.coop/": "https://data.source.coop/"}


INDEX_COLUMNS = (
    "path",
    "year",
    "crs",
    "utm_west",
    "utm_south",
    "utm_east",
    "utm_north",
    "wgs84_west",
    "wgs84_south",
    "wgs84_east",
    "wgs84_north",
)


MAX_TILES = 256  # tiles one fetch reads at once (each is opened); more are refused: fetch pieces instead


@dataclass(frozen=True)
class SourceTile:
    """One AlphaEarth tile, as a row of the index names it: where the tile is and what it covers."""

    path: str  # as the index names it
    url: str  # what GDAL opens
    year: int
    crs: str
    bounds: tuple[float, float, float, float]  # west, south, east, north in its own CRS
    wgs84: tuple[float, float, float, float]


def tile_version(tile: SourceTile) -> str:
    """What identifies a tile's content now (`aether.geo.identity.remote_identity`: its ETag or
    Last-Modified over HTTP, else its blocks' stored sizes), so that a tile re-published between an
    interrupted fetch and its continuation is not mixed with its earlier version."""
    if tile.url.startswith("/vsi"):
        return remote_identity(tile.url)
    try:
        size = os.stat(tile.url).st_size
    except OSError as exc:
        raise AetherError(f"cannot read tile {tile.url}: {exc.strerror}") from None
    return f"{size} bytes, {block_sizes_identity(tile.url)}"


def cache_dir() -> Path:
    """AETHER's cache folder: $AETHER_CACHE, else ~/.cache/aether; one line when it names a file."""
    folder = Path(os.environ.get("AETHER_CACHE") or Path.home() / ".cache" / "aether")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AetherError(
            f"cache folder {folder} cannot be made: {existing} is a file, not a folder; set AETHER_CACHE to a folder"
        )
    return folder


def index_url(source: str) -> str:
    """The index a --source names: source-coop, gcs, or the URL (or local path) of an index."""
    return INDEX_URLS.get(source, source)


def _http_url(url: str) -> str:
    """An index URL as urllib fetches it (a gs:// object through Cloud Storage's HTTPS endpoint)."""
    if url.startswith("gs://"):
        return GCS_HTTPS + url[len("gs://") :]
    if url.startswith("s3://"):
        for prefix, https in S3_MIRRORS.items():
            if url.startswith(prefix):
                return https + url[len(prefix) :]
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
        logger.info(f"the cached index {data} cannot be read (cut short?); fetching it again")
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
        raise AetherError(
            f"cannot make the cache folder {data.parent}: {exc.strerror}; set AETHER_CACHE to a writable folder"
        ) from None
    try:
        with (
            http.request(_http_url(url), headers) as answer,
            atomic_write(data) as f,
            tqdm(
                total=int(answer.headers.get("Content-Length") or 0) or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="index",
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            for chunk in answer.chunks():
                f.write(chunk)
                bar.update(len(chunk))
            validators = {"etag": answer.headers.get("ETag"), "last_modified": answer.headers.get("Last-Modified")}
    except urllib.error.HTTPError as exc:
        if exc.code == 304 and meta:
            return data, meta.get("etag") or meta.get("last_modified") or ""
        hint = ""
        if exc.code in (401, 403) and url.startswith("gs://"):
            hint = (
                "; the bucket is requester-pays: the billing project must be yours and the request authorised, "
                "or use --source source-coop (free, no account)"
            )
        raise AetherError(f"cannot read the index {url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except AetherError as exc:  # unreachable, or too slow
        if meta:
            logger.warning(f"{exc}; using the index cached on {meta.get('fetched', '?')}")
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
        raise AetherError(
            f"index {url} has no column {', '.join(missing)}: not an AlphaEarth tile index (aef_index.parquet)"
        )
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
        return AetherError(
            f"index {index} names the tile {shown(path)}, {why}; tile paths must be s3://, gs://, "
            f"relative to the index, or http(s):// on the index's host"
        )

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
        return "/vsigs/" + path[len("gs://") :]
    if remote_index and not index.startswith(GCS_HTTPS):
        split = urllib.parse.urlsplit(index)
        return f"/vsicurl/{split.scheme}://{split.netloc}/{key}"
    for prefix, https in S3_MIRRORS.items():
        if path.startswith(prefix):
            return "/vsicurl/" + https + path[len(prefix) :]
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
        raise AetherError(
            f"index {url}: column {name}, row {row} (from 0) is {shown(raw.iloc[row])}, not {what}; "
            f"the index is damaged or not an AlphaEarth tile index"
        )
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
        have = f"{known[0]}-{known[-1]}" if len(known) == known[-1] - known[0] + 1 else ", ".join(str(y) for y in known)
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
                raise AetherError(
                    f"index {url}: column crs, row {i} (from 0) is {shown(crs)}, not a CRS PROJ knows "
                    f"({first_line(exc)})"
                ) from None
        bx0, by0, bx1, by1 = box_in[crs]
        bounds = tuple(float(v) for v in utm[i])
        if bx0 < bounds[2] and bx1 > bounds[0] and by0 < bounds[3] and by1 > bounds[1]:
            tiles.append(
                SourceTile(
                    path, tile_url(path, url), year, crs, bounds, (float(w[i]), float(s[i]), float(e[i]), float(n[i]))
                )
            )
            if len(tiles) > MAX_TILES:
                raise AetherError(
                    f"the box meets more than {MAX_TILES} tiles of {year} in the index {url}; fetch a "
                    f"smaller box (or several pieces)"
                )
    if not tiles:
        raise AetherError(
            f"no AlphaEarth tile of {year} covers the box {west:g} {south:g} {east:g} {north:g} "
            f"(the index {url} has none there: open ocean, or outside the product's coverage)"
        )
    return sorted(tiles, key=lambda t: t.path)
