"""A miniature Overture Maps Places release with the real GeoParquet schema, served from an
S3-compatible server on 127.0.0.1 (moto) the way Overture's public bucket serves it.

Three files, each a band of longitude near Helsinki, sorted by latitude so that every row group
covers a narrow strip (as Overture's spatially sorted files do) and its bbox statistics are tight.
Some places have no name, a blank one, no category or a low confidence; one place is in two files;
and four places lie exactly on the edges of `EDGE_BOX`, each the outermost point of its row group
with a float32 bbox that rounds to the inside of the box (as a float64 -> float32 cast does), so a
reader trusting the statistics to the last bit would skip the row group that holds it.
`write_release` writes the `categories` schema; `taxonomy=True` the newer one that has only
`taxonomy` and `basic_category`."""

from __future__ import annotations

import io
import json
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

BUCKET = "overture-mini"
PREFIX = "release"
RELEASE = "2026-09-23.1"
TAXONOMY_RELEASE = "2026-10-22.0"
N_FILES = 3
ROWS_PER_FILE = 480
ROWS_PER_GROUP = 80
WEST_DEG, BAND_DEG = 24.90, 0.05  # file f holds longitudes [WEST + f * BAND, WEST + (f + 1) * BAND]
SOUTH_DEG, NORTH_DEG = 60.15, 60.19
CATEGORIES = ("coffee_shop", "restaurant", "park", "bank", "clothing_store", "bookstore")
DATASETS = ("meta", "Foursquare", "AllThePlaces", "Microsoft")

BBOX = pa.struct([("xmin", pa.float32()), ("xmax", pa.float32()), ("ymin", pa.float32()), ("ymax", pa.float32())])
SOURCE = pa.struct(
    [
        ("property", pa.string()),
        ("dataset", pa.string()),
        ("record_id", pa.string()),
        ("update_time", pa.string()),
        ("confidence", pa.float64()),
        ("between", pa.list_(pa.float64())),
    ]
)
RULE = pa.struct(
    [
        ("variant", pa.string()),
        ("language", pa.string()),
        ("value", pa.string()),
        ("between", pa.list_(pa.float64())),
        ("side", pa.string()),
    ]
)
NAMES = pa.struct([("primary", pa.string()), ("common", pa.map_(pa.string(), pa.string())), ("rules", pa.list_(RULE))])
ADDRESS = pa.struct(
    [
        ("freeform", pa.string()),
        ("locality", pa.string()),
        ("postcode", pa.string()),
        ("region", pa.string()),
        ("country", pa.string()),
    ]
)
BRAND = pa.struct([("wikidata", pa.string()), ("names", NAMES)])
COMMON = [
    ("id", pa.string()),
    ("geometry", pa.binary()),
    ("bbox", BBOX),
    ("version", pa.int32()),
    ("sources", pa.list_(SOURCE)),
    ("names", NAMES),
]
REST = [
    ("confidence", pa.float64()),
    ("websites", pa.list_(pa.string())),
    ("socials", pa.list_(pa.string())),
    ("emails", pa.list_(pa.string())),
    ("phones", pa.list_(pa.string())),
    ("brand", BRAND),
    ("addresses", pa.list_(ADDRESS)),
    ("operating_status", pa.string()),
]
CATEGORIES_SCHEMA = pa.schema(
    [*COMMON, ("categories", pa.struct([("primary", pa.string()), ("alternate", pa.list_(pa.string()))])), *REST]
)
TAXONOMY = pa.struct(
    [("primary", pa.string()), ("hierarchy", pa.list_(pa.string())), ("alternates", pa.list_(pa.string()))]
)
TAXONOMY_SCHEMA = pa.schema([*COMMON, ("taxonomy", TAXONOMY), ("basic_category", pa.string()), *REST])


@dataclass
class Place:
    """What a place is, before it is written in either schema."""

    id: str
    lon: float
    lat: float
    name: str | None
    category: str | None
    alternates: list[str]
    confidence: float | None
    datasets: list[str] = field(default_factory=list)


