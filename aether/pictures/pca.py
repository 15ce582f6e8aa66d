"""Embedding rasters as PCA false colour.

`render_pca` turns any embedding raster (AlphaEarth's 64 bands or AETHER's 128; int8 or
float; north-up or bottom-up; any CRS) into an RGBA PNG: the first three principal
components become red, green and blue, stretched between robust percentiles, with nodata
transparent and north at the top. The raster is read block by block and subsampled (the
middle pixel of each cell), so memory is bounded by the picture, not by the raster. A
`PcaFit` made on one raster can colour another, so two rasters compare in the same colours.

matplotlib is used without pyplot (a Figure on the Agg canvas), so no global backend changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from aether.core.errors import AetherError, first_line
from aether.core.files import atomic_write, check_output_file
from aether.geo.figures import label_axes, scale_bar
from aether.geo.gdal import streaming_cache
from aether.geo.raster import RasterInfo, decode_pixels, invalid_pixels, open_raster, read_pixels

MAX_PX = 1024  # longer side of a PCA picture, in pixels
MIN_PX = 512  # a small raster's picture is enlarged (whole pixels repeated) to at least this, unless --scale says
MAX_PICTURE_PX = 8192  # longer side of any picture written, --scale included: 256 MiB of RGBA
FIT_SAMPLE_PX = 50_000  # valid pixels a PCA is fitted on, at most
STRETCH_PERCENTILES = (2.0, 98.0)
STRIP_BYTES = 32 << 20  # raster pixels read at a time
UNIT_PX = 256  # narrow storage blocks are read this many pixels wide at least
SAMPLE_SEED = 0


@dataclass(frozen=True)
class PcaFit:
    """A 3-component PCA of embedding vectors and the stretch that maps it to colours."""

    source: str
    mean: np.ndarray  # (bands,)
    components: np.ndarray  # (3, bands), unit rows, each with its largest loading positive
    low: np.ndarray  # (3,) component scores shown as 0
    high: np.ndarray  # (3,) component scores shown as 255
    n_samples: int
    explained: float = float("nan")  # share of the sample's variance the three components hold

    @classmethod
    def of_sample(cls, sample: np.ndarray, source: str) -> PcaFit:
        """The fit of (N, bands) vectors: components with their largest loading positive, stretched
        between STRETCH_PERCENTILES of their scores; refused in one line under 3 vectors."""
        if len(sample) < 3:
            raise AetherError(
                f"raster {source} has {len(sample)} valid pixels in its sample; "
                "a PCA needs at least 3 (is it all nodata?)"
            )
        sample = np.asarray(sample, dtype=np.float64)
        mean = sample.mean(axis=0)
        centred = sample - mean
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
        components = eigenvectors[:, ::-1][:, :3].T
        largest = np.argmax(np.abs(components), axis=1)
        components *= np.sign(components[np.arange(3), largest])[:, None]
        scores = centred @ components.T
        low, high = np.percentile(scores, STRETCH_PERCENTILES, axis=0)
        high = np.where(high - low <= 1e-12, low + 1.0, high)  # a constant component shows as black, not as 0 / 0
        total = eigenvalues.sum()
        return cls(
            source=source,
            mean=mean.astype(np.float32),
            components=components.astype(np.float32),
            low=low.astype(np.float32),
            high=high.astype(np.float32),
            n_samples=len(sample),
            explained=float(eigenvalues[::-1][:3].sum() / total) if total > 0 else float("nan"),
        )

    @property
    def n_bands(self) -> int:
        return self.mean.shape[0]

    def colours(self, vectors: np.ndarray) -> np.ndarray:
        """(N, bands) vectors -> (N, 3) uint8 RGB."""
        scores = (vectors - self.mean) @ self.components.T
        scaled = (scores - self.low) / (self.high - self.low)
        return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def open_embedding(path: str | Path) -> RasterInfo:
    """Open an embedding raster of any band count (at least 3) with AETHER's checks."""
    try:
        with rasterio.open(path) as src:
            count = src.count
    except rasterio.errors.RasterioIOError as exc:
        raise AetherError(f"cannot open raster {path}: {first_line(exc)}") from None
    if count < 3:
        raise AetherError(
            f"raster {path} has {count} band(s); a PCA picture needs an embedding raster (64 or 128 bands)"
        )
    return open_raster(str(path), n_bands=count)


