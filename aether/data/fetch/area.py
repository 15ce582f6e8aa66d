"""Where to fetch: a bounding box in degrees, checked, or the extent of a POI file or raster grown by a margin."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio

from aether.core.errors import AetherError, first_line
from aether.data.poi import read_poi_frame
from aether.geo.raster import metres_per_degree

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")


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
            raise AetherError(
                f"--bbox {name} {lat:g} is not a latitude (-90 to 90); give west south east north in degrees"
            )
    for name, lon in (("west", west), ("east", east)):
        if not -180 <= lon <= 180:
            raise AetherError(
                f"--bbox {name} {lon:g} is not a longitude (-180 to 180); give west south east north in degrees"
            )
    if west >= east:
        raise AetherError(
            f"--bbox west {west:g} is not west of east {east:g}; give west south east north (an area "
            f"across the antimeridian is fetched as two boxes)"
        )
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
        frame = read_poi_frame(path).to_crs("EPSG:4326")
        frame = frame[~(frame.geometry.is_empty | frame.geometry.isna())]
        if not len(frame):
            raise AetherError(f"--like file {path} has no geometries")
        west, south, east, north = (float(v) for v in frame.total_bounds)
    edge_lat = min(max(abs(south), abs(north)), 89.0)  # longitude degrees are shortest at the pole-ward edge
    m_lat, m_lon = metres_per_degree(np.array(edge_lat))
    dlat, dlon = margin_m / float(m_lat), margin_m / float(m_lon)
    return (max(west - dlon, -180.0), max(south - dlat, -90.0), min(east + dlon, 180.0), min(north + dlat, 90.0))
