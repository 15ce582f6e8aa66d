"""Per-zone features: an embedding raster's vectors (AlphaEarth, or AETHER written by inference),
or AETHER computed on the fly from AlphaEarth with a checkpoint (pooled and projected as inference
does, never written), averaged per zone by `aether.geo.zonal` and streamed into GeoParquet.

Tiles are read and projected one at a time (a few in flight): memory holds the tiles and the zones
they meet, not the raster, and one batch of finished zones, not every zone.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from tqdm.auto import tqdm

from aether.core.errors import AetherError
from aether.core.pipeline import read_ahead
from aether.geo.alphaearth import band_names
from aether.geo.gdal import streaming_cache
from aether.geo.raster import RasterInfo, decode_pixels, invalid_pixels, open_raster, read_vectors
from aether.geo.zonal import STATS, ZonalSums, ZoneSums, statistic_names
from aether.geo.zones import GeoParquetRows, Zones, arrow_id_type
from aether.infer.reader import PooledTileReader, Tile, _latent_tile, tile_grid
from aether.model.architectures import untrained_model
from aether.model.checkpoint import Checkpoint
from aether.model.embed import check_raster
from aether.model.projector import Projector

logger = logging.getLogger(__name__)

TILE_PX = 512  # a tile's pooled float32 vectors: 64 MiB for AlphaEarth, 128 MiB per AETHER set
ROWS_PER_BATCH = 4096  # finished zones written to the output at a time
ALPHAEARTH = "alphaearth"  # the feature set of AlphaEarth's own pixels


@dataclass(frozen=True)
class ZonalOptions:
    """What `aether zonal` computes: `stats` of each zone (STATS), from tiles of `tile_px` pixels."""

    stats: tuple[str, ...] = STATS
    tile_px: int = TILE_PX

    def check(self) -> ZonalOptions:
        unknown = [s for s in self.stats if s not in STATS]
        if unknown or not self.stats:
            raise AetherError(f"--stats takes a comma-separated list of {', '.join(STATS)}; got {','.join(self.stats)}")
        if len(set(self.stats)) != len(self.stats):
            raise AetherError(f"--stats names a statistic twice: {','.join(self.stats)}")
        if not 64 <= self.tile_px <= 4096:
            raise AetherError(f"--tile must be from 64 to 4096 pixels, got {self.tile_px}")
        return self


class StoredVectors:
    """The vectors stored in an embedding raster (AlphaEarth int8 de-quantized, AETHER int16
    scaled, float as it is; nodata and implausible values invalid), tile by tile."""

    def __init__(self, info: RasterInfo, name: str = "raster"):
        self.info, self.names = info, [name]
        self.bands = {name: info.count}
        self.band_names = {name: _band_names_of(info)}

    def tiles(self, tiles: list[Tile]) -> Iterator[tuple[Tile, dict]]:
        local, handles = threading.local(), []

        def read(tile: Tile):
            src = getattr(local, "src", None)
            if src is None:
                src = local.src = rasterio.open(self.info.path)
                handles.append(src)
            vectors, valid = read_vectors(src, Window(tile.col0, tile.row0, tile.width, tile.height), self.info)
            return {self.names[0]: (vectors.reshape(-1, self.info.count), valid.reshape(-1))}

        try:
            yield from read_ahead(tiles, read, readers=2)
        finally:
            for src in handles:
                src.close()


class ProjectedVectors:
    """AlphaEarth's own pixels and AETHER vectors computed from them on the fly, tile by tile:
    each projector's vectors are those inference would write (base-window pooling, float32)."""

    def __init__(self, info: RasterInfo, projectors: dict[str, Projector], with_alphaearth: bool = False):
        first = next(iter(projectors.values()))
        for projector in projectors.values():
            check_raster(projector, info)
        self.info, self.projectors = info, projectors
        self.reader = PooledTileReader(info, first, "window")
        self.names = ([ALPHAEARTH] if with_alphaearth else []) + list(projectors)
        latent = {name: p.latent_dim for name, p in projectors.items()}
        self.bands = {**({ALPHAEARTH: info.count} if with_alphaearth else {}), **latent}
        self.band_names = {name: band_names(d, "E", digits=3) for name, d in latent.items()}
        if with_alphaearth:
            self.band_names[ALPHAEARTH] = band_names(info.count)

    def tiles(self, tiles: list[Tile]) -> Iterator[tuple[Tile, dict]]:
        for tile, data in self.reader.produce(tiles, readers=2):
            _, _, means, valid = next(self.reader.pooled(data))
            flat_valid = valid.reshape(-1)
            features = {
                name: (_latent_tile(p, means, valid, band_major=False).numpy(), flat_valid)
                for name, p in self.projectors.items()
            }
            if ALPHAEARTH in self.names:
                bands, _, _, hx, hy = data
                pixels = bands[:, hy : hy + tile.height, hx : hx + tile.width].transpose(1, 2, 0)
                invalid = invalid_pixels(pixels, self.info)
                vectors = decode_pixels(pixels, invalid, self.info).reshape(-1, self.info.count)
                features[ALPHAEARTH] = (vectors, ~invalid.reshape(-1))
            yield tile, features
        self.reader.report_implausible()


