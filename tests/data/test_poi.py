import geopandas
import numpy as np
import pytest
from pyproj import Transformer
from shapely.geometry import Point, Polygon

from aether.core.errors import AetherError
from aether.data.poi import DEFAULT_TEMPLATE, prepare_pois, read_poi_frame, render_description
from tests.helpers.fixtures import UTM, poi_records, write_csv, write_geojson


def test_render_description():
    assert (
        render_description(DEFAULT_TEMPLATE, {"key": "amenity", "value": "fast_food", "name": "Hesburger"})
        == "A place of fast food, a type of amenity, named Hesburger."
    )
    assert render_description(DEFAULT_TEMPLATE, {"key": "amenity", "value": "cafe", "name": "  "}) is None
    assert render_description(DEFAULT_TEMPLATE, {"key": "amenity", "value": float("nan"), "name": "x"}) is None


@pytest.mark.parametrize("fmt", ["geojson", "gpkg", "parquet", "shp", "csv"])
def test_every_format_gives_the_same_points(tmp_path, fmt):
    records = poi_records(12, 30, 30)
    frame = geopandas.GeoDataFrame(
        [{k: v for k, v in r.items() if k not in ("lon", "lat")} for r in records],
        geometry=[Point(r["lon"], r["lat"]) for r in records],
        crs="EPSG:4326",
    )
    path = tmp_path / f"pois.{fmt}"
    if fmt == "csv":
        write_csv(path, records)
    elif fmt == "parquet":
        frame.to_crs(3067).to_parquet(path)  # another CRS: reprojected on reading
    elif fmt == "shp":
        frame.rename(columns={"description": "descriptio"}).to_file(path)  # shapefiles cut names at 10
    else:
        frame.to_file(path)
    table, dropped = prepare_pois(
        read_poi_frame(str(path)), UTM, description_column="descriptio" if fmt == "shp" else "description"
    )
    assert dropped == {}
    x, y = Transformer.from_crs("EPSG:4326", UTM, always_xy=True).transform(
        [r["lon"] for r in records], [r["lat"] for r in records]
    )
    np.testing.assert_allclose(table.x, x, atol=1e-3)
    np.testing.assert_allclose(table.y, y, atol=1e-3)
    assert table.texts == [r["description"] for r in records]
    assert list(table.ids) == [r["osm_id"] for r in records]


def test_rows_dropped_with_reasons(tmp_path):
    square = Polygon([(24.93, 60.17), (24.931, 60.17), (24.931, 60.171), (24.93, 60.171)])
    bowtie = Polygon([(24.93, 60.17), (24.931, 60.171), (24.931, 60.17), (24.93, 60.171)])
    frame = geopandas.GeoDataFrame(
        {
            "osm_id": ["a", "b", "c", "d", "e", "f"],
            "name": ["Cafe A", None, "C", "D", "E", "F"],
            "key": ["amenity"] * 6,
            "value": ["cafe"] * 6,
            "description": [None, "", None, None, None, "Own text"],
        },
        geometry=[Point(24.93, 60.17), Point(24.93, 60.17), None, bowtie, square, Point(float("nan"), 60.17)],
        crs="EPSG:4326",
    )
    table, dropped = prepare_pois(frame, UTM)
    assert list(table.ids) == ["a", "e"]
    assert table.texts[0] == "A place of cafe, a type of amenity, named Cafe A."  # template fallback
    assert dropped == {
        "no text (no description and not all template fields)": 1,
        "no geometry": 1,
        "invalid geometry or coordinates": 2,
    }
    # a polygon became a point inside it
    px, py = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(table.x[1], table.y[1])
    assert square.contains(Point(px, py))


def test_bad_poi_files(tmp_path):
    records = poi_records(3, 10, 10)
    with pytest.raises(AetherError, match="does not exist"):
        read_poi_frame(str(tmp_path / "missing.geojson"))
    with pytest.raises(AetherError, match="no column 'lon'"):
        read_poi_frame(str(write_csv(tmp_path / "p.csv", [{"x": 1, "y": 2}])))
    frame = read_poi_frame(str(write_geojson(tmp_path / "p.geojson", records)))
    with pytest.raises(AetherError, match="neither a 'text' column nor the template's columns"):
        prepare_pois(frame.drop(columns=["name"]), UTM, description_column="text")
    frame.loc[1, "osm_id"] = frame.loc[0, "osm_id"]
    with pytest.raises(AetherError, match="duplicate ids"):
        prepare_pois(frame, UTM)
    (tmp_path / "latin.csv").write_bytes("lon,lat,description\n24.9,60.1,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(AetherError, match="not UTF-8"):
        read_poi_frame(str(tmp_path / "latin.csv"))
