"""The training set: POIs pooled on the AlphaEarth raster, their text embeddings, and a spatial split."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from aether.config.schema import Config
from aether.core.errors import AetherError
from aether.data.poi import PoiTable, prepare_pois, read_poi_frame
from aether.geo.alphaearth import MAX_ABS_VALUE
from aether.geo.pooling import pool_at_scale
from aether.geo.raster import RasterInfo, metres_per_degree, open_raster
from aether.geo.tiles import expand_tiles
from aether.text.cache import EmbeddingCache, encode_texts_on_cluster, encode_texts_sharded
from aether.text.encoders import TextEncoder, build_text_encoder

logger = logging.getLogger(__name__)


@dataclass
class PoiDataset:
    """Row-aligned arrays, one row per usable POI."""

    pois: PoiTable
    base: np.ndarray  # (N, bands) float32, unit length
    aug: np.ndarray  # (N, bands) float32, unit length
    text: np.ndarray  # (N, text_dim) float32
    is_val: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.pois)


def spatial_blocks(lon: np.ndarray, lat: np.ndarray, block_m: float) -> tuple[int, np.ndarray]:
    """The square blocks of side `block_m` (on a local metric grid: metres per degree at the mean
    latitude) that hold the points: how many, and each point's block number."""
    m_lat, m_lon = metres_per_degree(np.asarray(np.mean(lat)))
    bx = np.floor(np.asarray(lon) * m_lon / block_m).astype(np.int64)
    by = np.floor(np.asarray(lat) * m_lat / block_m).astype(np.int64)
    blocks, block_of = np.unique(np.stack([bx, by], axis=1), axis=0, return_inverse=True)
    return len(blocks), block_of.reshape(-1)


def spatial_split(lon: np.ndarray, lat: np.ndarray, block_m: float, val_fraction: float, seed: int) -> np.ndarray:
    """Validation mask made of whole square blocks of side `block_m`, so neighbours do not leak.

    Blocks are laid on a local metric grid (metres per degree at the mean latitude),
    shuffled with `seed`, and taken until at least `val_fraction` of the points are in
    validation (none when it is 0). The same inputs always give the same split.
    """
    n = len(lon)
    if n < 2 or val_fraction <= 0:
        return np.zeros(n, dtype=bool)
    n_blocks, block_of = spatial_blocks(lon, lat, block_m)
    order = np.random.default_rng(seed).permutation(n_blocks)
    sizes = np.bincount(block_of, minlength=n_blocks)
    target = max(1, int(round(val_fraction * n)))
    chosen, total = [], 0
    for b in order:
        if total >= target:
            break
        if total + sizes[b] >= n:  # never put every point in validation
            continue
        chosen.append(b)
        total += sizes[b]
    return np.isin(block_of, chosen)


def extents(lon: np.ndarray, lat: np.ndarray, infos: list[RasterInfo]) -> str:
    """Where the points and the rasters lie, in degrees: what a message about points off the raster shows."""
    from rasterio.warp import transform_bounds

    def box(w, s, e, n) -> str:
        return f"lon {w:.4f} to {e:.4f}, lat {s:.4f} to {n:.4f}"

    rasters = []
    for info in infos[:3]:
        rasters.append(box(*transform_bounds(info.crs, "EPSG:4326", *info.bounds, densify_pts=21)))
    points = box(np.nanmin(lon), np.nanmin(lat), np.nanmax(lon), np.nanmax(lat)) if len(lon) else "none"
    more = f" and {len(infos) - 3} more" if len(infos) > 3 else ""
    return f"the POIs lie at {points}; the raster{'s' if len(infos) > 1 else ''} at {'; '.join(rasters)}{more}"