def _band_names_of(info: RasterInfo) -> list[str]:
    """The raster's band descriptions where it has them all (A00.., E000..), else b1, b2, ..."""
    with rasterio.open(info.path) as src:
        names = list(src.descriptions)
    if all(names) and len(set(names)) == len(names):
        return names
    return [f"b{i + 1}" for i in range(info.count)]


def zone_sums(source, zones: Zones, tile_px: int = TILE_PX, progress: bool = True) -> Iterator[dict[str, ZoneSums]]:
    """Every zone's sums (once each, in the order zones are finished) for the feature sets of
    `source` (`StoredVectors` or `ProjectedVectors`)."""
    tiles = tile_grid(source.info, tile_px)
    sums = ZonalSums(source.info, zones.in_raster_crs, tiles, source.names)
    yield from sums.unmet(source.bands)
    met = [t for t in tiles if len(sums.met_by(t))]  # tiles no zone meets are not read
    total = sum(t.width * t.height for t in met)
    with streaming_cache(), tqdm(total=total, unit="px", unit_scale=True, disable=not progress, desc="zones") as bar:
        for tile, features in source.tiles(met):
            yield from sums.add(tile, features)
            bar.update(tile.width * tile.height)


def write_zonal(
    source, zones: Zones, out: Path, options: ZonalOptions, progress: bool = True, name: str | None = None
) -> dict:
    """Write the per-zone statistics of one feature set of `source` (its first by default) to the
    GeoParquet file `out`: the zones' id and polygon (in their own CRS), one column per band and
    statistic, `count` (valid pixels, weighted by the fraction of each the zone covers) and
    `coverage` (that count over the zone's area in pixels). Returns a summary."""
    options.check()
    name = name or source.names[0]
    columns = statistic_names(source.band_names[name], options.stats)
    rows = GeoParquetRows(out, zones.id_column, arrow_id_type(zones.ids), columns, zones.crs)
    batch: list[ZoneSums] = []
    summary = {"zones": len(zones), "with_pixels": 0, "off_raster": 0}

    def flush() -> None:
        index = np.array([s.index for s in batch])
        rows.write(zones.ids[index], zones.geometry[index], np.stack([s.statistics(options.stats) for s in batch]))
        batch.clear()

    try:
        for finished in zone_sums(source, zones, options.tile_px, progress):
            sums = finished[name]
            summary["with_pixels" if sums.count > 0 else "off_raster"] += 1
            batch.append(sums)
            if len(batch) >= ROWS_PER_BATCH:
                flush()
        if batch:
            flush()
        rows.close()
    except BaseException:
        rows.discard()
        raise
    summary["columns"] = len(columns)
    return summary


def projected_source(
    ae_tif: str, ckpt: str | Path | Checkpoint, with_untrained: bool = False, with_alphaearth: bool = False
) -> ProjectedVectors:
    """AETHER on the fly from `ae_tif` with `ckpt` (feature set "aether"), and if asked an untrained
    pair of the same shape ("untrained", training's own initialisation) and AlphaEarth's pixels."""
    projector = Projector(ckpt, device="cpu", precision="fp32")
    projectors = {"aether": projector}
    if with_untrained:
        c = projector.checkpoint
        model = untrained_model(c.n_bands, c.text.dim, c.config, c.config.train.seed)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        projectors["untrained"] = Projector(dataclasses.replace(c, weights=weights, path=None), "cpu", "fp32")
    return ProjectedVectors(open_raster(ae_tif, projector.n_bands), projectors, with_alphaearth)
