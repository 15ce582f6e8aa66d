"""Scoring a raster against queries: every pixel's AETHER vector (read from an AETHER raster, or
computed on the fly from an AlphaEarth raster exactly as inference does) against each query's,
in one streaming pass per group of queries, writing each query's similarity GeoTIFF (through
`aether.geo.blocks`) and keeping its best pixels."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from aether.core.errors import AetherError
from aether.core.files import raise_if_disk_full, temp_file_beside
from aether.core.pipeline import run_pipeline
from aether.core.runtime import thread_budget
from aether.geo.blocks import BlockFile, create_sparse
from aether.geo.gdal import streaming_cache
from aether.geo.layout import ZSTD_LEVEL
from aether.geo.raster import RasterInfo, open_raster, read_vectors
from aether.infer.pipeline import read_threads
from aether.infer.reader import PooledTileReader, Tile, tile_computer
from aether.model.embed import check_raster
from aether.model.projector import Projector
from aether.retrieval.topk import TopCandidates
from aether.text.encoders import TextEncoder, build_text_encoder

logger = logging.getLogger(__name__)


class Scoring:
    """One raster's pixels (AETHER vectors read, or AlphaEarth vectors embedded on the fly) scored
    against a group of queries in one pass: a similarity GeoTIFF per query, and its best pixels."""

    def __init__(
        self,
        out: Path,
        info: RasterInfo,
        projector: Projector,
        emb_tif: str | None,
        ae_tif: str | None,
        tiles: list[Tile],
        profile: dict,
        first_row: int,
    ):
        self.out, self.info, self.projector, self.tiles, self.profile = out, info, projector, tiles, profile
        self.first_row = first_row
        self.emb_tif, self.source = emb_tif, Path(emb_tif or ae_tif).name
        self.reader = None if emb_tif is not None else PooledTileReader(info, projector, "window")
        self.edge_rx, self.edge_ry = edge_band(info, projector.base_radius_m)

    def _produce_and_latent(self):
        info = self.info
        if self.reader is not None:
            self.reader.implausible = 0  # each pass reads every tile: report one pass's count

            def produce():
                return self.reader.produce(self.tiles, read_threads(self.projector.device))

            if self.projector.device.type == "cpu":
                return produce, self.reader.latent
            block = tile_computer(self.reader)  # pooled and projected on the GPU

            def latent_on_device(data):
                z = torch.from_numpy(block(data, "float32")).reshape(-1, self.projector.latent_dim)
                valid = ~torch.isnan(z[:, 0])
                return torch.nan_to_num(z).T, valid.numpy()

            return produce, latent_on_device

        def produce():
            with rasterio.open(info.path, NUM_THREADS="ALL_CPUS") as src:
                for tile in self.tiles:
                    yield tile, read_vectors(src, Window(tile.col0, tile.row0, tile.width, tile.height), info)

        def latent(data):
            vectors, valid = data
            return torch.from_numpy(vectors.reshape(-1, info.count)).T, valid.reshape(-1)

        return produce, latent

    def run(
        self, queries: list[str], names: list[str], vectors: np.ndarray, keep: int, bar
    ) -> tuple[list[Path], list[TopCandidates]]:
        """Score the queries: their finished similarity maps, as partial GeoTIFFs beside their final
        names (removed if the pass fails), and their candidates."""
        info, first_row = self.info, self.first_row
        q = torch.from_numpy(vectors)
        candidates = [TopCandidates(keep) for _ in queries]
        temps: list[Path] = []
        files: list[BlockFile] = []
        threads = max(1, thread_budget() // 4)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compress")
        try:
            for query, name in zip(queries, names):
                fd, tmp = temp_file_beside(self.out / f"{name}.tif", ".partial.tif")
                os.close(fd)
                temps.append(tmp)
                create_sparse(
                    tmp,
                    self.profile,
                    [f"cosine similarity: {query}"],
                    {
                        "AETHER_QUERY": query,
                        "AETHER_CHECKPOINT_SHA256": self.projector.ckpt_sha256,
                        "AETHER_SOURCE": self.source,
                    },
                )
                files.append(BlockFile(tmp, ZSTD_LEVEL, threads, pool))
            produce, latent = self._produce_and_latent()

            def compute(tile: Tile, data) -> np.ndarray:
                z, valid = latent(data)
                sims = (q @ z).numpy()  # (nq, h * w)
                sims[:, ~valid] = np.nan
                return sims

            def consume(tile: Tile, sims: np.ndarray) -> None:
                rows = tile.row0 + np.repeat(np.arange(tile.height), tile.width)
                cols = tile.col0 + np.tile(np.arange(tile.width), tile.height)
                row0 = info.north_up_rows(tile.row0, tile.height) - first_row
                inner = ~on_edge(rows, cols, info, self.edge_rx, self.edge_ry)
                for i, file in enumerate(files):
                    block = sims[i].reshape(tile.height, tile.width, 1)
                    file.write(block[::-1] if info.bottom_up else block, row0, tile.col0)
                    candidates[i].add(sims[i][inner], rows[inner], cols[inner])
                bar.update(tile.width * tile.height)

            with streaming_cache():
                run_pipeline(produce, compute, consume)
            for file in files:
                file.close()
        except BaseException as exc:
            for file in files:
                file.abandon()
            try:  # while the partial files still take their space, so the message says how full the disk is
                raise_if_disk_full(exc, self.out / f"{names[max(len(temps) - 1, 0)]}.tif")
            finally:
                for tmp in temps:
                    tmp.unlink(missing_ok=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return temps, candidates

    def report_implausible(self) -> None:
        if self.reader is not None:
            self.reader.report_implausible()


def edge_band(info: RasterInfo, radius_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Per raster row, how many pixels from the raster's edge a base window (`radius_m`) is cut
    short: (columns, rows). Zeros where the raster is too small to have pixels with whole windows."""
    rx, ry = info.radius_px_rows(radius_m)
    if info.width <= 2 * rx.max() or info.height <= 2 * ry.max():
        return np.zeros(info.height, np.int64), np.zeros(info.height, np.int64)
    return rx, ry


