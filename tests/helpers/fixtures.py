"""Small generated inputs for the tests: AlphaEarth-like rasters and POI files (a few KB each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, from_origin

from aether.geo.alphaearth import N_BANDS, NODATA_INT8, band_names, dequantize, quantize

UTM = "EPSG:32635"
ORIGIN = (385000.0, 6673000.0)  # central Helsinki, UTM zone 35N
CATEGORIES = [("amenity", "cafe"), ("amenity", "restaurant"), ("shop", "books"), ("leisure", "park")]


def unit_field(height: int, width: int, bands: int = N_BANDS, seed: int = 0, smooth: int = 4) -> np.ndarray:
    """(bands, h, w) unit vectors that vary smoothly in space, like AlphaEarth."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((bands, height // smooth + 2, width // smooth + 2))
    rows = np.arange(height) // smooth
    cols = np.arange(width) // smooth
    field = coarse[:, rows][:, :, cols] + 0.3 * rng.standard_normal((bands, height, width))
    return (field / np.linalg.norm(field, axis=0, keepdims=True)).astype(np.float32)


def write_raster(
    path: Path,
    values: np.ndarray,
    *,
    dtype: str = "int8",
    crs: str | None = UTM,
    transform: Affine | None = None,
    nodata=None,
    bottom_up: bool = False,
    block: int | None = None,
) -> Path:
    """Write (bands, h, w) float vectors as an int8 (AlphaEarth encoding) or float GeoTIFF.

    NaN pixels become nodata. `bottom_up` stores rows south-first with a positive y
    pixel size, as some mirrors do.
    """
    bands, height, width = values.shape
    transform = transform or from_origin(ORIGIN[0], ORIGIN[1], 10.0, 10.0)
    invalid = np.isnan(values).any(axis=0)
    if dtype == "int8":
        data = quantize(np.nan_to_num(values), valid=~invalid)
        nodata = -128
    else:
        data = values.astype(dtype)
        if nodata is not None:
            data[:, invalid] = nodata
    if bottom_up:
        data = data[:, ::-1, :]
        transform = transform @ Affine.translation(0, height) @ Affine.scale(1, -1)
    profile = dict(
        driver="GTiff", width=width, height=height, count=bands, dtype=dtype, transform=transform, nodata=nodata
    )
    if crs is not None:
        profile["crs"] = crs
    if block:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if bands == N_BANDS:
            for i, name in enumerate(band_names(bands), start=1):
                dst.set_band_description(i, name)
    return path


def poi_records(n: int, height: int, width: int, seed: int = 0, margin_px: int = 2) -> list[dict]:
    """Points inside a UTM raster at ORIGIN with 10 m pixels, with names and categories."""
    from pyproj import Transformer

    rng = np.random.default_rng(seed)
    to_lonlat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    out = []
    for i in range(n):
        x = ORIGIN[0] + 10.0 * rng.uniform(margin_px, width - margin_px)
        y = ORIGIN[1] - 10.0 * rng.uniform(margin_px, height - margin_px)
        lon, lat = to_lonlat.transform(x, y)
        key, value = CATEGORIES[i % len(CATEGORIES)]
        out.append(
            {
                "osm_id": f"node/{i}",
                "name": f"Place {i}",
                "key": key,
                "value": value,
                "description": f"A place of {value}, a type of {key}, named Place {i}.",
                "lon": lon,
                "lat": lat,
            }
        )
    return out


def write_geojson(path: Path, records: list[dict]) -> Path:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
            "properties": {k: v for k, v in r.items() if k not in ("lon", "lat")},
        }
        for r in records
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    import pandas

    pandas.DataFrame(records).to_csv(path, index=False)
    return path


