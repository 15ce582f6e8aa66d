"""Overture Maps Places for a box: only the row groups of the release's GeoParquet files whose
bbox statistics meet the box are read, with pyarrow, each cached once as it came.

pyarrow rather than the `overturemaps` package: that package fixes the STAC catalogue's address and
the bucket's region, so it cannot be pointed at a mirror or at a server on 127.0.0.1 (the tests),
and it is itself a thin layer over the same pyarrow reads. Here the footer of each file gives
every row group's bbox (min/max of bbox.xmin/xmax/ymin/ymax), and only the row groups that meet
the box are requested, over S3 range reads (anonymous; AWS_ENDPOINT_URL points at another
S3-compatible server).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import shapely
from tqdm.auto import tqdm

from aether.core.errors import AetherError, first_line
from aether.core.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

RELEASE = "2026-09-23.1"  # pinned: the same command gives the same places; --release for another
ROOT = "s3://overturemaps-us-west-2/release"  # Overture's public bucket (anonymous reads)
REGION = "us-west-2"
ATTRIBUTION = (
    "© Overture Maps Foundation (overturemaps.org); places from Meta, Microsoft, Foursquare, AllThePlaces and others"
)
LICENSE = "CDLA-Permissive-2.0; some sources Apache-2.0 or CC0-1.0 (each place's sources column names them)"
TEMPLATE = "A place of {category}, named {name}."
FIELDS = ("name", "category", "alternates", "confidence")  # what a template may use
COLUMNS = ("id", "name", "category", "alternates", "confidence", "sources", "description")
READ = ("id", "geometry", "names", "categories", "taxonomy", "confidence", "sources")  # those the file has
BOX_STATS = ("bbox.xmin", "bbox.xmax", "bbox.ymin", "bbox.ymax")
PLACE_COLUMNS = ("id", "name", "category", "alternates", "confidence", "sources", "lon", "lat")  # fetch_places' rows


@dataclass(frozen=True)
class PlacesSource:
    """Where a release's place files are: `root` (s3://bucket/prefix, or a local folder) and `release`."""

    release: str = RELEASE
    root: str = ROOT

    @property
    def folder(self) -> str:
        return release_folder(self.root, self.release)


def release_folder(root: str, release: str) -> str:
    """The folder of a release's place files under `root` (Overture's layout)."""
    return f"{root.rstrip('/')}/{release}/theme=places/type=place"


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `root` and the path in it: S3 (anonymous, Overture's region, or the
    server at AWS_ENDPOINT_URL) or a local folder."""
    if root.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        fs = pafs.S3FileSystem(
            anonymous=True,
            region=REGION,
            endpoint_override=endpoint,
            scheme="http" if endpoint and endpoint.startswith("http://") else "https",
            connect_timeout=10,
            request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        return fs, root.removeprefix("s3://")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def place_files(fs: pafs.FileSystem, source: PlacesSource, path: str, cache: Path) -> list[pafs.FileInfo]:
    """The release's Parquet files, in name order; one line when the release or the host is not there.
    A release does not change once published, so its listing is cached with its row groups: a run
    whose parts are all cached needs no server."""
    record = cache / "files.json"
    if record.exists():
        return [pafs.FileInfo(p, pafs.FileType.File, size=size) for p, size in json.loads(record.read_text())]
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise AetherError(f"cannot list Overture places at {source.folder}: {first_line(exc)}") from None
    files = sorted((i for i in infos if i.path.endswith(".parquet")), key=lambda i: i.path)
    if not files:
        raise AetherError(
            f"no Overture places at {source.folder}: release {source.release} is not there (Overture keeps "
            f"only recent releases; give a current one with --release, see docs.overturemaps.org/release)"
        )
    atomic_write_text(record, json.dumps([[i.path, i.size] for i in files]))
    return files


def group_boxes(fs: pafs.FileSystem, info: pafs.FileInfo, cache: Path) -> list[list[float] | None]:
    """Each row group's [xmin, ymin, xmax, ymax] from the file's footer statistics, one float32 step
    wider (`outward`), or None where they are missing (that group is read); cached beside the row
    groups, keyed by the file's size."""
    record = cache / f"{Path(info.path).stem}.groups.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("size") == info.size:
            return saved["groups"]
    try:
        with fs.open_input_file(info.path) as handle:
            meta = pq.ParquetFile(handle).metadata
    except OSError as exc:
        raise AetherError(f"cannot read the footer of {info.path}: {first_line(exc)}") from None
    paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
    where = {name: paths.index(name) for name in BOX_STATS if name in paths}
    groups = []
    for g in range(meta.num_row_groups):
        stats = [meta.row_group(g).column(where[n]).statistics if n in where else None for n in BOX_STATS]
        if any(s is None or not s.has_min_max for s in stats):
            groups.append(None)
            continue
        xmin, xmax, ymin, ymax = stats
        groups.append([outward(xmin.min, -1), outward(ymin.min, -1), outward(xmax.max, 1), outward(ymax.max, 1)])
    atomic_write_text(record, json.dumps({"size": info.size, "groups": groups}))
    return groups


