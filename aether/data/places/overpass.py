"""OpenStreetMap POIs for a box from the Overpass API: the named objects with the keys `aether
make-pois` keeps, asked cell by cell (each answer cached, so an interrupted run continues), turned
into elements as pyrosm gives them and then into POIs by the very function `make-pois` uses
(`aether.data.osm.pois_from_frame`): one place gives the same POIs as from a .pbf extract."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import urllib.error
import urllib.parse
from pathlib import Path

import geopandas as gpd
import shapely
from tqdm.auto import tqdm

from aether.core.errors import AetherError
from aether.core.files import atomic_write_text
from aether.core.http import Unreachable, request
from aether.data.osm import POI_KEYS

logger = logging.getLogger(__name__)

URL = "https://overpass-api.de/api/interpreter"  # the main public instance; --overpass-url for another
CELL_DEG = 0.1  # the box is asked in cells of at most this many degrees a side (each cached)
QUERY_TIMEOUT_S = 120  # the server's own limit for one cell ([timeout:...])
TRIES = 3  # per cell, on a busy server (429, 502-504) or a lost connection
RETRY_WAIT_S = 5.0  # doubled after each try


def cells(box: tuple[float, float, float, float], size: float | None = None) -> list[tuple[float, float, float, float]]:
    """The box cut into a grid of cells of at most `size` (default CELL_DEG) degrees a side, row by row."""
    size = size or CELL_DEG
    west, south, east, north = box
    nx, ny = max(1, math.ceil((east - west) / size - 1e-9)), max(1, math.ceil((north - south) / size - 1e-9))
    xs = [west + (east - west) * i / nx for i in range(nx + 1)]
    ys = [south + (north - south) * j / ny for j in range(ny + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def query(cell: tuple[float, float, float, float], keys=POI_KEYS) -> str:
    """Overpass QL for the named nodes, ways and relations with any of `keys` in `cell`, with their
    geometry (ways' and relations' member ways' coordinates)."""
    west, south, east, north = cell
    clauses = "".join(f'nwr["name"]["{key}"];' for key in keys)
    box = f"{south:.7f},{west:.7f},{north:.7f},{east:.7f}"
    return f"[out:json][timeout:{QUERY_TIMEOUT_S}][bbox:{box}];({clauses});out geom;"


def ask(url: str, text: str, cache: Path) -> list[dict]:
    """The elements Overpass at `url` answers to `text`, from the cache or asked (with retries) and cached."""
    key = hashlib.sha256(f"{url}\n{text}".encode()).hexdigest()[:24]
    saved = cache / f"{key}.json"
    if saved.exists():
        try:
            return json.loads(saved.read_text())["elements"]
        except (ValueError, KeyError):
            saved.unlink()
    target = f"{url}?{urllib.parse.urlencode({'data': text})}"
    wait = RETRY_WAIT_S
    for attempt in range(1, TRIES + 1):
        try:
            with request(target, headers={"User-Agent": "aether fetch-pois"}, limit_s=QUERY_TIMEOUT_S + 30) as answer:
                body = b"".join(answer.chunks())
            break
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code not in (429, 502, 503, 504) or attempt == TRIES:
                raise AetherError(f"Overpass at {url} answered HTTP {exc.code} ({exc.reason})") from None
        except AetherError as exc:  # unreachable (refused, no such host): at once; too slow or cut off: again
            if attempt == TRIES or isinstance(exc, Unreachable):
                raise type(exc)(str(exc).replace(target, url)) from None  # named without the long query
        logger.info(f"Overpass at {url} is busy or slow; trying again in {wait:g} s ({attempt}/{TRIES})")
        time.sleep(wait)
        wait *= 2
    try:
        answer = json.loads(body)
        elements = answer["elements"]
    except (ValueError, KeyError, TypeError):
        raise AetherError(f"Overpass at {url} did not answer Overpass JSON (an HTML error page?)") from None
    remark = answer.get("remark") if isinstance(answer, dict) else None
    if remark and "error" in str(remark).lower():  # Overpass reports a timeout or memory limit here
        raise AetherError(f"Overpass at {url}: {str(remark).strip()[:200]}; use a smaller --bbox")
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps({"elements": elements}))
    return elements


RAILWAY_AREAS = {"platform", "station", "turntable", "roundhouse", "traverser", "wash"}
HIGHWAY_AREAS = {"platform", "rest_area", "services"}
WATERWAY_AREAS = {"riverbank", "dock", "boatyard", "dam", "fuel"}