def build_dataset(
    cfg: Config,
    encoder: TextEncoder | None = None,
    progress: bool = True,
    client=None,
    min_train_pois: int = 0,
    with_text: bool = True,
) -> tuple[PoiDataset, RasterInfo, TextEncoder | None]:
    """Read, clean, pool and encode the POIs that `cfg` names; report what was dropped and why.

    data.ae_tif may name a set of tiles (aether.geo.tiles); each POI is pooled from one of them. With a
    Dask `client`, pooling and the encoding of texts not yet cached run as tasks on its workers.
    The RasterInfo returned is the first tile's. Fewer than `min_train_pois` POIs on the training
    side of the split is refused before any text is encoded (so nothing is cached in vain).
    `with_text` False leaves the descriptions unencoded (the text array has no columns, and no
    encoder is built): the AlphaEarth side alone, offline whatever the checkpoint's encoder.
    """
    if not with_text:
        encoder = None
    elif encoder is None:
        encoder = build_text_encoder(
            cfg.text.backend,
            cfg.text.model,
            cfg.text.dimensions,
            cfg.text.base_url,
            cfg.text.device,
            max_retries=cfg.text.max_retries,
            request_timeout_s=cfg.text.request_timeout_s,
        )
    if encoder is not None:
        encoder.check()
    tiles = expand_tiles(cfg.data.ae_tif, "AlphaEarth tile")
    infos = [open_raster(path, cfg.data.n_bands) for path in tiles]
    for tile in infos:  # before any pooling or text encoding: the views' windows must fit in memory
        tile.check_window(cfg.data.aug_radius_m, fix="set a smaller data.aug_radius_m (and data.base_radius_m)")
    info = infos[0]
    frame = read_poi_frame(cfg.data.poi, cfg.data.lon_column, cfg.data.lat_column, cfg.data.poi_crs)
    pois, dropped = prepare_pois(
        frame,
        info.crs,
        cfg.data.template,
        cfg.data.description_column,
        cfg.data.id_column,
        source=f"POI file {cfg.data.poi}",
    )
    pooled = pool_at_scale(
        infos,
        pois.lon,
        pois.lat,
        [cfg.data.base_radius_m, cfg.data.aug_radius_m],
        client,
        xy=(pois.x, pois.y),
        progress=progress,
    )
    if pooled.implausible:
        logger.info(
            f"raster {cfg.data.ae_tif}: {pooled.implausible:,} pixels read hold values no AlphaEarth vector has "
            f"(beyond +-{MAX_ABS_VALUE:g}, or infinite); they count as nodata"
        )
    outside = ~pooled.inside
    if outside.any():
        where = "outside the raster" if len(infos) == 1 else f"outside all {len(infos)} tiles"
        dropped[f"{where} ({extents(pois.lon[outside], pois.lat[outside], infos)})"] = int(outside.sum())
    nodata = pooled.inside & ~pooled.valid
    if nodata.any():
        dropped["window all nodata"] = int(nodata.sum())
    logger.info(f"POIs: {len(frame)} read, {int(pooled.valid.sum())} usable")
    for reason, count in dropped.items():
        logger.info(f"dropped {count} POIs: {reason}")
    keep = pooled.valid
    if keep.sum() == 0:
        raise AetherError(
            f"no usable POIs: none of {len(frame)} in {cfg.data.poi} has text and a valid window "
            f"on raster {cfg.data.ae_tif} ({extents(pois.lon, pois.lat, infos)}; swapped longitude "
            f"and latitude, or another CRS?)"
        )
    pois = pois.subset(keep)
    is_val = spatial_split(pois.lon, pois.lat, cfg.data.val_block_m, cfg.data.val_fraction, cfg.train.seed)
    n_train = int((~is_val).sum())
    if n_train < min_train_pois:
        raise AetherError(
            f"only {n_train} training POIs; contrastive training needs at least {min_train_pois}"
            + (" (one for each process)" if min_train_pois > 2 else "")
        )
    base, aug = pooled.views[0][keep], pooled.views[1][keep]
    if encoder is None:
        return PoiDataset(pois, base, aug, np.zeros((len(pois), 0), np.float32), is_val), info, None
    cache = EmbeddingCache(cfg.text.cache_dir)
    try:
        if client is not None:
            text, n_encoded = encode_texts_on_cluster(client, encoder, pois.texts, cache, cfg.text.batch_size, progress)
        else:
            text, n_encoded = encode_texts_sharded(encoder, pois.texts, cache, cfg.text.batch_size, progress)
    finally:
        cache.close()
    n_unique = len(set(pois.texts))
    if n_encoded == 0:
        logger.info(
            f"text: all {n_unique} unique descriptions came from the cache ({cfg.text.cache_dir}); nothing encoded"
        )
    else:
        logger.info(f"text: encoded {n_encoded} of {n_unique} unique descriptions with {encoder.identity['model']}")
    return PoiDataset(pois, base, aug, text, is_val), info, encoder