def picture_shape(info: RasterInfo, max_px: int = MAX_PX) -> tuple[int, int]:
    """The picture's (height, width): the raster at its ground shape (a geographic raster's degrees
    made metres at its middle latitude), one picture pixel per pixel of its coarser axis, so no
    axis is enlarged, and the longer side brought down to `max_px` if it is longer."""
    if max_px < 1:
        raise AetherError(f"--max-px must be at least 1, got {max_px}")
    lat = float(np.mean(info.latitude_range())) if info.is_geographic else None
    sx, sy = (float(v) for v in info.pixel_size_m(lat))
    unit = max(sx, sy)
    height, width = info.height * sy / unit, info.width * sx / unit
    shrink = max(1.0, max(height, width) / max_px)
    height, width = max(1, round(height / shrink)), max(1, round(width / shrink))
    check_picture_px(height, width)
    return height, width


def check_picture_px(height: int, width: int, scale: int = 1) -> None:
    """Refuse, before any reading, a picture of height x width pixels, each shown scale x scale, whose
    longer side would be over MAX_PICTURE_PX."""
    side = max(height, width) * scale
    if side > MAX_PICTURE_PX:
        shown_as = f" (--scale {scale} of a {width} x {height} picture)" if scale > 1 else ""
        raise AetherError(
            f"the picture would be {width * scale:,} x {height * scale:,} pixels{shown_as}, over the "
            f"{MAX_PICTURE_PX:,} allowed on its longer side; lower --scale or --max-px"
        )


def _sampled(size: int, n: int) -> np.ndarray:
    """Raster index (counted from the north or west) of each of `n` picture pixels across `size`
    raster pixels: the pixel under the middle of its cell."""
    return np.minimum(((np.arange(n) + 0.5) * size / n).astype(np.int64), size - 1)


def _runs(file_index: np.ndarray, block: int, max_span: int) -> list[np.ndarray]:
    """Picture indices grouped in file order: each group within one storage block and max_span pixels."""
    order = np.argsort(file_index, kind="stable")
    runs, current = [], [order[0]]
    for i in order[1:]:
        first = file_index[current[0]]
        if file_index[i] // block == first // block and file_index[i] - first < max_span:
            current.append(i)
        else:
            runs.append(np.array(current))
            current = [i]
    runs.append(np.array(current))
    return runs


