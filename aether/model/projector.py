"""The trained AE projector with its input facts: `AetherEmbedder` embeds vectors, points,
in-memory arrays and free texts, and is what inference, retrieval and evaluation project with.
A checkpoint of either format (aether.model.checkpoint) is taken."""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aether.geo.alphaearth import quantize_int16_torch, quantize_torch
from aether.model.checkpoint import load_checkpoint, model_from_checkpoint, model_identity
from aether.model.devices import pick_device, resolve_precision
from aether.core.errors import AetherError
from aether.core.files import file_sha256
from aether.geo.pooling import pool_points, window_means
from aether.geo.raster import RasterInfo, check_window_px, open_raster
from aether.core.stages import stage
from aether.text.encoders import TextEncoder, build_text_encoder

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ENCODE = {"int8": quantize_torch, "int16": quantize_int16_torch}  # stored integer codes of unit vectors


class AetherEmbedder:
    """The trained AE projector with its input facts, ready to embed vectors, points or arrays."""

    def __init__(self, ckpt_path: str | Path, device: str = "auto", precision: str = "auto"):
        if precision not in PRECISIONS:
            raise AetherError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.ckpt_path = str(ckpt_path)
        self.ckpt = load_checkpoint(ckpt_path)
        model, self.cfg = model_from_checkpoint(self.ckpt)
        self.device = pick_device(device)
        self.projector = model.ae.to(self.device).eval()
        self.text_projector = model.text.to(self.device).eval()
        self._text_encoder = None
        self._thread = threading.local()  # each calling thread's fused-projector workspace
        self.precision = resolve_precision(precision, self.device)
        self.n_bands = int(self.ckpt["input"]["n_bands"])
        self.base_radius_m = float(self.ckpt["input"]["base_radius_m"])
        self.latent_dim = self.projector.out_dim
        width = sum(w.shape[1] for w in self.projector.workspace(1, torch.device("cpu"))) + self.latent_dim + self.n_bands
        # CPU: a batch's activations within ~2 MiB of cache, a power of two (1,024 pixels for the
        # mlp model, 512 for aether's wider one: with one PyTorch thread per tile, 10-30% faster
        # than 4,096, and MKL is slower at sizes such as 4,681); GPU: ~256 MiB of activations.
        budget = (256 << 20) if self.device.type == "cuda" else (2 << 20)
        self.batch_px = 1 << int(np.log2(max(256, budget // (4 * width))))

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(N, bands) unit vectors -> (N, latent) unit vectors, float32."""
        return self._project(vectors, band_major=False).numpy()

    def project_bands(self, vectors: np.ndarray, dtype: str = "float32", out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, bands) unit vectors -> (latent, N) unit vectors on the CPU (into `out` if given): the
        layout a GeoTIFF band write wants, transposed (and for dtype int8, quantized) batch by
        batch while each batch is in cache, so no float32 copy of the whole output is ever held."""
        return self._project(vectors, band_major=True, dtype=dtype, out=out)

    def project_pixels(self, vectors: np.ndarray, dtype: str = "float32", out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, bands) unit vectors -> (N, latent) unit vectors on the CPU in `dtype` (int8 and int16:
        quantized), into `out` if given: the layout a pixel-interleaved GeoTIFF block stores."""
        return self._project(vectors, band_major=False, dtype=dtype, out=out)

    @torch.no_grad()
    def project_on_device(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, bands) float32 vectors on `self.device` -> (N, latent) float32 unit vectors there (into
        `out` if given), `batch_px` at a time, with the embedder's precision: fp32 through the fused
        projector (in this thread's reused workspace), bf16/fp16 under autocast, then normalised."""
        n = len(x)
        if out is None:
            out = torch.empty((n, self.latent_dim), device=x.device)
        autocast = _AUTOCAST.get(self.precision)
        for start in range(0, n, self.batch_px):
            xb, zb = x[start:start + self.batch_px], out[start:start + self.batch_px]
            if autocast is None:
                self.projector.forward_into(xb, self._workspace(len(xb)), zb)
            else:
                with torch.autocast(self.device.type, dtype=autocast):
                    z = self.projector.head(xb)
                zb.copy_(F.normalize(z.float(), dim=1))
        return out

    def _workspace(self, n: int) -> tuple[torch.Tensor, ...]:
        """The calling thread's `forward_into` buffers for at least `n` vectors, reused call after call
        (tiles are projected in several threads at once). On a GPU they belong to the stream they were
        made on: a thread that changes streams gets new ones, so no buffer is shared between streams."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        held = getattr(self._thread, "workspace", None)
        if held is None or held[0] != stream or len(held[1][0]) < n:
            rows = n if held is None or held[0] != stream else max(n, len(held[1][0]))
            held = (stream, self.projector.workspace(rows, self.device))
            self._thread.workspace = held
        return held[1]

    @torch.no_grad()
    def _project(self, vectors: np.ndarray, band_major: bool, dtype: str = "float32",
                 out: torch.Tensor | None = None) -> torch.Tensor:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.n_bands:
            raise AetherError(f"expected vectors of shape (N, {self.n_bands}), got {vectors.shape}")
        n = len(vectors)
        if out is None:
            out = torch.empty((self.latent_dim, n) if band_major else (n, self.latent_dim),
                              dtype=getattr(torch, dtype))
        latent = torch.empty((min(self.batch_px, n), self.latent_dim), device=self.device)
        for start in range(0, n, self.batch_px):
            x = torch.from_numpy(vectors[start:start + self.batch_px]).to(self.device, non_blocking=True)
            with stage("project"):
                z = self.project_on_device(x, latent[:len(x)])
            with stage("quantize"):
                z = encode_latent(z, dtype).cpu()
            if band_major:
                out[:, start:start + len(z)] = z.T
            else:
                out[start:start + len(z)] = z
        return out

    @functools.cached_property
    def ckpt_sha256(self) -> str:
        """The checkpoint file's SHA-256: the tag that ties an AETHER raster to the model that made it."""
        return file_sha256(self.ckpt_path)

    @functools.cached_property
    def model_identity(self) -> dict[str, str]:
        """What determines this checkpoint's AETHER vectors, part by part (aether.model.checkpoint.model_identity):
        the AETHER_MODEL tag that ties an AETHER raster to the model that made it."""
        return model_identity(self.ckpt)

    @property
    def text_identity(self) -> dict:
        """The text encoder the checkpoint was trained with (backend, model, dimensions)."""
        enc = self.ckpt["text_encoder"]
        return {"backend": enc["backend"], "model": enc["model"], "dimensions": enc.get("dimensions")}

    def text_encoder(self) -> TextEncoder:
        """The checkpoint's own text encoder (built once, checked before use)."""
        if self._text_encoder is None:
            enc = build_text_encoder(self.text_identity["backend"], self.text_identity["model"],
                                     self.text_identity["dimensions"], self.cfg.text.base_url,
                                     max_retries=self.cfg.text.max_retries,
                                     request_timeout_s=self.cfg.text.request_timeout_s)
            enc.check()
            self._text_encoder = enc
        return self._text_encoder

    @torch.no_grad()
    def embed_texts(self, texts: list[str], encoder: TextEncoder | None = None) -> np.ndarray:
        """(N, latent) unit vectors for free texts, in the space the AE projector maps into.

        `encoder` defaults to the checkpoint's; any other encoder is refused, because the text
        projector only understands the embeddings it was trained on.
        """
        if encoder is None:
            encoder = self.text_encoder()
        elif encoder.identity != self.text_identity:
            raise AetherError(f"text encoder {encoder.identity['backend']}/{encoder.identity['model']} differs "
                              f"from the checkpoint's ({self.text_identity['backend']}/"
                              f"{self.text_identity['model']}); queries must use the encoder it was trained with")
        if not texts:
            return np.zeros((0, self.latent_dim), dtype=np.float32)
        emb = np.asarray(encoder.encode_batch(list(texts)), dtype=np.float32)
        if emb.shape[1] != self.ckpt["text_encoder"]["dim"]:
            raise AetherError(f"text encoder gave {emb.shape[1]}-dimensional embeddings; the checkpoint expects "
                              f"{self.ckpt['text_encoder']['dim']}")
        z = self.text_projector(torch.from_numpy(emb).to(self.device)).float().cpu()
        return z.numpy()

    def check_raster(self, info: RasterInfo, pooling: str = "window") -> None:
        """Refuse a raster whose bands or grid do not fit this checkpoint (for window pooling, also one
        whose pixels are so small that the base window would be too many pixels across)."""
        if info.count != self.n_bands:
            raise AetherError(f"raster {info.path} has {info.count} bands but checkpoint {self.ckpt_path} "
                              f"was trained on {self.n_bands}")
        lat = info.latitude_range()
        sx, sy = info.pixel_size_m(lat)
        if np.max(sx) > 2 * self.base_radius_m + 1e-6 or np.max(sy) > 2 * self.base_radius_m + 1e-6:
            raise AetherError(f"raster {info.path} has pixels of {float(np.max(sx)):.0f} m, coarser than the "
                              f"checkpoint's base window ({2 * self.base_radius_m:g} m across)")
        if pooling == "window":
            info.check_window(self.base_radius_m, lat, fix="use --pooling pixel (the checkpoint's base radius is "
                                                           f"{self.base_radius_m:g} m)")

    def embed_points(self, ae_tif: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AETHER vectors at points (raster CRS), pooled exactly as in training; and their valid mask."""
        info = open_raster(ae_tif, n_bands=None)
        self.check_raster(info)
        pooled = pool_points(info, x, y, [self.base_radius_m])
        z = self.project(pooled.views[0])
        z[~pooled.valid] = np.nan
        return z, pooled.valid

    def embed_array(self, pixels: np.ndarray, valid: np.ndarray | None = None, pixel_size_m: float = 10.0,
                    pooling: str = "window") -> np.ndarray:
        """Embed an in-memory (h, w, bands) float array; invalid pixels (or all-nodata windows) are NaN."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if valid is None:
            valid = np.isfinite(pixels).all(axis=-1)
        data = np.where(valid[..., None], pixels, np.nan).astype(np.float32)
        info = RasterInfo("<array>", data.shape[1], data.shape[0], data.shape[2], None, None, "float32", None, (0, 0))
        if pooling == "pixel":
            means, ok = unit_rows(np.nan_to_num(data)), valid
        else:
            check_window_px("the array", self.base_radius_m, pixel_size_m, pixel_size_m, fix="use pooling='pixel'")
            r = int(np.floor(self.base_radius_m / pixel_size_m + 1e-6))
            padded = np.pad(data.transpose(2, 0, 1), ((0, 0), (r, r), (r, r)), constant_values=np.nan)
            rows = np.full(data.shape[0], r)
            means, ok = window_means(padded, info, rows, rows, r, r)
        out = np.full(data.shape[:2] + (self.latent_dim,), np.nan, dtype=np.float32)
        out[ok] = self.project(means[ok])
        return out


def encode_latent(z: torch.Tensor, dtype: str) -> torch.Tensor:
    """(N, latent) float32 unit vectors as an output of `dtype` stores them: int8 and int16 codes
    (aether.geo.alphaearth), float16 or float32 values; on z's device."""
    encode = _ENCODE.get(dtype)
    return encode(z) if encode is not None else z.to(getattr(torch, dtype))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(..., bands) vectors scaled to unit length in place (zero vectors stay zero): single pixels
    as the projector saw windows in training, renormalised."""
    norm = np.sqrt(np.einsum("...i,...i->...", vectors, vectors, dtype=np.float32))[..., None]
    np.divide(vectors, norm, out=vectors, where=norm > 0)
    return vectors
