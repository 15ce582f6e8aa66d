"""Points of interest: reading POI files, building their text descriptions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aether.core.errors import AetherError, first_line
from aether.text.templates import DEFAULT_TEMPLATE, render_description, template_fields

if TYPE_CHECKING:
    import geopandas

OSM_ATTRIBUTION = "© OpenStreetMap contributors, ODbL 1.0"


@dataclass
class PoiTable:
    """POIs ready for pooling: ids, texts, and coordinates in the raster's CRS and in lon/lat."""

    ids: np.ndarray
    texts: list[str]
    x: np.ndarray
    y: np.ndarray
    lon: np.ndarray
    lat: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, keep: np.ndarray) -> PoiTable:
        return PoiTable(
            self.ids[keep],
            [t for t, k in zip(self.texts, keep) if k],
            self.x[keep],
            self.y[keep],
            self.lon[keep],
            self.lat[keep],
        )


def _check_degrees(path: str, lon: np.ndarray, lat: np.ndarray, lon_column: str, lat_column: str) -> None:
    """CSV coordinates are read as degrees (EPSG:4326) unless data.poi_crs says otherwise: refuse,
    in one line, columns that cannot be degrees (metres of a projected CRS, say), before any
    transform turns them into infinities and warnings; a few such rows are made NaN in place, so
    they are dropped (and counted) as invalid coordinates."""
    finite = np.isfinite(lon) & np.isfinite(lat)
    outside = finite & ((np.abs(lon) > 180) | (np.abs(lat) > 90))
    if outside.any() and not outside[finite].all():  # a few bad rows: dropped as invalid coordinates, counted
        lon[outside] = lat[outside] = np.nan
    elif outside.any():
        raise AetherError(
            f"POI file {path}: {int(outside.sum())} of {len(lon)} rows have {lon_column}/{lat_column} "
            f"outside degrees (e.g. {lon[outside][0]:g}, {lat[outside][0]:g}); if they are metres or "
            f"another CRS's units, set data.poi_crs (e.g. EPSG:32635)"
        )


def read_poi_frame(
    path: str, lon_column: str = "lon", lat_column: str = "lat", crs: str | None = None
) -> geopandas.GeoDataFrame:
    """Read GeoJSON, GeoPackage, GeoParquet, Shapefile or CSV (lon/lat columns) as a GeoDataFrame."""
    import geopandas
    import pandas

    suffix = Path(path).suffix.lower()
    if crs is not None:
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            CRS.from_user_input(crs)
        except CRSError:
            raise AetherError(f"config data.poi_crs: {crs!r} is not a CRS (e.g. EPSG:4326)") from None
    if not Path(path).exists():
        raise AetherError(f"POI file {path} does not exist")
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            frame = pandas.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8")
            missing = [c for c in (lon_column, lat_column) if c not in frame.columns]
            if missing:
                raise AetherError(
                    f"POI file {path} has no column {missing[0]!r}; set data.lon_column / data.lat_column"
                )
            lon = pandas.to_numeric(frame[lon_column], errors="coerce").to_numpy(dtype=np.float64, copy=True)
            lat = pandas.to_numeric(frame[lat_column], errors="coerce").to_numpy(dtype=np.float64, copy=True)
            if crs is None:
                _check_degrees(path, lon, lat, lon_column, lat_column)
            frame = geopandas.GeoDataFrame(frame, geometry=geopandas.points_from_xy(lon, lat), crs=crs or "EPSG:4326")
        elif suffix in (".parquet", ".geoparquet"):
            frame = geopandas.read_parquet(path)
        else:
            frame = geopandas.read_file(path)
    except AetherError:
        raise
    except UnicodeDecodeError:
        raise AetherError(f"POI file {path} is not UTF-8 text; convert it (e.g. iconv -t UTF-8)") from None
    except Exception as exc:  # pyogrio, pyarrow and pandas each raise their own types
        raise AetherError(f"cannot read POI file {path}: {first_line(exc)}") from None
    if crs is not None and suffix not in (".csv", ".tsv", ".txt"):
        frame = frame.set_crs(crs, allow_override=True)  # the file's own CRS is overridden
    if frame.crs is None:
        raise AetherError(f"POI file {path} has no CRS; set data.poi_crs (e.g. EPSG:4326)")
    return frame