def float32_below(value: float) -> float:
    """A float64 just above a float32, so that casting it to float32 rounds it down."""
    f = np.float32(value)
    return float(f) + 0.25 * float(np.spacing(f))


def float32_above(value: float) -> float:
    """A float64 just below a float32, so that casting it to float32 rounds it up."""
    f = np.float32(value)
    return float(f) - 0.25 * float(np.spacing(f))


def make_places(seed: int = 7) -> tuple[list[list[Place]], tuple[float, float, float, float]]:
    """The places of each file (in file order) and the box whose edges four of them lie on."""
    rng = np.random.default_rng(seed)
    files = []
    for f in range(N_FILES):
        west = WEST_DEG + f * BAND_DEG
        lon = rng.uniform(west + 1e-4, west + BAND_DEG - 1e-4, ROWS_PER_FILE)
        lat = np.sort(rng.uniform(SOUTH_DEG, NORTH_DEG, ROWS_PER_FILE))
        places = []
        for i in range(ROWS_PER_FILE):
            k = f * ROWS_PER_FILE + i
            name = None if k % 9 == 0 else ("   " if k % 23 == 0 else f"{('Käpylän', 'Kallio', 'Töölö')[f]} {k}")
            category = None if k % 13 == 0 else CATEGORIES[k % len(CATEGORIES)]
            alternates = [CATEGORIES[(k + j) % len(CATEGORIES)] for j in range(1, k % 3 + 1)]
            confidence = None if k == 17 else (0.5 if k % 50 == 0 else round(float(rng.uniform()), 6))
            datasets = [DATASETS[k % 4], DATASETS[(k + 1) % 4], DATASETS[k % 4]][: 1 + k % 3]
            places.append(Place(f"08f{k:013x}", float(lon[i]), float(lat[i]), name, category, alternates, confidence,
                                datasets))  # fmt: skip
        files.append(places)

    twin = Place("08f0000000000fffe", WEST_DEG + BAND_DEG, 60.161, "Kahvila Raja", "coffee_shop", ["bakery"], 0.8,
                 ["meta"])  # fmt: skip
    for places in files[:2]:  # the same place in two files, on the longitude they share
        places.append(twin)
        places.sort(key=lambda p: p.lat)

    def on_edge(place: Place, **coords: float) -> None:
        place.__dict__.update(coords, name=f"Edge {place.id[-4:]}", category="park", confidence=0.9)

    middle = files[1]
    south_place = middle[ROWS_PER_GROUP - 1]  # the northmost of file 1's group 0
    north_place = middle[ROWS_PER_GROUP * 5]  # the southmost of file 1's group 5
    on_edge(south_place, lat=float32_below(south_place.lat))
    on_edge(north_place, lat=float32_above(north_place.lat))
    west_group = files[0][ROWS_PER_GROUP * 3 : ROWS_PER_GROUP * 4]  # file 0's group 3: its eastmost place but the twin
    west_place = max((p for p in west_group if p is not twin), key=lambda p: p.lon)
    on_edge(west_place, lon=float32_below(west_place.lon))
    east_group = files[2][ROWS_PER_GROUP * 3 : ROWS_PER_GROUP * 4]  # file 2's group 3: its westmost place
    east_place = min((p for p in east_group if p is not twin), key=lambda p: p.lon)
    on_edge(east_place, lon=float32_above(east_place.lon))
    box = (west_place.lon, south_place.lat, east_place.lon, north_place.lat)
    for places in files:
        places.sort(key=lambda p: p.lat)
    groups = [(0, 3, west_place, "lon", max), (1, 0, south_place, "lat", max), (1, 5, north_place, "lat", min),
              (2, 3, east_place, "lon", min)]  # fmt: skip
    for f, g, place, axis, extreme in groups:
        group = files[f][ROWS_PER_GROUP * g : ROWS_PER_GROUP * (g + 1)]
        assert extreme(group, key=lambda p: getattr(p, axis)) is place, "an edge place should be its group's outermost"
    assert all(box[1] <= p.lat <= box[3] for p in (west_place, east_place)), "the edge places should be in the box"

    return files, box


