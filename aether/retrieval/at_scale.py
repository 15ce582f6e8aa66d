"""Retrieval at scale: a set of tiles (one folder of maps per tile, a mosaic VRT per query, top-k
merged exactly over all tiles) or one large raster in bands of rows, as Dask tasks."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform as warp_transform

from aether.core.cluster import Cluster, dask_client, run_tasks
from aether.core.files import atomic_write_text, check_inputs_kept
from aether.geo.gdal import local_absolute
from aether.geo.raster import RasterInfo
from aether.geo.tiles import expand_tiles, input_files, is_tile_set, join_bands, tile_stems, write_mosaic_vrt
from aether.infer.at_scale import BAND_PX, row_bands
from aether.model.embed import embed_texts
from aether.model.projector import Projector
from aether.retrieval.heatmap import write_heatmap
from aether.retrieval.outputs import (
    CANDIDATES,
    QueryResult,
    output_files,
    output_folder_lock,
    query_names,
    remove_stale_partials,
    write_geojson,
    write_index,
)
from aether.retrieval.scoring import open_source, requested_encoder
from aether.retrieval.search import SearchOptions, check_request, retrieve
from aether.retrieval.topk import (
    MAX_CANDIDATES,
    TopCandidates,
    best_places,
    candidates_needed,
    non_max_suppression,
    pass_tile_px,
)

logger = logging.getLogger(__name__)


def retrieve_at_scale(
    queries: list[str],
    ckpt: str,
    out_dir: str,
    *,
    emb_tif: str | None = None,
    ae_tif: str | None = None,
    options: SearchOptions | None = None,
    cluster: Cluster | None = None,
    band_px: int = BAND_PX,
    progress: bool = True,
) -> list[QueryResult]:
    """`retrieve` over one raster or a set of tiles (aether.geo.tiles), as Dask tasks when a
    `cluster` is given (local worker processes, or an existing scheduler).

    Each tile is scored by one task into `out_dir/tiles/<tile>/` (skipped when a rerun finds it
    finished). Per query, `out_dir` then gets a VRT mosaic of the tiles' similarity maps, the
    top-k places over all tiles as GeoJSON and a PNG heatmap. The merged top-k is exact: greedy
    suppression (ground metres, on lon/lat) over every tile's best top_k * (D + 1) pixels.
    One raster on a cluster is scored in bands of about `band_px` rows, one task each, and joined
    into the files a single-process `retrieve` writes, with the same pixels and places.
    """
    options = (options or SearchOptions()).check()
    cluster = (cluster or Cluster()).check()
    source = emb_tif if emb_tif is not None else ae_tif
    tile_set = source is not None and is_tile_set(source)
    if not tile_set and not cluster.given:
        return retrieve(queries, ckpt, out_dir, emb_tif=emb_tif, ae_tif=ae_tif, options=options, progress=progress)
    queries = check_request(queries, emb_tif, ae_tif, Path(out_dir))
    top_k, nms_m = options.top_k, options.nms_m
    source, ckpt, out_dir = local_absolute(source), local_absolute(ckpt), local_absolute(out_dir)  # for workers
    paths = expand_tiles(source, "raster tile") if tile_set else [source]
    stems = tile_stems(paths)
    out = Path(out_dir)
    written = [
        f
        for folder in [out, *(out / "tiles" / stem for stem in stems)]
        for f in output_files(folder, query_names(queries))
    ]
    check_inputs_kept(written, input_files(paths, ckpt, source if tile_set else None), "choose another --out folder")
    with output_folder_lock(out):  # each task locks its own folder too
        remove_stale_partials(out)
        key = "emb_tif" if emb_tif is not None else "ae_tif"
        projector = Projector(ckpt, device="cpu")
        infos = [open_source(path, emb_tif is not None, projector) for path in paths]  # all, before any work
        encoder = requested_encoder(projector, options.text_backend, options.text_model)
        vectors = embed_texts(projector, queries, encoder)  # once, here
        run = {
            "queries": queries,
            "top_k": top_k,
            "nms_m": nms_m,
            "checkpoint": projector.ckpt_sha256,
            "tile_px": options.tile_px,
            "precision": options.precision,
        }
        task_options = SearchOptions(**{**options.as_dict(), "heatmaps": False})
        if tile_set:
            pieces = [
                (str(out / "tiles" / stem), {key: path}, dict(run, source=path)) for path, stem in zip(paths, stems)
            ]
            sizes = [info.width * info.height for info in infos]
        else:
            info = infos[0]
            tile_px = pass_tile_px(info, options.tile_px, len(queries), top_k, nms_m)
            bands = row_bands(info, tile_px, band_px)
            pieces = [
                (
                    str(out / ".bands" / f"rows_{r0:06d}_{r1:06d}"),
                    {key: source, "rows": (r0, r1)},
                    dict(run, source=source, rows=[r0, r1]),
                )
                for r0, r1 in bands
            ]
            sizes = [info.width * (r1 - r0) for r0, r1 in bands]
        tasks = [
            (queries, ckpt, folder, {"options": task_options, "query_vectors": vectors, **where}, tag)
            for folder, where, tag in pieces
        ]
        Path(pieces[0][0]).parent.mkdir(parents=True, exist_ok=True)
        with dask_client(cluster) as client:
            folders = run_tasks(
                client,
                _retrieve_task,
                tasks,
                sizes,
                desc=f"scoring {len(tasks)} {'tiles' if tile_set else 'bands'}",
                unit="px",
                progress=progress,
            )
        names = query_names(queries)
        results = []
        temps: list[Path] = []
        try:
            for i, (query, name) in enumerate(zip(queries, names)):
                maps = [str(Path(d) / f"{name}.tif") for d in folders]
                if tile_set:
                    tif = write_mosaic_vrt(maps, out / f"{name}.vrt")
                    hits = merged_places([Path(d) / CANDIDATES for d in folders], stems, i, top_k, nms_m, tif)
                else:
                    tif = join_bands(maps, out / f"{name}.tif")
                    hits = best_places(info, band_candidates(folders, i, info, top_k, nms_m), top_k, nms_m)
                geojson_tmp = write_geojson(out / f"{name}.geojson", query, hits, temps)
                png_tmp = write_heatmap(tif, out / f"{name}.png", query, hits, temps)
                results.append(QueryResult(query, tif, out / f"{name}.geojson", out / f"{name}.png", hits))
                os.replace(geojson_tmp, results[-1].geojson)
                os.replace(png_tmp, results[-1].png)
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            raise
        write_index(out, results, source, ckpt, top_k, nms_m)
        if not tile_set:
            shutil.rmtree(out / ".bands")
        return results


def band_candidates(folders: list[str], query: int, info: RasterInfo, top_k: int, nms_m: float) -> TopCandidates:
    """One query's candidates over all bands of one raster, as a single pass would have kept them."""
    merged = TopCandidates(min(MAX_CANDIDATES, candidates_needed(info, top_k, nms_m)))
    for folder in folders:
        with np.load(Path(folder) / CANDIDATES) as saved:
            order = saved[f"order_{query}"]
            merged.add(saved[f"score_{query}"], order // info.width, order % info.width)
    return merged


def _retrieve_task(queries: list[str], ckpt: str, tile_dir: str, arguments: dict, run: dict) -> str:
    """One Dask task: score one tile (or band) into its own folder, unless a run with the same `run`
    finished it; `arguments` are `retrieve`'s keyword arguments."""
    done = Path(tile_dir) / "run.json"
    if done.is_file() and (Path(tile_dir) / CANDIDATES).is_file() and json.loads(done.read_text()) == run:
        return tile_dir
    retrieve(queries, ckpt, tile_dir, progress=False, save_candidates=True, **arguments)
    atomic_write_text(done, json.dumps(run))  # last: its presence means the folder is complete
    return tile_dir


def merged_places(
    paths: list[Path], stems: list[str], query: int, top_k: int, nms_m: float, mosaic: Path
) -> list[dict]:
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
    chosen = non_max_suppression(
        scores, lon, lat, top_k, nms_m, geographic=True, tiebreak=tile * (int(order.max(initial=0)) + 1) + order
    )
    with rasterio.open(mosaic) as src:
        crs = src.crs
    x, y = warp_transform("EPSG:4326", crs, lon[chosen].tolist(), lat[chosen].tolist()) if len(chosen) else ([], [])
    return [
        {
            "rank": rank,
            "score": round(float(scores[i]), 6),
            "lon": float(lon[i]),
            "lat": float(lat[i]),
            "x": float(xi),
            "y": float(yi),
            "tile": stems[int(tile[i])],
        }
        for rank, (i, xi, yi) in enumerate(zip(chosen, x, y), start=1)
    ]
