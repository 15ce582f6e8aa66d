"""`aether fetch-pois`: the POIs of a box (or of a file's extent) from Overture Maps Places or from
OpenStreetMap's Overpass API, as the POI file training takes (GeoPackage, GeoJSON or GeoParquet),
with the source, release and attribution recorded in it. What was fetched is cached, so the same
command continues an interrupted run; nothing is written unless every part arrived."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from aether.core.errors import AetherError
from aether.core.files import atomic_write, atomic_write_text, check_output_file, temp_file_beside
from aether.data.fetch.area import bbox_of_file, check_bbox
from aether.data.fetch.index import cache_dir
from aether.data.osm import OSM_LICENSE, POI_KEYS, check_osm_template, pois_from_frame, write_poi_geojson
from aether.data.places import overpass, overture
from aether.data.poi import OSM_ATTRIBUTION
from aether.geo.raster import metres_per_degree
from aether.text.templates import DEFAULT_TEMPLATE, check_fields, render_description

logger = logging.getLogger(__name__)

SOURCES = ("overture", "osm")
SUFFIXES = (".gpkg", ".geojson", ".parquet")
MAX_BOX_KM2 = 2500.0  # a box larger than this (50 km x 50 km) is refused: split it
DEFAULT_MIN_CONFIDENCE = 0.5


@dataclass
class PoiRequest:
    """What `aether fetch-pois` was asked."""

    out: str
    source: str
    bbox: tuple[float, float, float, float] | None = None
    like: str | None = None
    release: str = overture.RELEASE
    template: str | None = None
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    overture_root: str = overture.ROOT
    overpass_url: str = overpass.URL


def box_km(box: tuple[float, float, float, float]) -> tuple[float, float]:
    """The box's width and height in km (width at its widest latitude)."""
    west, south, east, north = box
    m_lat, m_lon = metres_per_degree(np.array(min(abs(south), abs(north)) if south * north > 0 else 0.0))
    return (east - west) * float(m_lon) / 1000, (north - south) * float(m_lat) / 1000


def check_size(box: tuple[float, float, float, float]) -> None:
    """Refuse a box over MAX_BOX_KM2, saying how to split it."""
    width, height = box_km(box)
    if width * height <= MAX_BOX_KM2:
        return
    n = math.ceil(width * height / MAX_BOX_KM2)
    cols = math.ceil(math.sqrt(n * width / height))
    rows = math.ceil(n / cols)
    west, south, east, north = box
    step_x, step_y = (east - west) / cols, (north - south) / rows
    first = (west, south, west + step_x, south + step_y)
    raise AetherError(
        f"the box is {width:.0f} x {height:.0f} km ({width * height:,.0f} km²); fetch-pois takes at most "
        f"{MAX_BOX_KM2:,.0f} km² at a time: split it into {cols} x {rows} boxes of {step_x:.4f}° x {step_y:.4f}° "
        f"(the first: --bbox {' '.join(f'{v:.4f}' for v in first)}) and train on the files together"
    )


def check_template(template: str, source: str) -> None:
    if source == "osm":
        check_osm_template(template)
        return
    check_fields(template, overture.FIELDS, "Overture places")


def fetch_pois(req: PoiRequest, progress: bool = True) -> tuple[Path, int, dict]:
    """Fetch, filter, describe and write the POIs; returns the output, its number of POIs and what was read."""
    if req.source not in SOURCES:
        raise AetherError(f"--source {req.source!r}: choose overture or osm")
    out = Path(req.out)
    check_output_file(
        out, {req.like: "the --like file"} if req.like else None, example="pois.gpkg", suffixes=SUFFIXES,
        fix="choose another --out",
    )  # fmt: skip
    if not 0.0 <= req.min_confidence <= 1.0:
        raise AetherError(f"--min-confidence {req.min_confidence:g} is not in [0, 1]")
    template = req.template or (overture.TEMPLATE if req.source == "overture" else DEFAULT_TEMPLATE)
    check_template(template, req.source)
    box = check_bbox(req.bbox) if req.bbox is not None else bbox_of_file(req.like, margin_m=0.0)
    check_size(box)
    where = " ".join(f"{v:.5f}" for v in box)
    if req.source == "overture":
        source = overture.PlacesSource(req.release, req.overture_root)
        places, read = overture.fetch_places(box, source, overture_cache(req), progress)
        pois = overture_pois(places, template, req.min_confidence)
        meta = {
            "source": "Overture Maps Places",
            "release": req.release,
            "attribution": overture.ATTRIBUTION,
            "license": overture.LICENSE,
        }
        what = f"Overture release {req.release}"
    else:
        elements, cells = overpass.fetch_elements(box, req.overpass_url, cache_dir() / "overpass", progress)
        pois = pois_from_frame(overpass.elements_frame(elements), template)
        read = {"cells": cells, "elements": len(elements)}
        meta = {"source": f"OpenStreetMap via Overpass ({req.overpass_url})", "attribution": OSM_ATTRIBUTION,
                "license": OSM_LICENSE}  # fmt: skip
        what = f"OpenStreetMap (named {'/'.join(POI_KEYS)} objects)"
    meta["bbox"] = list(box)
    if len(pois) == 0:
        raise AetherError(f"no POIs in the box {where} from {what}; nothing written (a larger box?)")
    write_pois(pois, out, meta, osm=req.source == "osm")
    return out, len(pois), read