def is_line_relation(tags: dict) -> bool:
    """Whether pyrosm makes a relation with `tags` a line (a route, a barrier, a street...) rather
    than an area: its rule, so that both give a relation the same POI position."""
    if tags.get("type") in ("multipolygon", "boundary"):
        return False
    if tags.get("area") == "no" or "barrier" in tags or "route" in tags:
        return True
    if tags.get("railway", "platform") not in RAILWAY_AREAS:
        return True
    highway = tags.get("highway")
    if highway == "pedestrian" and "area" in tags:
        return tags["area"] != "yes"
    if highway not in (None, "pedestrian", *HIGHWAY_AREAS):
        return True
    return tags.get("waterway", "dam") not in WATERWAY_AREAS


def area(lines: list[shapely.LineString]):
    """The area the member ways `lines` enclose, as pyrosm assembles a multipolygon: the ways joined
    into rings, and a point inside when an odd number of rings covers it (outers, holes, islands in
    holes, whatever the roles say); None when the ways close no ring."""
    rings = []
    for line in shapely.get_parts(shapely.line_merge(shapely.MultiLineString(lines))):
        coords = shapely.get_coordinates(line)
        if len(coords) >= 4 and (coords[0] == coords[-1]).all():
            ring = shapely.Polygon(coords)
            rings.append(ring if ring.is_valid else ring.buffer(0))
    while len(rings) > 1:  # even-odd overlay, in pairs as pyrosm takes them
        rings = [shapely.symmetric_difference(*rings[i : i + 2]) if i + 1 < len(rings) else rings[i]
                 for i in range(0, len(rings), 2)]  # fmt: skip
    parts = shapely.get_parts(shapely.get_parts(rings[0])) if rings else []  # a collection may hold multipolygons
    polygons = [p for p in parts if p.geom_type == "Polygon"]  # not the lines where rings touch
    if not polygons:
        return None
    shape = polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)
    return shape if shape.is_valid else shape.buffer(0)


def geometry(element: dict):
    """An element's shape as pyrosm builds it from the same data: a node's point; a way's polygon
    when it is closed (every POI key makes an area) unless tagged area=no, else its line; a
    relation's area (see `area`), or the joined lines of its member ways for a route and the like."""
    tags = element.get("tags") or {}
    if element["type"] == "node":
        return shapely.Point(element["lon"], element["lat"])
    if element["type"] == "way":
        coords = [(p["lon"], p["lat"]) for p in element.get("geometry") or [] if p]
        if len(coords) >= 4 and coords[0] == coords[-1] and tags.get("area") != "no":
            return shapely.Polygon(coords)
        return shapely.LineString(coords) if len(coords) >= 2 else None
    lines = [
        shapely.LineString(coords)
        for m in element.get("members") or []
        if m.get("type") == "way" and len(coords := [(p["lon"], p["lat"]) for p in m.get("geometry") or [] if p]) >= 2
    ]
    if not lines:
        return None
    return shapely.line_merge(shapely.MultiLineString(lines)) if is_line_relation(tags) else area(lines)


def elements_frame(elements: list[dict]) -> gpd.GeoDataFrame:
    """Overpass elements as pyrosm's POI frame: id, osm_type, name, each of POI_KEYS, geometry;
    an element in several cells is kept once."""
    rows, shapes, seen = [], [], set()
    for element in elements:
        ident = (element["type"], int(element["id"]))
        if ident in seen:
            continue
        seen.add(ident)
        tags = element.get("tags") or {}
        keys = {k: tags.get(k) for k in POI_KEYS}
        rows.append({"id": ident[1], "osm_type": ident[0], "name": tags.get("name"), **keys})
        shapes.append(geometry(element))
    return gpd.GeoDataFrame(rows, columns=["id", "osm_type", "name", *POI_KEYS], geometry=shapes, crs="EPSG:4326")


def fetch_elements(
    box: tuple[float, float, float, float], url: str, cache: Path, progress: bool = True
) -> tuple[list[dict], int]:
    """Every element of the box, asked cell by cell, and the number of cells."""
    grid = cells(box)
    elements = []
    for cell in tqdm(grid, desc="Overpass cells", unit="cell", disable=not progress):
        elements += ask(url, query(cell), cache)
    return elements, len(grid)
