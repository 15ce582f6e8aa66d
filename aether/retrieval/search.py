"""Natural-language retrieval: text queries -> similarity maps and ranked places.

Queries go through the checkpoint's own text encoder and text projector into the shared
latent space; every pixel's AETHER vector (read from an AETHER raster, or computed on the
fly from an AlphaEarth raster) is scored by cosine similarity. One streaming pass over the
raster serves all queries. Per query this writes a similarity GeoTIFF on the raster's grid,
the top-k places as GeoJSON (greedy non-maximum suppression in metres, so hits are distinct
places rather than neighbouring pixels) and a PNG heatmap.

Top-k is exact while streaming: greedy suppression takes pixels in falling score order and
each kept pixel suppresses at most D others (D = pixels within the radius), so the k hits
are always among the best k * (D + 1) pixels, which is all a tile-by-tile pass keeps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from tqdm.auto import tqdm

from aether.core.runtime import keep_tile_buffers
from aether.geo.blocks import BlockFile, create_sparse
from aether.core.log import log
from aether.model.devices import thread_budget
from aether.core.errors import AetherError
from aether.core.files import (atomic_write, atomic_write_text, check_inputs_kept, folder_lock, raise_if_disk_full,
                          temp_file_beside)
from aether.model.projector import AetherEmbedder
from aether.infer.pipeline import (TILE_PX, PooledTileReader, Tile, check_output_folder, check_tile_px, input_files,
                              read_threads, tile_computer, tile_grid)
from aether.infer.at_scale import BAND_PX, row_bands
from aether.geo.raster import (ZSTD_LEVEL, RasterInfo, geotiff_layout, ground_distances_m, local_absolute, open_raster,
                           output_block_px, read_vectors)
from aether.core.pipeline import run_pipeline
from aether.geo.tiles import join_bands, write_mosaic_vrt
from aether.text.encoders import build_text_encoder

MAX_CANDIDATES = 5_000_000  # per query; a cap on k * (D + 1) for huge radii
HEATMAP_MAX_PX = 1024  # longer side of the PNG heatmap's image
SCORES_BUDGET_MB = 64  # one tile's similarity scores, all queries together
GDAL_CACHE_MB = 64
CANDIDATES = "candidates.npz"  # a tile's top candidates per query, for merging tiles
LOCK = ".retrieve.lock"  # held in the output folder while a search writes there


@dataclass
class QueryResult:
    query: str
    tif: Path
    geojson: Path | None
    png: Path | None
    hits: list[dict]


def read_queries(path: str | Path) -> list[str]:
    """One query per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AetherError(f"query file {path} does not exist") from None
    except UnicodeDecodeError:
        raise AetherError(f"query file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise AetherError(f"cannot read query file {path}: {exc.strerror}") from None
    queries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not queries:
        raise AetherError(f"query file {path} has no queries (one per line)")
    return queries


def query_tile_px(tile_px: int, n_queries: int) -> int:
    """The tile side, shrunk (to a multiple of 16) so one tile's scores for all queries stay within
    SCORES_BUDGET_MB: memory is bounded by the work window however many queries there are."""
    fit = int(math.sqrt(SCORES_BUDGET_MB * 2**20 / (4 * n_queries)))
    return max(16, min(tile_px, fit // 16 * 16))


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe version of a query."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "query"


def nms_radius_px(info: RasterInfo, radius_m: float) -> int:
    """The largest number of pixels a radius spans along either axis (smallest pixel size)."""
    sx, sy = info.pixel_size_m(info.latitude_range())
    return int(math.ceil(radius_m / max(min(float(np.min(sx)), float(np.min(sy))), 1e-9)))


def _candidates_needed(info: RasterInfo, top_k: int, nms_m: float) -> int:
    """How many best pixels per query make the top-k after suppression exact: k * (D + 1)."""
    return top_k * ((2 * nms_radius_px(info, nms_m) + 1) ** 2 + 1)


def non_max_suppression(scores: np.ndarray, x: np.ndarray, y: np.ndarray, k: int, radius_m: float,
                        geographic: bool = False, unit_m: float = 1.0, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of up to k points chosen greedily by falling score, none within `radius_m` of a
    better chosen point (a point exactly at the radius is kept). Equal scores go to the smaller
    `tiebreak` (default: the index), so the answer does not depend on the order of the input."""
    order = np.lexsort((np.arange(len(scores)) if tiebreak is None else tiebreak, -scores))
    alive = np.ones(len(scores), dtype=bool)
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if not alive[i]:
            continue
        chosen.append(int(i))
        if radius_m > 0:
            alive &= ground_distances_m(x[i], y[i], x, y, geographic, unit_m) >= radius_m
        alive[i] = False
    return np.asarray(chosen, dtype=np.int64)


class _TopCandidates:
    """The best `keep` pixels seen so far for one query (scores, input rows and columns)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.scores = np.empty(0, dtype=np.float32)
        self.rows = np.empty(0, dtype=np.int64)
        self.cols = np.empty(0, dtype=np.int64)

    def add(self, scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        ok = np.isfinite(scores)
        scores, rows, cols = scores[ok], rows[ok], cols[ok]
        if len(scores) > self.keep:
            part = np.argpartition(-scores, self.keep - 1)[:self.keep]
            scores, rows, cols = scores[part], rows[part], cols[part]
        self.scores = np.concatenate([self.scores, scores])
        self.rows = np.concatenate([self.rows, rows])
        self.cols = np.concatenate([self.cols, cols])
        if len(self.scores) > 2 * self.keep:
            self._trim()

    def _trim(self) -> None:
        if len(self.scores) > self.keep:
            part = np.argpartition(-self.scores, self.keep - 1)[:self.keep]
            self.scores, self.rows, self.cols = self.scores[part], self.rows[part], self.cols[part]

    def final(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._trim()
        return self.scores, self.rows, self.cols


def retrieve(queries: list[str], ckpt: str, out_dir: str, emb_tif: str | None = None, ae_tif: str | None = None,
             top_k: int = 10, nms_m: float = 100.0, tile_px: int = TILE_PX, device: str = "auto",
             precision: str = "auto", text_backend: str | None = None, text_model: str | None = None,
             progress: bool = True, save_candidates: bool = False,
             query_vectors: np.ndarray | None = None, heatmaps: bool = True,
             rows: tuple[int, int] | None = None) -> list[QueryResult]:
    """Score every pixel of an AETHER raster (`emb_tif`) or of an AlphaEarth raster (`ae_tif`, embedded
    on the fly) against each query; write each query's GeoTIFF, GeoJSON and PNG into `out_dir`.

    `save_candidates` also writes each query's best top_k * (D + 1) pixels, in lon/lat, to
    `candidates.npz`: what merging the top-k of several tiles exactly needs. `query_vectors` are
    the queries already in the latent space (`AetherEmbedder.embed_texts`), so tiles of one
    search need not each load the text model. `heatmaps=False` skips the PNGs (QueryResult.png is
    then None). `rows` (input rows start:stop, start a multiple of the tile side that
    `query_tile_px` gives) scores only that band of the raster, for `retrieve_at_scale`: the
    GeoTIFFs cover the band where it lies, and only they and the candidates are written.

    While it runs it holds `.retrieve.lock` in `out_dir`: a second search into the same folder is
    refused, and no file it writes may be one it reads."""
    queries = _check_request(queries, emb_tif, ae_tif, top_k, nms_m, tile_px, Path(out_dir))
    out = Path(out_dir)
    check_inputs_kept(_outputs(out, _unique_names(queries)), input_files([emb_tif or ae_tif], ckpt),
                      "choose another --out folder")
    with _output_folder(out):
        return _retrieve(queries, ckpt, out, emb_tif, ae_tif, top_k, nms_m, tile_px, device, precision, text_backend,
                         text_model, progress, save_candidates, query_vectors, heatmaps, rows)


def _retrieve(queries: list[str], ckpt: str, out: Path, emb_tif: str | None, ae_tif: str | None, top_k: int,
              nms_m: float, tile_px: int, device: str, precision: str, text_backend: str | None,
              text_model: str | None, progress: bool, save_candidates: bool, query_vectors: np.ndarray | None,
              heatmaps: bool, rows: tuple[int, int] | None) -> list[QueryResult]:
    """`retrieve` once the request is checked and `out` is locked (and exists). Queries are scored in
    passes over the raster of at most `queries_per_pass` each, so open files and memory stay bounded
    however many there are; each pass's files are finished before the next begins."""
    keep_tile_buffers()
    embedder = AetherEmbedder(ckpt, device=device, precision=precision)
    encoder = _requested_encoder(embedder, text_backend, text_model)
    info = _open_source(emb_tif if emb_tif is not None else ae_tif, emb_tif is not None, embedder, ckpt)
    if query_vectors is None:
        query_vectors = embedder.embed_texts(queries, encoder)  # (nq, latent), refuses another encoder
    query_vectors = np.asarray(query_vectors, dtype=np.float32)

    names = _unique_names(queries)
    keep = _candidates_kept(info, top_k, nms_m, say=True)
    per_pass = queries_per_pass(keep)
    tile_px = pass_tile_px(info, tile_px, len(queries), top_k, nms_m)
    if rows is not None and not (0 <= rows[0] < rows[1] <= info.height and rows[0] % tile_px == 0):
        raise AetherError(f"rows {rows[0]}:{rows[1]} are not a band of whole tiles ({tile_px} px) of {info.path}")
    r_start, r_stop = rows if rows is not None else (0, info.height)
    first_row = info.north_up_rows(r_start, r_stop - r_start)
    profile = dict(driver="GTiff", width=info.width, height=r_stop - r_start, count=1, dtype="float32", crs=info.crs,
                   transform=info.north_up_transform @ Affine.translation(0, first_row), nodata=float("nan"),
                   **geotiff_layout("float32", output_block_px(tile_px)))
    tiles = tile_grid(info, tile_px, rows)
    _remove_stale_partials(out)
    starts = range(0, len(queries), per_pass)
    if len(starts) > 1:
        log(f"{len(queries):,} queries: {len(starts)} passes over the raster of at most {per_pass} queries each"
            + ("" if emb_tif is not None else " (each embeds the raster again: for many queries, embed it once "
               "with infer_aether_raster.py and search it with --emb)"))
    scoring = _Scoring(out, info, embedder, emb_tif, ae_tif, tiles, profile, first_row)
    bar = tqdm(total=info.width * (r_stop - r_start) * len(starts), desc="scoring", unit="px", unit_scale=True,
               disable=not progress)
    results = []
    try:
        with contextlib.ExitStack() as stack:
            saved = (stack.enter_context(_CandidateFile(out / CANDIDATES, info))
                     if save_candidates or rows is not None else None)
            for start in starts:
                group = slice(start, start + per_pass)
                maps, candidates = scoring.run(queries[group], names[group], query_vectors[group], keep, bar)
                if saved is not None:
                    saved.add(start, candidates)
                results += _finish_pass(out, info, queries[group], names[group], maps, candidates, top_k, nms_m,
                                        heatmaps, band=rows is not None)
        if rows is None:
            _write_index(out, results, emb_tif or ae_tif, ckpt, top_k, nms_m)
        scoring.report_implausible()
        return results
    finally:
        bar.close()


class _Scoring:
    """One raster's pixels (AETHER vectors read, or AlphaEarth vectors embedded on the fly) scored
    against a group of queries in one pass: a similarity GeoTIFF per query, and its best pixels."""

    def __init__(self, out: Path, info: RasterInfo, embedder: AetherEmbedder, emb_tif: str | None,
                 ae_tif: str | None, tiles: list[Tile], profile: dict, first_row: int):
        self.out, self.info, self.embedder, self.tiles, self.profile = out, info, embedder, tiles, profile
        self.first_row = first_row
        self.emb_tif, self.source = emb_tif, Path(emb_tif or ae_tif).name
        self.reader = None if emb_tif is not None else PooledTileReader(info, embedder, "window")

    def _produce_and_latent(self):
        info = self.info
        if self.reader is not None:
            self.reader.implausible = 0  # each pass reads every tile: report one pass's count
            def produce():
                return self.reader.produce(self.tiles, read_threads(self.embedder.device))

            if self.embedder.device.type == "cpu":
                return produce, self.reader.latent
            block = tile_computer(self.reader)  # pooled and projected on the GPU

            def latent_on_device(data):
                z = torch.from_numpy(block(data, "float32")).reshape(-1, self.embedder.latent_dim)
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

    def run(self, queries: list[str], names: list[str], vectors: np.ndarray, keep: int,
            bar) -> tuple[list[Path], list[_TopCandidates]]:
        """Score the queries: their finished similarity maps, as partial GeoTIFFs beside their final
        names (removed if the pass fails), and their candidates."""
        info, first_row = self.info, self.first_row
        q = torch.from_numpy(vectors)
        candidates = [_TopCandidates(keep) for _ in queries]
        temps: list[Path] = []
        files: list[BlockFile] = []
        threads = max(1, thread_budget() // 4)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compress")
        try:
            for query, name in zip(queries, names):
                fd, tmp = temp_file_beside(self.out / f"{name}.tif", ".partial.tif")
                os.close(fd)
                temps.append(tmp)
                create_sparse(tmp, self.profile, [f"cosine similarity: {query}"],
                              {"AETHER_QUERY": query, "AETHER_CHECKPOINT_SHA256": self.embedder.ckpt_sha256,
                               "AETHER_SOURCE": self.source})
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
                for i, file in enumerate(files):
                    block = sims[i].reshape(tile.height, tile.width, 1)
                    file.write(block[::-1] if info.bottom_up else block, row0, tile.col0)
                    candidates[i].add(sims[i], rows, cols)
                bar.update(tile.width * tile.height)

            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20):
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


def _finish_pass(out: Path, info: RasterInfo, queries: list[str], names: list[str], maps: list[Path],
                 candidates: list[_TopCandidates], top_k: int, nms_m: float, heatmaps: bool,
                 band: bool) -> list[QueryResult]:
    """Give one pass's queries their final files: each map renamed into place with, unless this is a
    band of a raster (whose maps and candidates `retrieve_at_scale` joins), its places and heatmap."""
    temps = list(maps)
    try:
        results = []
        for query, name, tmp, cands in zip(queries, names, maps, candidates):
            if band:
                os.replace(tmp, out / f"{name}.tif")
                results.append(QueryResult(query, out / f"{name}.tif", None, None, []))
                continue
            hits = _hits(info, cands, top_k, nms_m)
            geojson_tmp = _write_geojson(out / f"{name}.geojson", query, hits, temps)
            png = out / f"{name}.png" if heatmaps else None
            png_tmp = _write_heatmap(tmp, png, query, hits, temps) if heatmaps else None
            results.append(QueryResult(query, out / f"{name}.tif", out / f"{name}.geojson", png, hits))
            for done, final in ((tmp, results[-1].tif), (geojson_tmp, results[-1].geojson), (png_tmp, png)):
                if done is not None:
                    os.replace(done, final)
        return results
    except BaseException as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, temps[0] if temps else out / "queries.json")
        raise


QUERIES_PER_PASS = 64  # queries scored in one pass over the raster: at most this many GeoTIFFs open at once
CANDIDATES_PER_PASS = 8_000_000  # best pixels kept in one pass, all its queries together (20 B each, ~3 x held)


def queries_per_pass(keep: int) -> int:
    """How many queries one pass over the raster scores, each keeping `keep` candidates: at most
    QUERIES_PER_PASS, and no more than CANDIDATES_PER_PASS candidates in all (at least one query)."""
    return max(1, min(QUERIES_PER_PASS, CANDIDATES_PER_PASS // keep))


def _candidates_kept(info: RasterInfo, top_k: int, nms_m: float, say: bool = False) -> int:
    """The candidates each query keeps: k * (D + 1), at most MAX_CANDIDATES (`say`: note the cap)."""
    keep = _candidates_needed(info, top_k, nms_m)
    if keep > MAX_CANDIDATES and say:
        log(f"note: top-{top_k} with {nms_m:g} m suppression would need {keep:,} candidates per query; keeping "
            f"{MAX_CANDIDATES:,}, so fewer than {top_k} places may be returned")
    return min(keep, MAX_CANDIDATES)


def pass_tile_px(info: RasterInfo, tile_px: int, n_queries: int, top_k: int, nms_m: float) -> int:
    """The tile side of a search of `n_queries` on `info`: `query_tile_px` for one pass's queries."""
    return query_tile_px(tile_px, min(n_queries, queries_per_pass(_candidates_kept(info, top_k, nms_m))))


_PARTIAL = re.compile(r"\.(q\d+_[a-z0-9-]*\.(tif|geojson|png)\.\w{8}\.partial\.(tif|geojson|png)"
                      r"|(q\d+_[a-z0-9-]*\.vrt|queries\.json|candidates\.npz|run\.json)\.\w{8}\.tmp)")


def _remove_stale_partials(out: Path) -> None:
    """Remove the partial files an earlier search into `out` left when it was killed (this run holds
    the folder's lock, so no live search owns them)."""
    stale = [p for p in out.iterdir() if _PARTIAL.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} partial files of an earlier interrupted search in {out}")


class _CandidateFile:
    """`candidates.npz` written a pass at a time (each query's best pixels in lon/lat, as
    `_candidate_arrays` lays them out), so no more than one pass's candidates are held; it
    appears, whole, when the block ends without an error."""

    def __init__(self, path: Path, info: RasterInfo):
        self.path, self.info = path, info

    def __enter__(self) -> "_CandidateFile":
        import zipfile

        self._file = atomic_write(self.path)
        self._zip = zipfile.ZipFile(self._file.__enter__(), "w", allowZip64=True)  # np.savez's layout
        return self

    def add(self, first: int, candidates: list[_TopCandidates]) -> None:
        for i, arrays in enumerate(_candidate_arrays(self.info, candidates), start=first):
            for key, array in arrays.items():
                with self._zip.open(f"{key}_{i}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def __exit__(self, *exc) -> None:
        self._zip.close()
        self._file.__exit__(*exc)


def _check_request(queries: list[str], emb_tif: str | None, ae_tif: str | None, top_k: int, nms_m: float,
                   tile_px: int, out: Path) -> list[str]:
    """Refuse, before any work, what a search cannot run with; the queries, stripped."""
    queries = [q.strip() for q in queries]
    if not queries or any(not q for q in queries):
        raise AetherError("a query is empty; give the text to search for")
    if (emb_tif is None) == (ae_tif is None):
        raise AetherError("give exactly one raster: --emb (an AETHER raster) or --ae_tif (an AlphaEarth raster)")
    if top_k < 1:
        raise AetherError(f"top-k must be at least 1, got {top_k}")
    if not nms_m >= 0 or math.isinf(nms_m):
        raise AetherError(f"suppression radius must be 0 or more metres, got {nms_m}")
    if tile_px < 16:
        raise AetherError(f"tile size must be at least 16 pixels, got {tile_px}")
    check_tile_px(tile_px)
    check_output_folder(out)
    return queries


def _outputs(out: Path, names: list[str]) -> list[Path]:
    """Every file a search of the queries `names` may write into `out` (which are written depends
    on the kind of search): per query its map, mosaic, places and heatmap; the index; a task's
    candidates and run record."""
    files = [out / "queries.json", out / CANDIDATES, out / "run.json"]
    return files + [out / f"{name}{ext}" for name in names for ext in (".tif", ".vrt", ".geojson", ".png")]


def _output_folder(out: Path):
    """The lock a search holds in its output folder (created if missing, removed if left empty)."""
    return folder_lock(out, LOCK, f"output folder {out}", "choose another --out folder")


def _candidate_arrays(info: RasterInfo, candidates: list[_TopCandidates]):
    """Per query, its best pixels as candidates.npz holds them: score, lon, lat, order (row * width + col)."""
    for cands in candidates:
        scores, rows, cols = cands.final()
        x, y = info.xy(rows, cols)
        lon, lat = warp_transform(info.crs, "EPSG:4326", x.tolist(), y.tolist()) if len(x) else ([], [])
        yield {"score": scores, "lon": np.asarray(lon), "lat": np.asarray(lat), "order": rows * info.width + cols}


def _requested_encoder(embedder: AetherEmbedder, backend: str | None, model: str | None):
    """The text encoder the user named (None: the checkpoint's); embed_texts refuses any other."""
    if backend is None and model is None:
        return None
    ident = embedder.text_identity
    same_backend = (backend or ident["backend"]) == ident["backend"]
    return build_text_encoder(backend or ident["backend"], model or ident["model"],
                              ident["dimensions"] if same_backend else None)


def _open_source(path: str, is_aether: bool, embedder: AetherEmbedder, ckpt: str) -> RasterInfo:
    """Open a raster to score: an AETHER raster of this checkpoint, or an AlphaEarth raster it takes."""
    info = open_raster(path, n_bands=None)
    if not is_aether:
        embedder.check_raster(info)
        return info
    if info.count != embedder.latent_dim:
        raise AetherError(f"AETHER raster {path} has {info.count} bands but checkpoint {ckpt} has a "
                          f"{embedder.latent_dim}-dimensional latent space (an AlphaEarth raster? use --ae_tif)")
    _check_aether_raster(path, ckpt, embedder)
    if info.is_int8:
        log(f"note: {Path(path).name} is int8: its scores are up to about 0.007 off, enough to reorder close "
            f"places; for the ranks of --ae_tif, embed with infer_aether_raster.py --dtype int16 (within 1e-4)")
    return info


def _check_aether_raster(path: str, ckpt: str, embedder: AetherEmbedder) -> None:
    """An AETHER raster made by another checkpoint (or text encoder) lives in another latent space."""
    with rasterio.open(path) as src:
        tags = src.tags()
    if "AETHER_MODEL" in tags:  # the parts that determine the vectors: a retrained identical model matches
        try:
            made_by = json.loads(tags["AETHER_MODEL"])
        except ValueError:
            made_by = {}
        ours = embedder.model_identity
        differ = [part for part in ours if made_by.get(part) != ours[part]]
        if differ:
            detail = "; ".join(f"{part}: {made_by.get(part, '?')} there, {ours[part]} here" if part in
                               ("base window", "text encoder") else f"{part} weights differ" for part in differ)
            raise AetherError(f"AETHER raster {path} was made with another model than checkpoint {Path(ckpt).name} "
                              f"({detail}); query it with the checkpoint that made it "
                              f"({tags.get('AETHER_CHECKPOINT', '?')}), or pass --ae_tif to embed the AlphaEarth "
                              f"raster with this one")
        return
    made_with = tags.get("AETHER_CHECKPOINT_SHA256")
    if made_with is None:
        log(f"note: {path} does not say which checkpoint made it; assuming {Path(ckpt).name}")
        return
    if made_with != embedder.ckpt_sha256:
        raise AetherError(f"AETHER raster {path} was made with another checkpoint ({tags.get('AETHER_CHECKPOINT', '?')}); "
                          f"query it with that checkpoint, or pass --ae_tif to embed the AlphaEarth raster with this one")


def _unique_names(queries: list[str]) -> list[str]:
    width = max(2, len(str(len(queries))))
    return [f"q{i:0{width}d}_{slug(q)}" for i, q in enumerate(queries, start=1)]


def _hits(info: RasterInfo, cands: _TopCandidates, top_k: int, nms_m: float) -> list[dict]:
    scores, rows, cols = cands.final()
    x, y = info.xy(rows, cols)
    chosen = non_max_suppression(scores, x, y, top_k, nms_m, info.is_geographic, info.unit_m,
                                 tiebreak=rows * info.width + cols)  # ties: first in raster order
    if len(chosen) == 0:
        return []
    lon, lat = warp_transform(info.crs, "EPSG:4326", x[chosen].tolist(), y[chosen].tolist())
    hits = []
    for rank, (i, lo, la) in enumerate(zip(chosen, lon, lat), start=1):
        out_row = info.north_up_rows(int(rows[i]), 1)
        hits.append({"rank": rank, "score": round(float(scores[i]), 6), "lon": lo, "lat": la,
                     "x": float(x[i]), "y": float(y[i]), "row": out_row, "col": int(cols[i])})
    return hits


def _write_geojson(path: Path, query: str, hits: list[dict], temps: list[Path]) -> Path:
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [h["lon"], h["lat"]]},
                 "properties": {"query": query, **{k: v for k, v in h.items() if k not in ("lon", "lat")}}}
                for h in hits]
    fd, tmp = temp_file_beside(path, ".partial.geojson")
    temps.append(tmp)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f, ensure_ascii=False, indent=1)
    return tmp


def _write_heatmap(tif: Path, path: Path, query: str, hits: list[dict], temps: list[Path]) -> Path:
    """The similarity map, read at most HEATMAP_MAX_PX across (averaged), with a colour bar and the hits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rasterio.enums import Resampling

    with rasterio.open(tif) as src:
        scale = max(src.width, src.height) / HEATMAP_MAX_PX
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 else src.shape
        img = src.read(1, out_shape=shape, resampling=Resampling.average, masked=True).filled(np.nan)
        b, crs = src.bounds, src.crs
    # a degree of longitude is cos(latitude) of a degree of latitude: draw a geographic map at its ground shape
    aspect = 1 / math.cos(math.radians((b.bottom + b.top) / 2)) if crs.is_geographic else 1.0
    height_in = 7 * aspect * (b.top - b.bottom) / max(b.right - b.left, 1e-12)
    fig, ax = plt.subplots(figsize=(7, min(max(height_in, 2.5), 14) + 0.6), dpi=110)
    cmap = plt.get_cmap("magma").with_extremes(bad="#d0d0d0")
    finite = img[np.isfinite(img)]
    vmin, vmax = (np.percentile(finite, [2, 99.8]) if finite.size else (0.0, 1.0))
    im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, extent=(b.left, b.right, b.bottom, b.top),
                   interpolation="nearest")
    if hits:
        ax.scatter([h["x"] for h in hits], [h["y"] for h in hits], s=60, facecolors="none", edgecolors="#00e5ff",
                   linewidths=1.5)
        for h in hits:
            ax.annotate(str(h["rank"]), (h["x"], h["y"]), xytext=(4, 4), textcoords="offset points", color="#00e5ff",
                        fontsize=8, weight="bold")
    ax.set_title(query if len(query) <= 70 else query[:67] + "...", fontsize=11)
    ax.set_aspect(aspect)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(useOffset=False, style="plain")
    name = crs.to_string() if crs.to_epsg() is None else f"EPSG:{crs.to_epsg()}"
    if crs.is_geographic:
        ax.set_xlabel(f"longitude (degrees, {name})", fontsize=8)
        ax.set_ylabel("latitude (degrees)", fontsize=8)
    else:
        unit = crs.linear_units or "units"
        ax.set_xlabel(f"easting ({unit}, {name})", fontsize=8)
        ax.set_ylabel(f"northing ({unit})", fontsize=8)
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)  # as tall as the map, never taller
    fig.colorbar(im, cax=cax, label="cosine similarity")
    fd, tmp = temp_file_beside(path, ".partial.png")
    os.close(fd)
    temps.append(tmp)
    with warnings.catch_warnings():  # a glyph the font lacks (an emoji in the query) is drawn as a box, quietly
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return tmp


def _write_index(out: Path, results: list[QueryResult], source: str, ckpt: str, top_k: int, nms_m: float) -> None:
    index = {"source": str(source), "checkpoint": str(ckpt), "top_k": top_k, "nms_radius_m": nms_m,
             "queries": [{"query": r.query, "tif": r.tif.name, "geojson": r.geojson.name,
                          "png": r.png.name if r.png else None, "best_score": r.hits[0]["score"] if r.hits else None}
                         for r in results]}
    atomic_write_text(out / "queries.json", json.dumps(index, ensure_ascii=False, indent=1))


def retrieve_at_scale(queries: list[str], ckpt: str, out_dir: str, emb_tif: str | None = None,
                      ae_tif: str | None = None, workers: int | None = None, scheduler: str | None = None,
                      top_k: int = 10, nms_m: float = 100.0, progress: bool = True, **options) -> list[QueryResult]:
    """`retrieve` over one raster or a set of tiles (aether.geo.tiles), as Dask tasks when a cluster is
    given (`workers` local processes, or an existing `scheduler`); `options` are `retrieve`'s.

    Each tile is scored by one task into `out_dir/tiles/<tile>/` (skipped when a rerun finds it
    finished). Per query, `out_dir` then gets a VRT mosaic of the tiles' similarity maps, the
    top-k places over all tiles as GeoJSON and a PNG heatmap. The merged top-k is exact: greedy
    suppression (ground metres, on lon/lat) over every tile's best top_k * (D + 1) pixels.
    One raster on a cluster is scored in bands of rows, one task each, and joined into the files
    a single-process `retrieve` writes, with the same pixels and places.
    """
    from aether.core.cluster import check_cluster_args, dask_client, run_tasks
    from aether.geo.tiles import expand_tiles, is_tile_set, tile_stems

    check_cluster_args(workers, scheduler)
    source = emb_tif if emb_tif is not None else ae_tif
    tile_set = source is not None and is_tile_set(source)
    if not tile_set and workers is None and scheduler is None:
        return retrieve(queries, ckpt, out_dir, emb_tif=emb_tif, ae_tif=ae_tif, top_k=top_k, nms_m=nms_m,
                        progress=progress, **options)
    queries = _check_request(queries, emb_tif, ae_tif, top_k, nms_m, options.get("tile_px", TILE_PX), Path(out_dir))
    source, ckpt, out_dir = local_absolute(source), local_absolute(ckpt), local_absolute(out_dir)  # for workers
    paths = expand_tiles(source, "raster tile") if tile_set else [source]
    stems = tile_stems(paths)
    out = Path(out_dir)
    written = [f for folder in [out, *(out / "tiles" / stem for stem in stems)]
               for f in _outputs(folder, _unique_names(queries))]
    check_inputs_kept(written, input_files(paths, ckpt, source if tile_set else None), "choose another --out folder")
    with _output_folder(out):  # each task locks its own folder too
        _remove_stale_partials(out)
        key = "emb_tif" if emb_tif is not None else "ae_tif"
        embedder = AetherEmbedder(ckpt, device="cpu")
        infos = [_open_source(path, emb_tif is not None, embedder, ckpt) for path in paths]  # all, before any work
        text_backend, text_model = options.pop("text_backend", None), options.pop("text_model", None)
        vectors = embedder.embed_texts(queries, _requested_encoder(embedder, text_backend, text_model))  # once, here
        run = {"queries": queries, "top_k": top_k, "nms_m": nms_m, "checkpoint": embedder.ckpt_sha256,
               **{k: options.get(k) for k in ("tile_px", "precision")}}
        common = {"top_k": top_k, "nms_m": nms_m, "query_vectors": vectors, **options}
        if tile_set:
            pieces = [(str(out / "tiles" / stem), {key: path}, dict(run, source=path))
                      for path, stem in zip(paths, stems)]
            sizes = [info.width * info.height for info in infos]
        else:
            info = infos[0]
            tile_px = pass_tile_px(info, options.get("tile_px", TILE_PX), len(queries), top_k, nms_m)
            bands = row_bands(info, tile_px, BAND_PX)
            pieces = [(str(out / ".bands" / f"rows_{r0:06d}_{r1:06d}"), {key: source, "rows": (r0, r1)},
                       dict(run, source=source, rows=[r0, r1])) for r0, r1 in bands]
            sizes = [info.width * (r1 - r0) for r0, r1 in bands]
        tasks = [(queries, ckpt, folder, {**common, **where}, tag) for folder, where, tag in pieces]
        Path(pieces[0][0]).parent.mkdir(parents=True, exist_ok=True)
        with dask_client(workers, scheduler) as client:
            folders = run_tasks(client, _retrieve_task, tasks, sizes, desc=f"scoring {len(tasks)} "
                                f"{'tiles' if tile_set else 'bands'}", unit="px", progress=progress)
        names = _unique_names(queries)
        results = []
        temps: list[Path] = []
        try:
            for i, (query, name) in enumerate(zip(queries, names)):
                maps = [str(Path(d) / f"{name}.tif") for d in folders]
                if tile_set:
                    tif = write_mosaic_vrt(maps, out / f"{name}.vrt")
                    hits = _merged_hits([Path(d) / CANDIDATES for d in folders], stems, i, top_k, nms_m, tif)
                else:
                    tif = join_bands(maps, out / f"{name}.tif")
                    hits = _hits(info, _band_candidates(folders, i, info, top_k, nms_m), top_k, nms_m)
                geojson_tmp = _write_geojson(out / f"{name}.geojson", query, hits, temps)
                png_tmp = _write_heatmap(tif, out / f"{name}.png", query, hits, temps)
                results.append(QueryResult(query, tif, out / f"{name}.geojson", out / f"{name}.png", hits))
                os.replace(geojson_tmp, results[-1].geojson)
                os.replace(png_tmp, results[-1].png)
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            raise
        _write_index(out, results, source, ckpt, top_k, nms_m)
        if not tile_set:
            shutil.rmtree(out / ".bands")
        return results


def _band_candidates(folders: list[str], query: int, info: RasterInfo, top_k: int, nms_m: float) -> _TopCandidates:
    """One query's candidates over all bands of one raster, as a single pass would have kept them."""
    merged = _TopCandidates(min(MAX_CANDIDATES, _candidates_needed(info, top_k, nms_m)))
    for folder in folders:
        with np.load(Path(folder) / CANDIDATES) as saved:
            order = saved[f"order_{query}"]
            merged.add(saved[f"score_{query}"], order // info.width, order % info.width)
    return merged


def _retrieve_task(queries: list[str], ckpt: str, tile_dir: str, options: dict, run: dict) -> str:
    """One Dask task: score one tile into its own folder, unless a run with the same `run` finished it."""
    done = Path(tile_dir) / "run.json"
    if done.is_file() and (Path(tile_dir) / CANDIDATES).is_file() and json.loads(done.read_text()) == run:
        return tile_dir
    retrieve(queries, ckpt, tile_dir, progress=False, save_candidates=True, heatmaps=False, **options)
    atomic_write_text(done, json.dumps(run))  # last: its presence means the folder is complete
    return tile_dir


def _merged_hits(paths: list[Path], stems: list[str], query: int, top_k: int, nms_m: float, mosaic: Path) -> list[dict]:
    """The top-k places of one query over all tiles, from each tile's saved candidates."""
    scores, lon, lat, tile, order = [], [], [], [], []
    for t, path in enumerate(paths):
        with np.load(path) as saved:
            scores.append(saved[f"score_{query}"])
            lon.append(saved[f"lon_{query}"])
            lat.append(saved[f"lat_{query}"])
            order.append(saved[f"order_{query}"])
            tile.append(np.full(len(scores[-1]), t, dtype=np.int64))
    scores, lon, lat, tile, order = map(np.concatenate, (scores, lon, lat, tile, order))
    # ties: the tile listed first, then raster order
    chosen = non_max_suppression(scores, lon, lat, top_k, nms_m, geographic=True,
                                 tiebreak=tile * (int(order.max(initial=0)) + 1) + order)
    with rasterio.open(mosaic) as src:
        crs = src.crs
    x, y = warp_transform("EPSG:4326", crs, lon[chosen].tolist(), lat[chosen].tolist()) if len(chosen) else ([], [])
    return [{"rank": rank, "score": round(float(scores[i]), 6), "lon": float(lon[i]), "lat": float(lat[i]),
             "x": float(xi), "y": float(yi), "tile": stems[int(tile[i])]}
            for rank, (i, xi, yi) in enumerate(zip(chosen, x, y), start=1)]