def prepare_pois(
    frame,
    raster_crs,
    template: str = DEFAULT_TEMPLATE,
    description_column: str = "description",
    id_column: str = "osm_id",
    source: str = "POI file",
) -> tuple[PoiTable, dict[str, int]]:
    """Texts and coordinates for every usable row, and the count dropped for each reason.

    A row is dropped when it has no text (no description and not all template
    fields), or no, empty or invalid geometry. Lines and polygons become a
    representative point.
    """
    from pyproj import Transformer

    n = len(frame)
    if n == 0:
        raise AetherError(f"{source} has no rows")
    has_desc = description_column in frame.columns
    fields = template_fields(template)
    if not has_desc and not all(f in frame.columns for f in fields):
        missing = [f for f in fields if f not in frame.columns]
        raise AetherError(
            f"{source} has neither a {description_column!r} column nor the template's "
            f"columns {missing}; set data.description_column or data.template"
        )
    if id_column in frame.columns:
        ids = frame[id_column].astype(str).to_numpy()
        dup = frame[id_column][frame[id_column].duplicated()]
        if len(dup):
            raise AetherError(
                f"{source} has duplicate ids in column {id_column!r} (e.g. {dup.iloc[0]!r}); ids must be unique"
            )
    else:
        ids = np.array([str(i) for i in range(n)])

    texts: list[str | None] = []
    records = frame.drop(columns=frame.geometry.name).to_dict("records")
    for rec in records:
        text = rec.get(description_column) if has_desc else None
        if not isinstance(text, str) or not text.strip():
            text = render_description(template, rec) if all(f in rec for f in fields) else None
        texts.append(text.strip() if text else None)

    geom = frame.geometry
    missing_geom = geom.isna().to_numpy() | geom.is_empty.to_numpy()
    points = geom.where(~missing_geom)
    not_point = ~missing_geom & (points.geom_type != "Point").to_numpy()
    coords = np.full((n, 2), np.nan)
    ok = ~missing_geom
    valid_geom = np.zeros(n, dtype=bool)
    valid_geom[ok] = geom[ok].is_valid.to_numpy()
    reps = geom.copy()
    reps[ok & not_point & valid_geom] = geom[ok & not_point & valid_geom].representative_point()
    usable = ok & valid_geom
    coords[usable, 0] = reps[usable].x.to_numpy()
    coords[usable, 1] = reps[usable].y.to_numpy()
    finite = np.isfinite(coords).all(axis=1)

    reasons = {
        "no text (no description and not all template fields)": np.array([t is None for t in texts]),
        "no geometry": missing_geom,
        "invalid geometry or coordinates": ~missing_geom & ~(valid_geom & finite),
    }
    drop = np.zeros(n, dtype=bool)
    dropped: dict[str, int] = {}
    for reason, mask in reasons.items():
        mask = mask & ~drop
        if mask.any():
            dropped[reason] = int(mask.sum())
        drop |= mask
    keep = ~drop
    to_raster = Transformer.from_crs(frame.crs, raster_crs, always_xy=True)
    to_lonlat = Transformer.from_crs(frame.crs, "EPSG:4326", always_xy=True)
    x, y = to_raster.transform(coords[keep, 0], coords[keep, 1])
    lon, lat = to_lonlat.transform(coords[keep, 0], coords[keep, 1])
    table = PoiTable(
        ids[keep], [t for t, k in zip(texts, keep) if k], np.asarray(x), np.asarray(y), np.asarray(lon), np.asarray(lat)
    )
    return table, dropped
