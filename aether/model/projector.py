"""A checkpoint's trained projectors on a device: `Projector` turns AlphaEarth vectors into AETHER
vectors (and text embeddings into the same space) with the device, precision and batching that
are fast there, in reused buffers. What inference, retrieval and evaluation project with; the
plain functions built on it (points, arrays, free texts, raster checks) are `aether.model.embed`'s."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aether.core.errors import AetherError
from aether.core.files import file_sha256
from aether.core.stages import stage
from aether.geo.alphaearth import quantize_int16_torch, quantize_torch
from aether.model.checkpoint import Checkpoint
from aether.model.devices import pick_device, resolve_precision

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ENCODE = {"int8": quantize_torch, "int16": quantize_int16_torch}  # stored integer codes of unit vectors


class Projector:
    """The trained AE and text projectors of a checkpoint (a `Checkpoint`, or the path of one) on
    `device`, projecting in `precision` (auto: bf16 where it is fast, else fp32), `batch_px`
    vectors at a time."""

    def __init__(self, checkpoint: Checkpoint | str | Path, device: str = "auto", precision: str = "auto"):
        if precision not in PRECISIONS:
            raise AetherError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
        model = self.checkpoint.build_model()
        self.device = pick_device(device)
        self.ae = model.ae.to(self.device).eval()
        self.text = model.text.to(self.device).eval()
        self._thread = threading.local()  # each calling thread's fused-projector workspace
        self.precision = resolve_precision(precision, self.device)
        self.n_bands = self.checkpoint.n_bands
        self.base_radius_m = self.checkpoint.base_radius_m
        self.latent_dim = self.ae.out_dim
        width = sum(w.shape[1] for w in self.ae.workspace(1, torch.device("cpu"))) + self.latent_dim + self.n_bands
        # CPU: a batch's activations within ~2 MiB of cache, a power of two (1,024 pixels for the
        # mlp model, 512 for aether's wider one: with one PyTorch thread per tile, 10-30% faster
        # than 4,096, and MKL is slower at sizes such as 4,681); GPU: ~256 MiB of activations.
        budget = (256 << 20) if self.device.type == "cuda" else (2 << 20)
        self.batch_px = 1 << int(np.log2(max(256, budget // (4 * width))))

    @property
    def name(self) -> str:
        """The checkpoint's file name (for messages and tags)."""
        return self.checkpoint.path.name if self.checkpoint.path else "<checkpoint in memory>"

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(N, bands) unit vectors -> (N, latent) unit vectors, float32."""
        return self._project(vectors, band_major=False).numpy()

    def project_bands(
        self, vectors: np.ndarray, dtype: str = "float32", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, bands) unit vectors -> (latent, N) unit vectors on the CPU (into `out` if given): the
        layout a GeoTIFF band write wants, transposed (and for dtype int8, quantized) batch by
        batch while each batch is in cache, so no float32 copy of the whole output is ever held."""
        return self._project(vectors, band_major=True, dtype=dtype, out=out)

    def project_pixels(
        self, vectors: np.ndarray, dtype: str = "float32", out: torch.Tensor | None = None
    ) -> torch.Tensor:
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
            xb, zb = x[start : start + self.batch_px], out[start : start + self.batch_px]
            if autocast is None:
                self.ae.forward_into(xb, self._workspace(len(xb)), zb)
            else:
                with torch.autocast(self.device.type, dtype=autocast):
                    z = self.ae.head(xb)
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
            held = (stream, self.ae.workspace(rows, self.device))
            self._thread.workspace = held
        return held[1]

    @torch.no_grad()
    def _project(
        self, vectors: np.ndarray, band_major: bool, dtype: str = "float32", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.n_bands:
            raise AetherError(f"expected vectors of shape (N, {self.n_bands}), got {vectors.shape}")
        n = len(vectors)
        if out is None:
            out = torch.empty((self.latent_dim, n) if band_major else (n, self.latent_dim), dtype=getattr(torch, dtype))
        latent = torch.empty((min(self.batch_px, n), self.latent_dim), device=self.device)
        for start in range(0, n, self.batch_px):
            x = torch.from_numpy(vectors[start : start + self.batch_px]).to(self.device, non_blocking=True)
            with stage("project"):
                z = self.project_on_device(x, latent[: len(x)])
            with stage("quantize"):
                z = encode_latent(z, dtype).cpu()
            if band_major:
                out[:, start : start + len(z)] = z.T
            else:
                out[start : start + len(z)] = z
        return out

    @functools.cached_property
    def ckpt_sha256(self) -> str:
        """The checkpoint file's SHA-256: the tag that ties an AETHER raster to the file that made it."""
        if self.checkpoint.path is None:
            raise AetherError("a checkpoint built in memory has no file digest; save it and load it from the file")
        return file_sha256(self.checkpoint.path)

    @functools.cached_property
    def identity(self) -> dict[str, str]:
        """What determines this checkpoint's AETHER vectors, part by part (`Checkpoint.identity`): the
        AETHER_MODEL tag that ties an AETHER raster to the model that made it."""
        return self.checkpoint.identity()

    @torch.no_grad()
    def project_texts(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, text dim) text embeddings -> (N, latent) unit vectors in the space the AE projector maps into."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.checkpoint.text.dim:
            raise AetherError(
                f"text encoder gave {embeddings.shape[-1]}-dimensional embeddings; the checkpoint "
                f"expects {self.checkpoint.text.dim}"
            )
        return self.text(torch.from_numpy(embeddings).to(self.device)).float().cpu().numpy()


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
