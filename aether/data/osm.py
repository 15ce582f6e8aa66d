"""OpenStreetMap extracts: named points of interest as the POI file training reads.

pyrosm is imported only inside `extract_pois`, so reading and writing POI files
works without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import pandas as pd

from aether.core.errors import AetherError, first_line, install_hint
from aether.core.files import atomic_write_text
from aether.data.poi import DEFAULT_TEMPLATE, OSM_ATTRIBUTION, render_description
from aether.text.templates import check_fields

POI_KEYS = ("amenity", "shop", "tourism", "leisure", "office", "craft", "historic")
POI_COLUMNS = ("osm_id", "name", "key", "value", "description")
OSM_LICENSE = "ODbL-1.0"
COORD_DECIMALS = 7


def _text(v) -> str | None:
    """A tag value as stripped text, or None when missing or blank."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    s = str(v).strip()
    return s or None


def check_osm_template(template: str) -> None:
    """Refuse a description template that OSM POIs cannot fill."""
    check_fields(template, ("name", "key", "value"), "OSM POIs")


def pois_from_frame(frame: pd.DataFrame, template: str = DEFAULT_TEMPLATE) -> gpd.GeoDataFrame:
    """Turn OSM elements (pyrosm's layout) into the POI table, sorted by osm_id.

    `frame` needs columns id, osm_type, name, geometry (lon/lat) and any of POI_KEYS.
    The first key of POI_KEYS with a value gives key/value; rows without a name or
    without any of the keys are dropped; lines and polygons become their
    representative point.
    """
    check_osm_template(template)
    keys = [k for k in POI_KEYS if k in frame.columns]
    rows, points = [], []
    for rec, geom in zip(frame.to_dict("records"), frame.geometry):
        name = _text(rec.get("name"))
        key = next((k for k in keys if _text(rec.get(k))), None)
        if name is None or key is None or geom is None or geom.is_empty:
            continue
        value = _text(rec[key])
        rows.append(
            {
                "osm_id": f"{rec['osm_type']}/{int(rec['id'])}",
                "name": name,
                "key": key,
                "value": value,
                "description": render_description(template, {"name": name, "key": key, "value": value}),
            }
        )
        points.append(geom if geom.geom_type == "Point" else geom.representative_point())
    gdf = gpd.GeoDataFrame(rows, columns=list(POI_COLUMNS), geometry=points, crs="EPSG:4326")
    gdf = gdf.sort_values("osm_id", kind="stable").drop_duplicates("osm_id")
    return gdf.reset_index(drop=True)


def extract_pois(pbf_path: str | os.PathLike, template: str = DEFAULT_TEMPLATE) -> gpd.GeoDataFrame:
    """Named POIs (nodes, ways, relations) of an .osm.pbf extract, in EPSG:4326."""
    if not Path(pbf_path).is_file():
        raise AetherError(
            f"OSM extract {pbf_path} not found; pass the path of an .osm.pbf file (extracts of any "
            f"region: download.geofabrik.de, or BBBike for a city)"
        )
    try:
        import pyrosm
    except ImportError as e:
        raise AetherError(f"reading .osm.pbf extracts needs pyrosm: {install_hint('osm')}") from e
    check_osm_template(template)  # before the (slow) parse
    try:
        elements = pyrosm.OSM(str(pbf_path)).get_pois(custom_filter={k: True for k in POI_KEYS})
    except Exception as exc:  # pyrosm raises several types for a damaged or foreign file
        raise AetherError(f"cannot read OSM extract {pbf_path}: {first_line(exc) or type(exc).__name__}") from None
    if elements is None or len(elements) == 0:
        return pois_from_frame(pd.DataFrame(columns=["id", "osm_type", "name", "geometry"]), template)
    return pois_from_frame(elements, template)


def _feature(osm_id, name, key, value, description, point) -> dict:
    return {
        "type": "Feature",
        "properties": {"osm_id": osm_id, "name": name, "key": key, "value": value, "description": description},
        "geometry": {"type": "Point", "coordinates": [round(point.x, COORD_DECIMALS), round(point.y, COORD_DECIMALS)]},
    }


def write_poi_geojson(gdf: gpd.GeoDataFrame, path: str | os.PathLike) -> Path:
    """Write POIs as a GeoJSON FeatureCollection with OSM attribution, atomically.

    The output is byte-identical for the same input (fixed member order, rounded
    coordinates, one feature per line).
    """
    missing = [c for c in POI_COLUMNS if c not in gdf.columns]
    if missing:
        raise AetherError(f"POI table lacks columns {missing}; build it with aether.data.osm.extract_pois")
    if gdf.crs is not None and not gdf.crs.equals("EPSG:4326"):
        gdf = gdf.to_crs("EPSG:4326")
    if not gdf.geometry.geom_type.eq("Point").all():
        raise AetherError("POI geometries must be points; use representative_point() first")
    features = [
        json.dumps(_feature(*vals, point), ensure_ascii=False)
        for *vals, point in zip(*(gdf[c].map(_text) for c in POI_COLUMNS), gdf.geometry)
    ]
    header = {"type": "FeatureCollection", "attribution": OSM_ATTRIBUTION, "license": OSM_LICENSE}
    head = json.dumps(header, ensure_ascii=False).removesuffix("}")
    text = head + ', "features": [\n' + ",\n".join(features) + "\n]}\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return Path(path)