def overture_cache(req: PoiRequest) -> Path:
    """The cache of a release's footers and row groups, one per place the release is read from."""
    where = req.overture_root.rstrip("/") + (
        os.environ.get("AWS_ENDPOINT_URL", "") if req.overture_root.startswith("s3://") else ""
    )
    root = hashlib.sha256(where.encode()).hexdigest()[:12]
    return cache_dir() / "overture" / root / req.release


def overture_pois(places: pd.DataFrame, template: str, min_confidence: float) -> gpd.GeoDataFrame:
    """Named places with a category and at least `min_confidence`, described by `template`, one per
    Overture id (sorted by it); lists become ';'-joined text (GeoPackage has no list columns)."""
    confidence = overture.confidence_of(places["confidence"])
    keep = places["name"].notna() & places["category"].notna() & (np.nan_to_num(confidence, nan=0.0) >= min_confidence)
    kept = places[keep.to_numpy()].drop_duplicates("id").sort_values("id", kind="stable")
    rows = []
    for rec in kept.to_dict("records"):
        alternates = ";".join(rec["alternates"])
        fields = {
            "name": rec["name"],
            "category": overture.words(rec["category"]),
            "alternates": ", ".join(overture.words(a) for a in rec["alternates"]),
            "confidence": rec["confidence"],
        }
        rows.append(
            {
                "id": rec["id"],
                "name": rec["name"],
                "category": rec["category"],
                "alternates": alternates,
                "confidence": float(rec["confidence"]) if rec["confidence"] is not None else None,
                "sources": ";".join(rec["sources"]),
                "description": render_description(template, fields),
            }
        )
    points = gpd.points_from_xy(kept["lon"], kept["lat"])
    pois = gpd.GeoDataFrame(rows, columns=list(overture.COLUMNS), geometry=points, crs="EPSG:4326")
    return pois[pois["description"].notna()].reset_index(drop=True)  # a template field the place lacks


def write_pois(pois: gpd.GeoDataFrame, out: Path, meta: dict, osm: bool) -> None:
    """Write the POIs atomically with `meta` (source, release, attribution, licence, box): in
    GeoJSON as top-level members (OSM POIs exactly as `aether make-pois` writes them), in a
    GeoPackage as the layer's metadata, in GeoParquet as the file's key-value metadata "aether"."""
    suffix = out.suffix.lower()
    if suffix == ".geojson":
        if osm:
            write_poi_geojson(pois, out)  # make-pois' own file: header with attribution and licence
            return
        frame = json.loads(pois.to_json(drop_id=True))
        atomic_write_text(out, json.dumps({"type": "FeatureCollection", **meta, "features": frame["features"]},
                                          ensure_ascii=False))  # fmt: skip
        return
    fd, tmp = temp_file_beside(out, suffix)
    os.close(fd)
    try:
        if suffix == ".gpkg":
            tmp.unlink()
            pois.to_file(tmp, driver="GPKG", layer="pois", metadata={k: json.dumps(v) if not isinstance(v, str) else v
                                                                    for k, v in meta.items()})  # fmt: skip
            os.replace(tmp, out)
        else:
            pois.to_parquet(tmp)
            table = pq.read_table(tmp)
            extra = {b"aether": json.dumps(meta, ensure_ascii=False).encode()}
            with atomic_write(out) as handle:
                pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}), handle)
    finally:
        tmp.unlink(missing_ok=True)