def picture_chunks(info: RasterInfo, max_px: int = MAX_PX):
    """Yield (picture rows, picture columns, vectors (rows, columns, bands) float32, valid (rows, columns)).

    Picture rows and columns count from the north-west whatever the file's row order, and
    pick the pixel under the middle of each picture pixel's cell. The raster is read storage block by
    block (each decoded once), at most about STRIP_BYTES at a time, and subsampled at once.
    """
    height, width = picture_shape(info, max_px)
    rows, cols = _sampled(info.height, height), _sampled(info.width, width)
    file_rows = info.north_up_rows(rows, 1)  # bottom-up: the first file row is the southernmost
    file_cols = cols if info.transform.a > 0 else info.width - 1 - cols
    block_h, block_w = info.block_shape if all(info.block_shape) else (UNIT_PX, UNIT_PX)
    unit_w = min(block_w * max(1, -(-UNIT_PX // block_w)), info.width)
    bytes_per_row = unit_w * info.count * max(np.dtype(info.dtype).itemsize, 4)
    row_runs = _runs(file_rows, block_h, max(1, STRIP_BYTES // bytes_per_row))
    col_runs = _runs(file_cols, unit_w, unit_w)
    with streaming_cache(), rasterio.open(info.path) as src:
        for row_run in row_runs:
            r = file_rows[row_run]
            for col_run in col_runs:
                c = file_cols[col_run]
                window = Window(int(c.min()), int(r.min()), int(c.max() - c.min() + 1), int(r.max() - r.min() + 1))
                pixels = read_pixels(src, window, info)[np.ix_(r - r.min(), c - c.min())]
                invalid = invalid_pixels(pixels, info)
                yield row_run, col_run, decode_pixels(pixels, invalid, info), ~invalid


def fit_pca(tif: str | Path, max_px: int = MAX_PX, sample_px: int = FIT_SAMPLE_PX) -> PcaFit:
    """Fit a 3-component PCA and its percentile stretch on a sample of a raster's valid pixels.

    The sample is a fixed-seed random choice of the picture's pixels (all of them for a
    picture under `sample_px`), taken in picture order, so a fit is reproducible, the same
    for a north-up and a bottom-up copy, and bounded by `sample_px` vectors.
    """
    info = open_embedding(tif)
    out_h, out_w = picture_shape(info, max_px)
    chosen = np.random.default_rng(SAMPLE_SEED).random((out_h, out_w)) < sample_px / (out_h * out_w)
    positions, chunks = [], []
    for rows, cols, vectors, valid in picture_chunks(info, max_px):
        keep = valid & chosen[np.ix_(rows, cols)]
        positions.append((rows[:, None] * out_w + cols[None, :])[keep])
        chunks.append(vectors[keep].astype(np.float64))
    sample = np.concatenate(chunks)[np.argsort(np.concatenate(positions))]
    return PcaFit.of_sample(sample, str(tif))


def pca_image(tif: str | Path, fit: PcaFit | None = None, max_px: int = MAX_PX) -> np.ndarray:
    """A raster as (h, w, 4) uint8 RGBA, north-up, nodata transparent; fitted on itself unless `fit` is given."""
    info = open_embedding(tif)
    if fit is None:
        fit = fit_pca(tif, max_px=max_px)
    else:
        _check_same_bands(tif, info.count, fit.source, fit.n_bands)
    out_h, out_w = picture_shape(info, max_px)
    image = np.zeros((out_h, out_w, 4), dtype=np.uint8)
    for rows, cols, vectors, valid in picture_chunks(info, max_px):
        rgba = np.zeros(valid.shape + (4,), dtype=np.uint8)
        rgba[valid, :3] = fit.colours(vectors[valid])
        rgba[valid, 3] = 255
        image[np.ix_(rows, cols)] = rgba
    return image


def render_pca(
    tif: str | Path,
    out: str | Path,
    fit_on: str | Path | None = None,
    max_px: int = MAX_PX,
    scale: int | None = None,
    frame: bool = True,
) -> Path:
    """Write a PCA false-colour PNG of `tif` (colours fitted on `fit_on` if given); returns the path.

    The picture is drawn at its ground shape (`picture_shape`). `scale` repeats each picture pixel
    scale x scale times, for small rasters shown large; None (the default) enlarges a picture whose
    longer side is under MIN_PX to at least that. With `frame` (the default) the picture is shown
    whole in a figure with a title (the raster, the variance the colours hold), axes in its CRS and
    a scale bar; without, the PNG is the picture's pixels alone.
    """
    out = Path(out)
    check_output_file(out, example="picture.png", suffixes=(".png",))
    info = open_embedding(tif)
    height, width = picture_shape(info, max_px)
    if scale is None:
        scale = max(1, min(math.ceil(MIN_PX / max(height, width)), max_px // max(height, width)))
    if scale < 1:
        raise AetherError(f"--scale must be at least 1, got {scale}")
    check_picture_px(height, width, scale)
    fit = None
    if fit_on is not None:
        _check_same_bands(tif, open_embedding(tif).count, fit_on, open_embedding(fit_on).count)
        fit = fit_pca(fit_on, max_px=max_px)
    fit = fit or fit_pca(tif, max_px=max_px)
    image = pca_image(tif, fit=fit, max_px=max_px)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if frame:
        framed_picture(image, info, fit, Path(tif), out)
        return out
    from PIL import Image  # Pillow comes with matplotlib

    picture = Image.fromarray(image)
    with atomic_write(out) as f:
        picture.save(f, format="PNG", optimize=True)
    return out


def framed_picture(image: np.ndarray, info: RasterInfo, fit: PcaFit, tif: Path, out: Path) -> None:
    """The picture in a figure: its pixels shown one to one, a title, axes in the CRS, a scale bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounds = info.bounds
    height, width = image.shape[:2]
    dpi = 100
    fig = plt.figure(figsize=(width / dpi + 1.5, height / dpi + 1.3), dpi=dpi)
    ax = fig.add_axes(
        (1.0 / (width / dpi + 1.5), 0.8 / (height / dpi + 1.3), width / (width + 150), height / (height + 130))
    )
    ax.imshow(image, extent=(bounds[0], bounds[2], bounds[1], bounds[3]), interpolation="nearest", aspect="auto")
    colours = (
        "colours fitted on " + Path(fit.source).name if Path(fit.source) != tif else "R, G, B = PCA components 1, 2, 3"
    )
    ax.set_title(f"{tif.name}: {colours} ({fit.explained:.0%} of the variance)", fontsize=9)
    label_axes(ax, info.crs)
    scale_bar(ax, bounds, info.crs, colour="white")
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)


def _check_same_bands(tif: str | Path, n_bands: int, fit_source: str | Path, n_fit_bands: int) -> None:
    if n_bands != n_fit_bands:
        raise AetherError(
            f"cannot colour {tif} ({n_bands} bands) with a PCA fitted on {fit_source} ({n_fit_bands} "
            "bands); fit on a raster with the same bands (AlphaEarth has 64, AETHER 128)"
        )
