"""AETHER vectors for what a user holds: points on a raster (pooled exactly as in training), an
in-memory array, free texts; and the check that a raster fits a checkpoint. Plain functions over
a `Projector` (aether.model.projector)."""

from __future__ import annotations

import numpy as np

from aether.core.errors import AetherError
from aether.geo.alphaearth import PIXEL_M
from aether.geo.pooling import pool_points, window_means
from aether.geo.raster import RasterInfo, check_window_px, open_raster
from aether.model.checkpoint import Checkpoint
from aether.model.projector import Projector, unit_rows
from aether.text.encoders import TextEncoder, build_text_encoder, describe_encoder


def text_encoder_of(checkpoint: Checkpoint) -> TextEncoder:
    """The text encoder a checkpoint was trained with, built and checked (its package, key or model
    is there) before use."""
    cfg = checkpoint.config.text
    encoder = build_text_encoder(
        checkpoint.text.backend,
        checkpoint.text.model,
        checkpoint.text.dimensions,
        cfg.base_url,
        max_retries=cfg.max_retries,
        request_timeout_s=cfg.request_timeout_s,
    )
    encoder.check()
    return encoder


def embed_texts(projector: Projector, texts: list[str], encoder: TextEncoder | None = None) -> np.ndarray:
    """(N, latent) unit vectors for free texts, in the space the AE projector maps into.

    `encoder` defaults to the checkpoint's; any other encoder is refused, because the text
    projector only understands the embeddings it was trained on.
    """
    spec = projector.checkpoint.text
    if encoder is None:
        encoder = text_encoder_of(projector.checkpoint)
    elif encoder.identity != spec.identity:
        raise AetherError(
            f"text encoder {describe_encoder(encoder.identity)} differs from the checkpoint's "
            f"({spec.describe()}); queries must use the encoder it was trained with"
        )
    if not texts:
        return np.zeros((0, projector.latent_dim), dtype=np.float32)
    return projector.project_texts(encoder.encode_batch(list(texts)))


def check_raster(projector: Projector, info: RasterInfo, pooling: str = "window") -> None:
    """Refuse a raster whose bands or grid do not fit the checkpoint (for window pooling, also one
    whose pixels are so small that the base window would be too many pixels across)."""
    if info.count != projector.n_bands:
        raise AetherError(
            f"raster {info.path} has {info.count} bands but checkpoint {projector.name} was trained "
            f"on {projector.n_bands}"
        )
    lat = info.latitude_range()
    sx, sy = info.pixel_size_m(lat)
    radius = projector.base_radius_m
    if np.max(sx) > 2 * radius + 1e-6 or np.max(sy) > 2 * radius + 1e-6:
        raise AetherError(
            f"raster {info.path} has pixels of {float(np.max(sx)):.0f} m, coarser than the "
            f"checkpoint's base window ({2 * radius:g} m across)"
        )
    if pooling == "window":
        info.check_window(radius, lat, fix=f"use --pooling pixel (the checkpoint's base radius is {radius:g} m)")


def embed_points(projector: Projector, ae_tif: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AETHER vectors at points (raster CRS), pooled exactly as in training (NaN where a window is
    all nodata); and their valid mask."""
    info = open_raster(ae_tif, n_bands=None)
    check_raster(projector, info)
    pooled = pool_points(info, x, y, [projector.base_radius_m])
    z = projector.project(pooled.views[0])
    z[~pooled.valid] = np.nan
    return z, pooled.valid


def embed_array(
    projector: Projector,
    pixels: np.ndarray,
    valid: np.ndarray | None = None,
    pixel_size_m: float = PIXEL_M,
    pooling: str = "window",
) -> np.ndarray:
    """Embed an in-memory (h, w, bands) float array; invalid pixels (or all-nodata windows) are NaN."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if valid is None:
        valid = np.isfinite(pixels).all(axis=-1)
    data = np.where(valid[..., None], pixels, np.nan).astype(np.float32)
    info = RasterInfo("<array>", data.shape[1], data.shape[0], data.shape[2], None, None, "float32", None, (0, 0))
    radius = projector.base_radius_m
    if pooling == "pixel":
        means, ok = unit_rows(np.nan_to_num(data)), valid
    else:
        check_window_px("the array", radius, pixel_size_m, pixel_size_m, fix="use pooling='pixel'")
        r = int(np.floor(radius / pixel_size_m + 1e-6))
        padded = np.pad(data.transpose(2, 0, 1), ((0, 0), (r, r), (r, r)), constant_values=np.nan)
        rows = np.full(data.shape[0], r)
        means, ok = window_means(padded, info, rows, rows, r, r)
    out = np.full(data.shape[:2] + (projector.latent_dim,), np.nan, dtype=np.float32)
    out[ok] = projector.project(means[ok])
    return out