def row(place: Place, taxonomy: bool) -> dict:
    """A place as a row of the release's schema."""
    point = shapely.Point(place.lon, place.lat)
    x, y = np.float32(place.lon), np.float32(place.lat)
    out = {
        "id": place.id,
        "geometry": shapely.to_wkb(point),
        "bbox": {"xmin": float(x), "xmax": float(x), "ymin": float(y), "ymax": float(y)},
        "version": 1,
        "sources": [
            {
                "property": "",
                "dataset": d,
                "record_id": f"{d}-{place.id}",
                "update_time": "2026-08-01T00:00:00Z",
                "confidence": place.confidence,
                "between": None,
            }
            for d in place.datasets
        ],  # fmt: skip
        "names": {"primary": place.name, "common": [("fi", place.name)] if place.name else None, "rules": None},
        "confidence": place.confidence,
        "websites": ["https://example.org"] if place.name else None,
        "socials": None,
        "emails": None,
        "phones": ["+358 9 000 000"],
        "brand": None,
        "addresses": [
            {"freeform": "Katu 1", "locality": "Helsinki", "postcode": "00100", "region": None, "country": "FI"}
        ],  # fmt: skip
        "operating_status": "open",
    }
    if taxonomy:
        out["taxonomy"] = (
            {"primary": place.category, "hierarchy": ["root", place.category], "alternates": place.alternates}
            if place.category
            else None
        )
        out["basic_category"] = place.category
    else:
        out["categories"] = {"primary": place.category, "alternate": place.alternates} if place.category else None
    return out


def geo_metadata(table: pa.Table) -> bytes:
    """GeoParquet 1.1 metadata with the bbox covering, as Overture writes it."""
    bbox = table.column("bbox").combine_chunks()
    extent = [float(pa.compute.min(bbox.field(n)).as_py()) for n in ("xmin", "ymin")]
    extent += [float(pa.compute.max(bbox.field(n)).as_py()) for n in ("xmax", "ymax")]
    covering = {"bbox": {n: ["bbox", n] for n in ("xmin", "ymin", "xmax", "ymax")}}
    column = {"encoding": "WKB", "geometry_types": ["Point"], "bbox": extent, "covering": covering}
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()


def release_files(files: list[list[Place]], taxonomy: bool = False) -> dict[str, bytes]:
    """The release's Parquet files, by name, as bytes."""
    schema = TAXONOMY_SCHEMA if taxonomy else CATEGORIES_SCHEMA
    out = {}
    for f, places in enumerate(files):
        table = pa.Table.from_pylist([row(p, taxonomy) for p in places], schema=schema)
        table = table.replace_schema_metadata({b"geo": geo_metadata(table)})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=ROWS_PER_GROUP, compression="zstd")
        out[f"part-{f:05d}-0a1b2c3d.zstd.parquet"] = buffer.getvalue()
    return out


def release_key(release: str, name: str) -> str:
    return f"{PREFIX}/{release}/theme=places/type=place/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(releases: dict[str, dict[str, bytes]], port: int | None = None):
    """A moto S3 server on 127.0.0.1 with `releases` ({release: {name: bytes}}) in BUCKET under
    PREFIX, readable anonymously (public-read objects, as Overture's bucket is); yields its URL.
    werkzeug's line per request is kept out of the tests' log. `port`: the port of an earlier
    server, to come back at the same address (the cache is kept per endpoint)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    quiet = logging.getLogger("werkzeug")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-west-2", aws_access_key_id="test",
                              aws_secret_access_key="test")  # fmt: skip
        if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:  # moto's servers share one store
            client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        for release, parts in releases.items():
            for name, body in parts.items():
                client.put_object(Bucket=BUCKET, Key=release_key(release, name), Body=body, ACL="public-read")
        yield url
    finally:
        server.stop()
        quiet.setLevel(level)
