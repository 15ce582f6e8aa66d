"""Zones for per-zone features: polygons read from a file (any CRS, any format GDAL reads), or the
H3 cells that cover a raster; and the GeoParquet file per-zone features are streamed into."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from aether.core.errors import AetherError, first_line
from aether.core.files import temp_file_beside
from aether.geo.raster import RasterInfo

H3_RESOLUTIONS = range(0, 16)
MAX_H3_CELLS = 2_000_000  # cells a raster may be cut into: beyond this, a coarser resolution
ZONE_ID = "zone_id"  # the id column when the zones file names none
GEOMETRY = "geometry"


@dataclass
class Zones:
    """Zones as the raster sees them: ids, polygons in their own CRS (what the output keeps) and in
    the raster's CRS (what pixels are weighed against)."""

    ids: np.ndarray
    id_column: str
    geometry: np.ndarray  # shapely polygons, in `crs`
    crs: CRS
    in_raster_crs: np.ndarray  # the same polygons in the raster's CRS
    attributes: object = None  # the file's other columns (a pandas DataFrame), where read from a file

    def __len__(self) -> int:
        return len(self.ids)


def read_zones(path: str | Path, info: RasterInfo, id_column: str | None = None) -> Zones:
    """The polygons of a zones file (GeoPackage, GeoJSON, GeoParquet, Shapefile, ...) and their ids
    (`id_column`, or the row number): refused in one line when the file cannot be read, has no CRS,
    no polygons, an id column it lacks, or ids that repeat."""
    import geopandas

    path = Path(path)
    if not path.exists():
        raise AetherError(f"zones file {path} does not exist")
    try:
        frame = geopandas.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else None
        if frame is None:
            frame = geopandas.read_file(path)
    except Exception as exc:  # pyogrio and pyarrow each raise their own types
        raise AetherError(f"cannot read zones file {path}: {first_line(exc)}") from None
    if len(frame) == 0:
        raise AetherError(f"zones file {path} holds no features")
    if frame.crs is None:
        raise AetherError(f"zones file {path} has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)")
    if id_column is not None and id_column not in frame.columns:
        raise AetherError(f"zones file {path} has no column {id_column!r}; it has {_columns(frame)}")
    geometry = frame.geometry.to_numpy()
    kinds = set(shapely.get_type_id(geometry[~shapely.is_missing(geometry)]).tolist())
    polygonal = {shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON}
    if not kinds & polygonal:
        raise AetherError(f"zones file {path} holds no polygons (zones are areas; points have no pixels)")
    keep = np.isin(shapely.get_type_id(geometry), list(polygonal)) & ~shapely.is_empty(geometry)
    if not keep.all():
        raise AetherError(
            f"zones file {path}: {int((~keep).sum())} of {len(frame)} features are not polygons or are "
            f"empty (e.g. row {int(np.flatnonzero(~keep)[0])}); keep only polygons"
        )
    ids = frame[id_column].to_numpy() if id_column is not None else np.arange(len(frame))
    if id_column is not None:
        if frame[id_column].isna().any():
            raise AetherError(f"zones file {path}: column {id_column!r} has empty ids")
        repeated = frame[id_column][frame[id_column].duplicated()]
        if len(repeated):
            raise AetherError(
                f"zones file {path}: id {repeated.iloc[0]!r} of column {id_column!r} repeats; ids must be unique"
            )
    # self-touching rings, bow ties: their area as drawn, polygons only (no collapsed lines)
    geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
    in_raster = frame.set_geometry(geometry).to_crs(info.crs).geometry.to_numpy()
    attributes = frame.drop(columns=frame.geometry.name).reset_index(drop=True)
    return Zones(ids, id_column or ZONE_ID, geometry, CRS.from_user_input(frame.crs), in_raster, attributes)


