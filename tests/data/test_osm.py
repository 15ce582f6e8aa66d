"""POI descriptions and the POI GeoJSON file, on a tiny hand-made table (no pyrosm)."""

import json

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import Point, Polygon

from aether.core.errors import AetherError
from aether.data.osm import pois_from_frame, write_poi_geojson
from aether.data.poi import DEFAULT_TEMPLATE, OSM_ATTRIBUTION, render_description


def _elements() -> gpd.GeoDataFrame:
    """Four OSM elements laid out the way pyrosm returns them."""
    square = Polygon([(24.94, 60.17), (24.95, 60.17), (24.95, 60.18), (24.94, 60.18)])
    return gpd.GeoDataFrame(
        {
            "id": [9, 456, 10, 11],
            "osm_type": ["node", "way", "node", "node"],
            "name": ["Kahvila Äijä", " Stockmann ", None, "Nothing tagged"],
            "amenity": [None, None, "cafe", None],
            "shop": ["coffee", "department_store", None, None],
            "tourism": ["attraction", None, None, None],
        },
        geometry=[Point(24.9412345678, 60.1698765432), square, Point(24.9, 60.1), Point(24.9, 60.2)],
        crs="EPSG:4326",
    )


def test_render_description_fills_template_and_rejects_missing_fields():
    fields = {"name": "Kahvila Äijä", "key": "amenity", "value": "fast_food"}
    assert render_description(DEFAULT_TEMPLATE, fields) == (
        "A place of fast food, a type of amenity, named Kahvila Äijä."
    )
    assert render_description(DEFAULT_TEMPLATE, {**fields, "name": "  "}) is None
    assert render_description(DEFAULT_TEMPLATE, {"key": "shop", "value": "books"}) is None


def test_pois_from_frame_keeps_named_elements_with_first_key():
    pois = pois_from_frame(_elements())
    assert list(pois.columns) == ["osm_id", "name", "key", "value", "description", "geometry"]
    assert list(pois.osm_id) == ["node/9", "way/456"]  # unnamed and untagged rows dropped
    assert list(pois.key) == ["shop", "shop"]  # shop comes before tourism
    assert pois.name[1] == "Stockmann"
    assert pois.geometry[1].geom_type == "Point"
    assert pois.geometry[1].within(_elements().geometry[1])
    with pytest.raises(AetherError, match="opening_hours"):
        pois_from_frame(_elements(), "{name} opens {opening_hours}")


def test_write_poi_geojson_round_trips_and_is_stable(tmp_path):
    pois = pois_from_frame(_elements())
    path = tmp_path / "poi" / "pois.geojson"
    write_poi_geojson(pois, path)
    first = path.read_bytes()
    write_poi_geojson(pois, path)
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.rglob("*")] == ["poi", "pois.geojson"]  # no temp files left

    doc = json.loads(first.decode("utf-8"))
    assert doc["attribution"] == OSM_ATTRIBUTION
    assert doc["license"] == "ODbL-1.0"
    assert doc["features"][0]["geometry"]["coordinates"] == [24.9412346, 60.1698765]
    assert "Äijä" in first.decode("utf-8")  # written as UTF-8, not \u escapes

    back = gpd.read_file(path)
    assert back.crs.to_epsg() == 4326
    assert list(back.columns) == ["osm_id", "name", "key", "value", "description", "geometry"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(back.drop(columns="geometry")), pd.DataFrame(pois.drop(columns="geometry"))
    )