def outward(value: float, direction: int) -> float:
    """A bbox statistic moved one float32 step outward: the bbox columns are float32 rounded to the
    nearest from the float64 point, so a point on the box's edge can have a bbox just inside it."""
    return float(np.nextafter(np.float32(value), np.float32(direction * np.inf)))


def meets(group: list[float] | None, box: tuple[float, float, float, float]) -> bool:
    if group is None:
        return True
    west, south, east, north = box
    return group[0] <= east and group[2] >= west and group[1] <= north and group[3] >= south


def cached_group(info: pafs.FileInfo, group: int, cache: Path) -> pa.Table | None:
    """Row group `group` of the file as an earlier run cached it, or None."""
    part = cache / f"{Path(info.path).stem}.rg{group}.parquet"
    if part.exists():
        try:
            return pq.read_table(part)
        except (OSError, pa.ArrowInvalid):  # cut short outside atomic_write (a full disk): read again
            part.unlink()
    return None


def read_group(parquet: pq.ParquetFile, info: pafs.FileInfo, group: int, cache: Path) -> pa.Table:
    """Row group `group` of the open file (the columns READ that it has), read and cached."""
    names = [n for n in READ if n in parquet.schema_arrow.names]
    try:
        table = parquet.read_row_group(group, columns=names)
    except OSError as exc:
        raise AetherError(f"cannot read {info.path} (row group {group}): {first_line(exc)}") from None
    with atomic_write(cache / f"{Path(info.path).stem}.rg{group}.parquet") as out:
        pq.write_table(table, out)
    return table


def fetch_places(
    box: tuple[float, float, float, float], source: PlacesSource, cache: Path, progress: bool = True
) -> tuple[pd.DataFrame, dict]:
    """The places with a point inside `box` (west, south, east, north; edges included) as one row
    each (id, name, category, alternates, confidence, sources, lon, lat), and what was read. Each
    file is opened once (its footer read once) for all its row groups that are not cached."""
    fs, root = filesystem(source.root)
    cache.mkdir(parents=True, exist_ok=True)
    files = place_files(fs, source, release_folder(root, source.release), cache)
    wanted, n_groups = [], 0
    for info in tqdm(files, desc="Overture footers", unit="file", disable=not progress):
        groups = group_boxes(fs, info, cache)
        n_groups += len(groups)
        wanted.append((info, [g for g, b in enumerate(groups) if meets(b, box)]))
    frames = []
    with tqdm(
        total=sum(len(g) for _, g in wanted), desc="Overture row groups", unit="group", disable=not progress
    ) as bar:
        for info, groups in wanted:
            with ExitStack() as opened:
                parquet = None  # opened at the first row group not cached
                for g in groups:
                    table = cached_group(info, g, cache)
                    if table is None:
                        if parquet is None:
                            parquet = open_file(fs, info, opened)
                        table = read_group(parquet, info, g, cache)
                    frames.append(places_in_box(table, box))
                    bar.update()
    read = {"files": len(files), "row_groups": n_groups, "row_groups_read": sum(len(g) for _, g in wanted)}
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(PLACE_COLUMNS))), read


def open_file(fs: pafs.FileSystem, info: pafs.FileInfo, opened: ExitStack) -> pq.ParquetFile:
    """The file open for range reads, closed with `opened`."""
    try:
        handle = opened.enter_context(fs.open_input_file(info.path))
        return pq.ParquetFile(handle)
    except OSError as exc:
        raise AetherError(f"cannot read {info.path}: {first_line(exc)}") from None


def places_in_box(table: pa.Table, box: tuple[float, float, float, float]) -> pd.DataFrame:
    """The rows of a row group whose point lies inside `box`, flattened: the primary name, the primary
    category and its alternates (`categories`, or the newer `taxonomy` where that is all there is),
    the confidence, the sources' dataset names (unique, in order), lon and lat."""
    points = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    lon, lat = shapely.get_x(points), shapely.get_y(points)
    west, south, east, north = box
    inside = (lon >= west) & (lon <= east) & (lat >= south) & (lat <= north)
    rows = table.filter(pa.array(inside)).to_pylist()
    out = []
    for row, x, y in zip(rows, lon[inside], lat[inside]):
        categories = row.get("categories") or {}
        taxonomy = row.get("taxonomy") or {}
        primary = categories.get("primary") or taxonomy.get("primary")
        alternates = categories.get("alternate") or taxonomy.get("alternates") or []
        datasets = [s.get("dataset") for s in row.get("sources") or [] if s.get("dataset")]
        out.append(
            {
                "id": row["id"],
                "name": ((row.get("names") or {}).get("primary") or "").strip() or None,
                "category": primary,
                "alternates": list(alternates),
                "confidence": row.get("confidence"),
                "sources": list(dict.fromkeys(datasets)),
                "lon": float(x),
                "lat": float(y),
            }
        )
    return pd.DataFrame(out, columns=list(PLACE_COLUMNS))


def words(category: str | None) -> str:
    """A category as words: 'coffee_shop' -> 'coffee shop'."""
    return (category or "").replace("_", " ").strip()


def confidence_of(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
