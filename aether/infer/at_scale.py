"""Inference at scale: a set of tiles (one output each, and a mosaic VRT) or one large raster in
bands of rows, as Dask tasks on a local or existing cluster; each task is an `embed_raster` run
that writes its own output atomically and skips one the same run already finished."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import rasterio

from aether.core.cluster import Cluster, dask_client, run_tasks
from aether.core.errors import AetherError
from aether.core.files import check_inputs_kept, check_output_file, check_output_folder, output_lock
from aether.geo.gdal import local_absolute
from aether.geo.layout import to_cog
from aether.geo.raster import RasterInfo, open_raster
from aether.geo.tiles import expand_tiles, input_files, is_tile_set, join_bands, tile_stems, write_mosaic_vrt
from aether.infer.pipeline import embed_raster, finished_output, run_fingerprint
from aether.infer.spec import EmbedOptions
from aether.model.embed import check_raster
from aether.model.projector import Projector

logger = logging.getLogger(__name__)

BAND_PX = 1024  # rows per task when one raster is split across a cluster


def row_bands(info: RasterInfo, tile_px: int, band_px: int) -> list[tuple[int, int]]:
    """Bands of `band_px` rows (rounded down to whole tile rows, at least one) that cover the
    raster, for splitting one large raster into tasks; the last band may be shorter."""
    step = max(1, band_px // tile_px) * tile_px
    return [(r, min(info.height, r + step)) for r in range(0, info.height, step)]


def embed_at_scale(
    ae_tif: str,
    ckpt: str,
    out: str,
    options: EmbedOptions | None = None,
    cluster: Cluster | None = None,
    *,
    band_px: int = BAND_PX,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Embed one raster or a set of tiles, as Dask tasks when a `cluster` is given (local worker
    processes, or an existing scheduler), with `embed_raster`'s `options`.

    A set of tiles (a glob or a list file: see aether.geo.tiles) gives one output per tile in the
    folder `out`, named after the tile, and `mosaic.vrt` over them. One raster on a cluster is
    cut into bands of about `band_px` rows, one task each, assembled into `out` at the end;
    one raster without a cluster is `embed_raster` (`resume` is its). Each task writes its output
    atomically and skips an output the same run already finished, so a rerun after a lost worker
    or an interruption does only what is missing. The pixels equal those of a single-process run.
    """
    options = (options or EmbedOptions()).check()
    cluster = (cluster or Cluster()).check()
    tile_set = is_tile_set(ae_tif)
    if not tile_set and not cluster.given:
        return embed_raster(ae_tif, ckpt, out, options, progress=progress, resume=resume)
    if resume:
        raise AetherError(
            "--resume is for a single-process run of one raster; with a set of tiles or a cluster, "
            "run the same command again: finished outputs are skipped"
        )
    ae_tif, ckpt, out = local_absolute(ae_tif), local_absolute(ckpt), local_absolute(out)  # workers have other cwds
    if tile_set:
        return _embed_tile_set(ae_tif, ckpt, Path(out), options, cluster, progress)
    out = Path(out)
    check_output_file(out, input_files([ae_tif], ckpt), example="aether.tif")
    projector = Projector(ckpt, device=options.device, precision=options.precision)
    info = open_raster(ae_tif, n_bands=None)
    check_raster(projector, info, options.pooling)
    run_tag = json.dumps(run_fingerprint(ae_tif, projector, options, (0, info.height)), sort_keys=True)
    if finished_output(out, run_tag):
        logger.info(f"{out.name} is already finished (same input, checkpoint and options); skipping it")
        return out
    with output_lock(out), dask_client(cluster) as client:  # here `out` is joined; a task locks its band
        return _embed_in_bands(ae_tif, ckpt, out, info, client, band_px, progress, options)


def _embed_task(ae_tif: str, ckpt: str, out: str, options: EmbedOptions, rows: tuple[int, int] | None = None) -> str:
    """One Dask task: one tile, or one band of rows, into its own output."""
    return str(embed_raster(ae_tif, ckpt, out, options, progress=False, skip_finished=True, rows=rows))


def _embed_tile_set(
    spec: str, ckpt: str, out_dir: Path, options: EmbedOptions, cluster: Cluster, progress: bool
) -> Path:
    """Each tile of the set `spec` into its own output in `out_dir`, and mosaic.vrt over them."""
    paths = expand_tiles(spec, "AlphaEarth tile")
    stems = tile_stems(paths)
    if out_dir.suffix.lower() in (".tif", ".tiff", ".vrt"):
        raise AetherError(f"a set of tiles gives one output per tile: --out must be a folder, got {out_dir}")
    check_output_folder(out_dir)
    outputs = [out_dir / f"{stem}.tif" for stem in stems]
    check_inputs_kept([*outputs, out_dir / "mosaic.vrt"], input_files(paths, ckpt, spec), "choose another --out folder")
    projector = Projector(ckpt, device="cpu")  # the checkpoint and every raster are checked before any work
    infos = [open_raster(p, n_bands=None) for p in paths]
    for info in infos:
        check_raster(projector, info, options.pooling)
    out_dir.mkdir(exist_ok=True)
    tasks = [(p, ckpt, str(out), options) for p, out in zip(paths, outputs)]  # each task locks its own output
    with output_lock(out_dir / "mosaic.vrt", "choose another --out folder"):
        with dask_client(cluster) as client:
            outputs = run_tasks(
                client,
                _embed_task,
                tasks,
                [i.width * i.height for i in infos],
                desc=f"embedding {len(paths)} tiles",
                unit="px",
                progress=progress,
            )
        mosaic = write_mosaic_vrt(outputs, out_dir / "mosaic.vrt")
    logger.info(f"{len(outputs)} tiles in {out_dir}; mosaic: {mosaic}")
    return out_dir


def _embed_in_bands(
    ae_tif: str, ckpt: str, out: Path, info: RasterInfo, client, band_px: int, progress: bool, options: EmbedOptions
) -> Path:
    """One raster as bands of rows on a cluster, each task writing its own band, assembled into
    `out` (then a COG if asked)."""
    bands = row_bands(info, options.tile_px, band_px)
    parts_dir = out.parent / f".{out.name}.parts"
    parts_dir.mkdir(exist_ok=True)
    band_options = EmbedOptions(**{**options.as_dict(), "cog": False})  # the joined file becomes the COG
    tasks = [(ae_tif, ckpt, str(parts_dir / f"rows_{r0:06d}_{r1:06d}.tif"), band_options, (r0, r1)) for r0, r1 in bands]
    parts = run_tasks(
        client,
        _embed_task,
        tasks,
        [info.width * (r1 - r0) for r0, r1 in bands],
        desc=f"embedding in {len(bands)} bands",
        unit="px",
        progress=progress,
    )
    with rasterio.open(parts[0]) as src:  # the run as the workers did it (their device and precision)
        run = json.loads(src.tags()["AETHER_RUN"])
    run.update(rows=[0, info.height], cog=options.cog)
    join_bands(parts, out, {"AETHER_RUN": json.dumps(run, sort_keys=True)}, finish=to_cog if options.cog else None)
    shutil.rmtree(parts_dir)  # with any parts an earlier run with other options left
    return out