def h3_zones(info: RasterInfo, resolution: int) -> Zones:
    """The H3 cells of `resolution` whose centres lie on the raster (h3's own cells and boundaries,
    EPSG:4326), ids as H3 strings."""
    import geopandas
    import h3
    from rasterio.warp import transform_geom

    if resolution not in H3_RESOLUTIONS:
        raise AetherError(f"--h3 must be an H3 resolution from 0 to 15, got {resolution}")
    raster_box = shapely.box(*info.bounds)
    outline = shapely.segmentize(raster_box, max(raster_box.length / 400, 1e-9))  # edges follow the projection
    outline = shapely.geometry.shape(transform_geom(info.crs, "EPSG:4326", outline.__geo_interface__, precision=-1))
    west, south, east, north = outline.bounds
    km_per_degree = 111.32 * np.cos(np.radians((south + north) / 2))
    area_km2 = (east - west) * km_per_degree * (north - south) * 110.57
    expected = area_km2 / h3.average_hexagon_area(resolution, unit="km^2")
    if expected > MAX_H3_CELLS:
        raise AetherError(
            f"--h3 {resolution} cuts this raster into about {expected:,.0f} cells (at most {MAX_H3_CELLS:,}); "
            f"choose a coarser resolution"
        )
    shape = h3.geo_to_h3shape(outline.__geo_interface__)
    cells = sorted(h3.h3shape_to_cells(shape, resolution))
    if not cells:
        raise AetherError(f"no H3 cell of resolution {resolution} has its centre on the raster; choose a finer one")
    polygons = np.array([shapely.Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(c)]) for c in cells])
    crs = CRS.from_epsg(4326)
    in_raster = geopandas.GeoSeries(polygons, crs=crs).to_crs(info.crs).to_numpy()
    return Zones(np.array(cells), "h3", polygons, crs, in_raster)


def _columns(frame) -> str:
    names = [str(c) for c in frame.columns if c != frame.geometry.name]
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "no columns"


class GeoParquetRows:
    """A GeoParquet file (version 1.1, WKB geometry) written a batch of rows at a time, into a
    temporary file beside `out` that replaces it only when `close` is reached: memory holds one batch,
    never the whole table, and a run that fails leaves no output."""

    def __init__(self, out: Path, id_column: str, id_type: pa.DataType, feature_columns: list[str], crs: CRS):
        self.out = Path(out)
        self.feature_columns = feature_columns
        fields = [pa.field(id_column, id_type), pa.field(GEOMETRY, pa.binary())]
        fields += [pa.field(name, pa.float64()) for name in feature_columns]
        geo = {
            "version": "1.1.0",
            "primary_column": GEOMETRY,
            "columns": {
                GEOMETRY: {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"], "crs": crs.to_json_dict()}
            },
        }
        self.schema = pa.schema(fields, metadata={b"geo": json.dumps(geo).encode()})
        fd, self.tmp = temp_file_beside(self.out, ".partial.parquet")
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.rows = 0

    def write(self, ids: np.ndarray, geometry: np.ndarray, features: np.ndarray) -> None:
        """Rows of `ids`, their polygons and (rows, len(feature_columns)) feature values."""
        columns = [pa.array(ids, type=self.schema.field(0).type), pa.array(shapely.to_wkb(geometry), pa.binary())]
        columns += [pa.array(features[:, i], pa.float64()) for i in range(features.shape[1])]
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.rows += len(ids)

    def close(self) -> None:
        """Finish the file and put it in place."""
        self.writer.close()
        Path(self.tmp).replace(self.out)

    def discard(self) -> None:
        """Leave nothing behind (a run that failed)."""
        try:
            self.writer.close()
        finally:
            Path(self.tmp).unlink(missing_ok=True)


def arrow_id_type(ids: np.ndarray) -> pa.DataType:
    """The Arrow type of a zones file's ids (integers stay integers; anything else is text)."""
    if np.issubdtype(ids.dtype, np.integer):
        return pa.int64()
    return pa.string()
