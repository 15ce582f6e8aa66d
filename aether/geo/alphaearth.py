"""Facts about Google's AlphaEarth Foundations embeddings, declared once.

The annual Satellite Embedding product has 64 bands (A00..A63); each pixel is a
unit-length vector. The Cloud Storage COGs store it as signed int8 with
q = round(127.5 * sign(x) * sqrt(|x|)), nodata -128, de-quantized as
x = sign(q) * (q / 127.5) ** 2. Data: CC-BY 4.0, with the attribution text Google's
README of the bucket requires (ATTRIBUTION).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

N_BANDS = 64
PIXEL_M = 10.0  # the product's pixel: 10 m on the ground, in each tile's UTM zone
NODATA_INT8 = -128
QUANT_SCALE = 127.5
INT16_SCALE = 32767.0  # AETHER's own int16 output (not an AlphaEarth format): value = q / 32767
NODATA_INT16 = -32768
DECODE_CHUNK = 1 << 19  # values `dequantize` works on at a time (2 MiB of float32)
MAX_ABS_VALUE = 1e3  # a unit vector's components lie in [-1, 1]: a float pixel beyond this (or inf) is no embedding
ATTRIBUTION = "The AlphaEarth Foundations Satellite Embedding dataset is produced by Google and Google DeepMind."
LICENSE = "CC-BY 4.0"


def band_names(n_bands: int = N_BANDS, prefix: str = "A", digits: int = 2) -> list[str]:
    """Band names as AlphaEarth spells them, A00..A63; AETHER outputs use E000.. (digits=3)."""
    width = max(digits, len(str(n_bands - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n_bands)]


def quantize(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Encode values in [-1, 1] as AlphaEarth int8; invalid pixels become -128.

    The square-root companding spends the int8 codes where unit vectors' components
    live (mostly small), so the round trip error is at most about 1/127.5 near |x| = 1
    and much smaller near 0.
    """
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(QUANT_SCALE * np.sign(x) * np.sqrt(np.minimum(np.abs(x), 1.0)))
    q = np.clip(q, -127, 127).astype(np.int8)
    if valid is not None:
        q[~np.broadcast_to(valid, q.shape)] = NODATA_INT8
    return q


def quantize_torch(x: torch.Tensor) -> torch.Tensor:
    """`quantize` for a torch tensor (same formula, same codes), without nodata handling."""
    import torch

    q = x.abs().clamp_(max=1.0).sqrt_().mul_(QUANT_SCALE).round_().copysign_(x)
    return q.clamp_(-127, 127).to(torch.int8)


def dequantize_torch_(values: torch.Tensor) -> torch.Tensor:
    """`dequantize` in place, for a float tensor holding int8 codes: sign(q) * (q / 127.5) ** 2."""
    return values.div_(QUANT_SCALE).mul_(values.abs())


def signed_squares_torch_(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes q (in an integer tensor wide enough) as sign(q) * q**2, in place: `dequantize`
    without its 1 / 127.5**2, whose sums are exact (a window mean's scale cancels when it is
    renormalised)."""
    return codes.mul_(codes.abs())


def dequantize(q: np.ndarray, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """Decode AlphaEarth int8 to floats: sign(q) * (q / 127.5) ** 2 (nodata not masked), into
    `out` (C-contiguous, q's shape) when given. Computed as f * |f| with f = q / 127.5 (the
    formula's own roundings, as `dequantize_torch_`), in place, DECODE_CHUNK values at a time: the
    only temporary stays in the CPU's cache (temporaries of the output's size, each freshly
    page-faulted, made a map's first tiles take seconds)."""
    q = np.asarray(q)
    values = np.empty(q.shape, dtype) if out is None else out
    if not values.flags.c_contiguous:
        raise ValueError("dequantize needs a C-contiguous output array")
    np.copyto(values, q, casting="unsafe")  # int8 codes are exact in any float type
    flat = values.reshape(-1)
    scale = values.dtype.type(QUANT_SCALE)
    for start in range(0, flat.size, DECODE_CHUNK):
        part = flat[start : start + DECODE_CHUNK]
        np.divide(part, scale, out=part)
        np.multiply(part, np.abs(part), out=part)
    return values


def quantize_int16_torch(x: torch.Tensor) -> torch.Tensor:
    """AETHER's int16 encoding of values in [-1, 1]: q = round(32767 x), at most 1.5e-5 off per
    component (int8's companding is up to 1/127.5 off, which reorders close retrieval scores)."""
    import torch

    return x.mul(INT16_SCALE).round_().clamp_(-INT16_SCALE, INT16_SCALE).to(torch.int16)


def dequantize_int16_torch_(values: torch.Tensor) -> torch.Tensor:
    """`dequantize_int16` in place, for a float tensor holding int16 codes."""
    return values.div_(INT16_SCALE)


def dequantize_int16(q: np.ndarray, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """Decode AETHER int16 to floats: q / 32767 (nodata not masked), into `out` when given."""
    if out is None:
        values = np.asarray(q).astype(dtype)
    else:
        values = out
        np.copyto(values, q)
    return np.divide(values, dtype(INT16_SCALE), out=values)
