"""Natural-language retrieval: text queries -> similarity maps and ranked places.

Queries go through the checkpoint's own text encoder and text projector into the shared latent
space; every pixel's AETHER vector (read from an AETHER raster, or computed on the fly from an
AlphaEarth raster) is scored by cosine similarity (`aether.retrieval.scoring`), in streaming
passes over the raster that serve many queries each. Per query this writes a similarity GeoTIFF
on the raster's grid, the top-k places as GeoJSON (greedy non-maximum suppression in metres, so
hits are distinct places rather than neighbouring pixels: `aether.retrieval.topk`) and a PNG
heatmap (`aether.retrieval.outputs`, `aether.retrieval.heatmap`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from tqdm.auto import tqdm

from aether.core.errors import AetherError
from aether.core.files import check_inputs_kept, check_output_folder, raise_if_disk_full
from aether.geo.layout import geotiff_layout, output_block_px
from aether.geo.raster import RasterInfo
from aether.geo.tiles import input_files
from aether.infer.reader import tile_grid
from aether.infer.spec import TILE_PX, check_tile_px
from aether.model.embed import embed_texts
from aether.model.projector import Projector
from aether.retrieval.heatmap import write_heatmap
from aether.retrieval.outputs import (
    CANDIDATES,
    CandidateFile,
    QueryResult,
    output_files,
    output_folder_lock,
    query_names,
    remove_stale_partials,
    write_geojson,
    write_index,
)
from aether.retrieval.scoring import Scoring, open_source, requested_encoder
from aether.retrieval.topk import TopCandidates, best_places, candidates_kept, pass_tile_px, queries_per_pass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOptions:
    """How a search answers: the `top_k` places per query, none within `nms_m` metres of a better
    one; `tile_px` the unit of work (the answer is the same for any); `device` and `precision`
    of the projector; `text_backend` and `text_model` to name the text encoder (refused unless it
    is the checkpoint's); `heatmaps` False to skip the PNGs."""

    top_k: int = 10
    nms_m: float = 100.0
    tile_px: int = TILE_PX
    device: str = "auto"
    precision: str = "auto"
    text_backend: str | None = None
    text_model: str | None = None
    heatmaps: bool = True

    def check(self) -> SearchOptions:
        """Refuse, before any work, what a search cannot run with; returns itself."""
        if self.top_k < 1:
            raise AetherError(f"top-k must be at least 1, got {self.top_k}")
        if not self.nms_m >= 0 or math.isinf(self.nms_m):
            raise AetherError(f"suppression radius must be 0 or more metres, got {self.nms_m}")
        check_tile_px(self.tile_px)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


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


def retrieve(
    queries: list[str],
    ckpt: str,
    out_dir: str,
    *,
    emb_tif: str | None = None,
    ae_tif: str | None = None,
    options: SearchOptions | None = None,
    progress: bool = True,
    query_vectors: np.ndarray | None = None,
    save_candidates: bool = False,
    rows: tuple[int, int] | None = None,
) -> list[QueryResult]:
    """Score every pixel of an AETHER raster (`emb_tif`) or of an AlphaEarth raster (`ae_tif`, embedded
    on the fly) against each query, as `options` ask; write each query's GeoTIFF, GeoJSON and PNG
    into `out_dir`.

    For `retrieve_at_scale`'s tasks: `query_vectors` are the queries already in the latent space
    (`aether.model.embed.embed_texts`), so the tiles of one search need not each load the text
    model; `save_candidates` also writes each query's best top_k * (D + 1) pixels, in lon/lat, to
    `candidates.npz` (what merging the top-k of several tiles exactly needs); `rows` (input rows
    start:stop, start a multiple of the tile side that `query_tile_px` gives) scores only that
    band of the raster: the GeoTIFFs cover the band where it lies, and only they and the
    candidates are written.

    While it runs it holds `.retrieve.lock` in `out_dir`: a second search into the same folder is
    refused, and no file it writes may be one it reads."""
    options = (options or SearchOptions()).check()
    out = Path(out_dir)
    queries = check_request(queries, emb_tif, ae_tif, out)
    check_inputs_kept(
        output_files(out, query_names(queries)), input_files([emb_tif or ae_tif], ckpt), "choose another --out folder"
    )
    with output_folder_lock(out):
        return _retrieve(queries, ckpt, out, emb_tif, ae_tif, options, progress, save_candidates, query_vectors, rows)


def _retrieve(
    queries: list[str],
    ckpt: str,
    out: Path,
    emb_tif: str | None,
    ae_tif: str | None,
    options: SearchOptions,
    progress: bool,
    save_candidates: bool,
    query_vectors: np.ndarray | None,
    rows: tuple[int, int] | None,
) -> list[QueryResult]:
    """`retrieve` once the request is checked and `out` is locked (and exists). Queries are scored in
    passes over the raster of at most `queries_per_pass` each, so open files and memory stay bounded
    however many there are; each pass's files are finished before the next begins."""
    top_k, nms_m = options.top_k, options.nms_m
    projector = Projector(ckpt, device=options.device, precision=options.precision)
    encoder = requested_encoder(projector, options.text_backend, options.text_model)
    info = open_source(emb_tif if emb_tif is not None else ae_tif, emb_tif is not None, projector)
    if query_vectors is None:
        query_vectors = embed_texts(projector, queries, encoder)  # (nq, latent), refuses another encoder
    query_vectors = np.asarray(query_vectors, dtype=np.float32)

    names = query_names(queries)
    keep = candidates_kept(info, top_k, nms_m, say=True)
    per_pass = queries_per_pass(keep)
    tile_px = pass_tile_px(info, options.tile_px, len(queries), top_k, nms_m)
    if rows is not None and not (0 <= rows[0] < rows[1] <= info.height and rows[0] % tile_px == 0):
        raise AetherError(f"rows {rows[0]}:{rows[1]} are not a band of whole tiles ({tile_px} px) of {info.path}")
    r_start, r_stop = rows if rows is not None else (0, info.height)
    first_row = info.north_up_rows(r_start, r_stop - r_start)
    profile = dict(
        driver="GTiff",
        width=info.width,
        height=r_stop - r_start,
        count=1,
        dtype="float32",
        crs=info.crs,
        transform=info.north_up_transform @ Affine.translation(0, first_row),
        nodata=float("nan"),
        **geotiff_layout("float32", output_block_px(tile_px)),
    )
    tiles = tile_grid(info, tile_px, rows)
    remove_stale_partials(out)
    starts = range(0, len(queries), per_pass)
    if len(starts) > 1:
        logger.info(
            f"{len(queries):,} queries: {len(starts)} passes over the raster of at most {per_pass} queries each"
            + (
                ""
                if emb_tif is not None
                else " (each embeds the raster again: for many queries, embed it once "
                "with infer_aether_raster.py and search it with --emb)"
            )
        )
    scoring = Scoring(out, info, projector, emb_tif, ae_tif, tiles, profile, first_row)
    bar = tqdm(
        total=info.width * (r_stop - r_start) * len(starts),
        desc="scoring",
        unit="px",
        unit_scale=True,
        disable=not progress,
    )
    results = []
    try:
        with contextlib.ExitStack() as stack:
            saved = (
                stack.enter_context(CandidateFile(out / CANDIDATES, info))
                if save_candidates or rows is not None
                else None
            )
            for start in starts:
                group = slice(start, start + per_pass)
                maps, candidates = scoring.run(queries[group], names[group], query_vectors[group], keep, bar)
                if saved is not None:
                    saved.add(start, candidates)
                results += _finish_pass(
                    out,
                    info,
                    queries[group],
                    names[group],
                    maps,
                    candidates,
                    top_k,
                    nms_m,
                    options.heatmaps,
                    band=rows is not None,
                )
        if rows is None:
            write_index(out, results, emb_tif or ae_tif, ckpt, top_k, nms_m)
        scoring.report_implausible()
        return results
    finally:
        bar.close()


def _finish_pass(
    out: Path,
    info: RasterInfo,
    queries: list[str],
    names: list[str],
    maps: list[Path],
    candidates: list[TopCandidates],
    top_k: int,
    nms_m: float,
    heatmaps: bool,
    band: bool,
) -> list[QueryResult]:
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
            hits = best_places(info, cands, top_k, nms_m)
            geojson_tmp = write_geojson(out / f"{name}.geojson", query, hits, temps)
            png = out / f"{name}.png" if heatmaps else None
            png_tmp = write_heatmap(tmp, png, query, hits, temps) if heatmaps else None
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


def check_request(queries: list[str], emb_tif: str | None, ae_tif: str | None, out: Path) -> list[str]:
    """Refuse, before any work, queries and rasters a search cannot run with; the queries, stripped."""
    queries = [q.strip() for q in queries]
    if not queries or any(not q for q in queries):
        raise AetherError("a query is empty; give the text to search for")
    if (emb_tif is None) == (ae_tif is None):
        raise AetherError("give exactly one raster: --emb (an AETHER raster) or --ae_tif (an AlphaEarth raster)")
    check_output_folder(out)
    return queries