def write_config(path: Path, ae_tif: Path, poi: Path, **sections) -> Path:
    """A small, fast config: tiny model, few epochs, cache and run folder beside it."""
    import yaml

    cfg = {
        "data": {"ae_tif": str(ae_tif), "poi": str(poi), "val_block_m": 100},
        "text": {"cache_dir": str(path.parent / "cache")},
        "model": {"latent_dim": 16, "hidden_dim": 32},
        "train": {"epochs": 3, "batch_size": 16, "run_dir": str(path.parent / "run")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def write_vrt_mosaic(path: Path, parts: list[Path]) -> Path:
    """A VRT mosaic (as gdalbuildvrt writes) of same-grid GeoTIFFs that tile a larger area."""
    with rasterio.open(parts[0]) as first:
        crs, res, count, dtype, nodata = first.crs, first.res, first.count, first.dtypes[0], first.nodata
    bounds = []
    for p in parts:
        with rasterio.open(p) as src:
            bounds.append(src.bounds)
    left, top = min(b.left for b in bounds), max(b.top for b in bounds)
    right, bottom = max(b.right for b in bounds), min(b.bottom for b in bounds)
    width, height = round((right - left) / res[0]), round((top - bottom) / res[1])
    gdal_type = {"int8": "Int8", "float32": "Float32", "float64": "Float64"}[dtype]
    lines = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f"  <SRS>{crs.to_wkt()}</SRS>",
        f"  <GeoTransform>{left}, {res[0]}, 0, {top}, 0, {-res[1]}</GeoTransform>",
    ]
    for band in range(1, count + 1):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata}</NoDataValue>")
        for p, b in zip(parts, bounds):
            w, h = round((b.right - b.left) / res[0]), round((b.top - b.bottom) / res[1])
            x0, y0 = round((b.left - left) / res[0]), round((top - b.top) / res[1])
            lines += [
                "    <SimpleSource>",
                f"      <SourceFilename>{p}</SourceFilename>",
                f"      <SourceBand>{band}</SourceBand>",
                f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
                f'      <DstRect xOff="{x0}" yOff="{y0}" xSize="{w}" ySize="{h}"/>',
                "    </SimpleSource>",
            ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def stored_values(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What a raster file holds, de-quantized, (C, h, w) in file row order, and its invalid mask.

    An independent reading for the tests: plain rasterio and numpy, no AETHER code path.
    """
    with rasterio.open(path) as src:
        raw = src.read()
        nodata = src.nodata
    if raw.dtype == np.int8:
        return dequantize(raw).astype(np.float64), (raw == NODATA_INT8).any(axis=0)
    if raw.dtype == np.int16:  # AETHER's int16 encoding: q / 32767, nodata -32768
        return raw.astype(np.float64) / 32767.0, (raw == -32768).any(axis=0)
    invalid = ~np.isfinite(raw).all(axis=0)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (raw == nodata).any(axis=0)
    return np.nan_to_num(raw.astype(np.float64)), invalid


def brute_force(values: np.ndarray, invalid: np.ndarray, row: int, col: int, ry: int, rx: int):
    """Masked mean of (C, h, w) values over the clipped window, renormalised; None if all nodata."""
    window = (slice(max(row - ry, 0), row + ry + 1), slice(max(col - rx, 0), col + rx + 1))
    ok = ~invalid[window]
    if not ok.any():
        return None
    total = values[:, window[0], window[1]][:, ok].sum(axis=1)
    return total / np.linalg.norm(total)


def write_untrained_checkpoint(
    path: Path,
    latent_dim: int = 16,
    hidden_dim: int = 32,
    text_dim: int = 384,
    seed: int = 0,
    n_bands: int = N_BANDS,
    arch: str = "aether",
) -> Path:
    """A checkpoint of a randomly initialised model (architecture `arch`) whose text side is the
    packaged MiniLM (384-d)."""
    import torch

    from aether.config.schema import Config
    from aether.model.architectures import AetherModel
    from aether.model.checkpoint import Checkpoint, TextSpec

    torch.manual_seed(seed)
    cfg = Config()
    cfg.model.latent_dim, cfg.model.hidden_dim, cfg.data.n_bands, cfg.model.arch = latent_dim, hidden_dim, n_bands, arch
    model = AetherModel.from_config(cfg, n_bands, text_dim)
    text = TextSpec("sentence-transformers", "sentence-transformers/all-MiniLM-L6-v2", None, text_dim)
    Checkpoint.of(model, cfg, text, epoch=1, metrics={}).save(path)
    return path


def run_script_in_process(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """What `python SCRIPT ARGS` does (exit code, stdout, stderr), without a new interpreter: the
    script's `main(argv)`, as the script itself calls it."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_script", root / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("sys.argv", [script, *args])
    capsys.readouterr()
    try:
        module.main(args)
    except SystemExit as exc:
        captured = capsys.readouterr()
        return exc.code, captured.out, captured.err
    captured = capsys.readouterr()
    return 0, captured.out, captured.err


def write_zone_tiles(folder: Path, size: int = 96, seed: int = 0, **kwargs) -> list[Path]:
    """Two AlphaEarth-like tiles on either side of the UTM zone 34/35 seam (24 degrees east) near
    Helsinki's latitude, each in its own zone as Google ships them, overlapping by about 20 pixels."""
    from pyproj import Transformer

    paths = []
    for i, epsg in enumerate((32634, 32635)):
        x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(24.0, 60.17)
        # tile 0 ends 100 m east of the seam, tile 1 starts 100 m west of it: they overlap
        left = round(x / 10) * 10 - (size * 10 - 100 if i == 0 else 100)
        top = round(y / 10) * 10 + size * 5
        paths.append(
            write_raster(
                folder / f"tile_{epsg}.tif",
                unit_field(size, size, seed=seed + i),
                transform=from_origin(left, top, 10.0, 10.0),
                crs=f"EPSG:{epsg}",
                **kwargs,
            )
        )
    return paths