def on_edge(rows: np.ndarray, cols: np.ndarray, info: RasterInfo, rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pixels whose base window the raster's edge cuts short: they are averaged over fewer pixels,
    so their vectors (and scores) are not comparable with the rest, and they are not ranked."""
    return (cols < rx[rows]) | (cols >= info.width - rx[rows]) | (rows < ry[rows]) | (rows >= info.height - ry[rows])


def requested_encoder(projector: Projector, backend: str | None, model: str | None) -> TextEncoder | None:
    """The text encoder the user named (None: the checkpoint's); embed_texts refuses any other."""
    if backend is None and model is None:
        return None
    ident = projector.checkpoint.text.identity
    same_backend = (backend or ident["backend"]) == ident["backend"]
    return build_text_encoder(
        backend or ident["backend"], model or ident["model"], ident["dimensions"] if same_backend else None
    )


def open_source(path: str, is_aether: bool, projector: Projector) -> RasterInfo:
    """Open a raster to score: an AETHER raster of this checkpoint, or an AlphaEarth raster it takes."""
    info = open_raster(path, n_bands=None)
    if not is_aether:
        check_raster(projector, info)
        return info
    if info.count != projector.latent_dim:
        raise AetherError(
            f"AETHER raster {path} has {info.count} bands but checkpoint {projector.name} has a "
            f"{projector.latent_dim}-dimensional latent space (an AlphaEarth raster? use --ae_tif)"
        )
    _check_aether_raster(path, projector)
    if info.is_int8:
        logger.warning(
            f"{Path(path).name} is int8: its scores are up to about 0.007 off, enough to reorder close "
            f"places; for the ranks of --ae_tif, embed with --dtype int16 (the default; within 1e-4)"
        )
    return info


def _check_aether_raster(path: str, projector: Projector) -> None:
    """An AETHER raster made by another checkpoint (or text encoder) lives in another latent space."""
    with rasterio.open(path) as src:
        tags = src.tags()
    if "AETHER_MODEL" in tags:  # the parts that determine the vectors: a retrained identical model matches
        try:
            made_by = json.loads(tags["AETHER_MODEL"])
        except ValueError:
            made_by = {}
        ours = projector.identity
        differ = [part for part in ours if made_by.get(part) != ours[part]]
        if differ:
            detail = "; ".join(
                f"{part}: {made_by.get(part, '?')} there, {ours[part]} here"
                if part in ("base window", "text encoder")
                else f"{part} weights differ"
                for part in differ
            )
            raise AetherError(
                f"AETHER raster {path} was made with another model than checkpoint {projector.name} "
                f"({detail}); query it with the checkpoint that made it "
                f"({tags.get('AETHER_CHECKPOINT', '?')}), or pass --ae_tif to embed the AlphaEarth "
                f"raster with this one"
            )
        return
    made_with = tags.get("AETHER_CHECKPOINT_SHA256")
    if made_with is None:
        logger.warning(f"{path} does not say which checkpoint made it; assuming {projector.name}")
        return
    if made_with != projector.ckpt_sha256:
        raise AetherError(
            f"AETHER raster {path} was made with another checkpoint ({tags.get('AETHER_CHECKPOINT', '?')}); "
            f"query it with that checkpoint, or pass --ae_tif to embed the AlphaEarth raster with this one"
        )
