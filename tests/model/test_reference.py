"""Checkpoints in the original authors' format (github.com/inwind0212/AETHER) against an
independent float64 reading of their model.

A reference checkpoint is a plain dict (`ae_state_dict` of an AEProj, `txt_state_dict` of a
TextProj, `hyper_parameters` and bookkeeping), built here with random weights large enough
that a wrong gate, activation, normalisation or window shows. Every expected value is
computed in this file with numpy float64 from the weights (nothing from aether.model.architectures), and
the inputs from the raster file's own values (`stored_values`, `brute_force`), at pixels
located through map coordinates, so a bottom-up input checks the north-up output too.
Rasters are 30 x 36 px at 10 m; the whole module runs in about ten seconds on two cores.
The 1e-6 bound (float32 inference against float64) has some margin: a float32 torch copy of
these models stays under 7.2e-7 over 20,000 random inputs.

The AEProj formula (the reference model.py):
    main = W2 relu(W0 x + b0) + b2,  short = Ws x + bs,  z = main + sigmoid(gate) short
    (z = main + short without a gate),  z /= |z|,  p = P3 gelu(P0 z + pb0) + pb3 (erf GELU),
    out = p / |p|;  and TextProj: (Wt t + bt) / |Wt t + bt|.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shlex
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from scipy.special import erf

from aether.core.errors import AetherError
from aether.model.checkpoint import Checkpoint
from aether.model.embed import embed_texts
from aether.model.projector import Projector
from aether.text.encoders import TextEncoder
from tests.helpers.fixtures import ORIGIN, brute_force, run_script_in_process, stored_values, unit_field, write_raster

LATENT_DIM, HIDDEN_DIM, TEXT_DIM = 16, 32, 384
INNER_DIM = 256  # AEProj's fixed main-branch width
N_BANDS = 64
GATE = 0.3  # sigmoid(0.3) = 0.574: a gate that is neither 0, 1 nor ignored
HEIGHT_PX, WIDTH_PX = 30, 36
PIXEL_M = 10.0
PIX_RADIUS = 4  # the reference default: a 9 x 9 window, 45 m of ground radius
HALF_PX = 4
ATOL = 1e-6  # float32 arithmetic against float64, per component (d = 16)
N_SAMPLES = 40


# ---- the reference checkpoint ----------------------------------------------------------------


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def reference_state(
    *, gate: bool = True, d: int = LATENT_DIM, h: int = HIDDEN_DIM, text_dim: int = TEXT_DIM, seed: int = 0
) -> tuple[dict, dict]:
    """Random (ae_state_dict, txt_state_dict) of the reference AEProj / TextProj, float32.

    Scales are chosen so every part matters: the shortcut is as large as the main branch,
    the post-MLP's pre-activations reach |x| ~ 2 where erf and tanh GELU differ, biases are
    not small.
    """
    rng = np.random.default_rng(seed)
    ae = {
        "proj.0.weight": _normal(rng, INNER_DIM, N_BANDS, scale=1.5),  # x is unit length: W0 x ~ N(0, 1.5^2)
        "proj.0.bias": _normal(rng, INNER_DIM, scale=0.5),
        "proj.2.weight": _normal(rng, d, INNER_DIM, scale=1 / np.sqrt(INNER_DIM)),
        "proj.2.bias": _normal(rng, d, scale=0.3),
        "shortcut.weight": _normal(rng, d, N_BANDS),
        "shortcut.bias": _normal(rng, d, scale=0.3),
    }
    if gate:
        ae["gate"] = torch.tensor([GATE], dtype=torch.float32)
    ae.update(
        {
            "post_mlp.0.weight": _normal(rng, h, d, scale=2.0),  # z is unit length: P0 z ~ N(0, 2^2)
            "post_mlp.0.bias": _normal(rng, h, scale=0.5),
            "post_mlp.3.weight": _normal(rng, d, h, scale=1 / np.sqrt(h)),
            "post_mlp.3.bias": _normal(rng, d, scale=0.3),
        }
    )
    txt = {"proj.weight": _normal(rng, d, text_dim), "proj.bias": _normal(rng, d, scale=0.3)}
    return ae, txt


def reference_dict(
    *,
    gate: bool = True,
    backend: str = "openai",
    d: int = LATENT_DIM,
    h: int = HIDDEN_DIM,
    text_dim: int = TEXT_DIM,
    seed: int = 0,
    pix_radius: int = PIX_RADIUS,
) -> dict:
    """Everything a reference train.py checkpoint holds, with random weights."""
    ae, txt = reference_state(gate=gate, d=d, h=h, text_dim=text_dim, seed=seed)
    return {
        "epoch": 100,
        "ae_state_dict": ae,
        "txt_state_dict": txt,
        "train_metrics": {"loss": 1.25, "L_xt": 1.0, "L_ii": 0.25},
        "val_metrics": {"L_xt_base": 0.0},
        "temps": {"tau_xt": 0.07, "tau_ii": 0.07},
        "model_types": {"ae_type": "AEProj", "text_type": "TextProj"},
        "cache_keys": {},
        "created_at": "2025-06-01 12:00:00",
        "cfg_hash": "0123456789abcdef",
        "hyper_parameters": {
            "data": {
                "poi_path": "data/poi/poi_example.geojson",
                "aef_tif": "data/aef/singapore_2024.tif",
                "crs": "EPSG:4326",
                "feat_mode": "pixel",
                "pix_radius": pix_radius,
                "aug_pix_radius": 9,
                "split_seed": 42,
                "val_ratio": 0.0,
                "test_ratio": 0.0,
            },
            "text": {
                "backend": backend,
                "hf_model": "sentence-transformers/all-MiniLM-L6-v2",
                "openai_model": "text-embedding-3-large",
                "emb_dim": text_dim,
                "batch_size": 1024,
            },
            "model": {
                "ae_type": "AEProj",
                "text_type": "TextProj",
                "suffix": "SG_t3l",
                "hidden_dim": h,
                "out_dim": d,
                "lambda": 0.2,
                "tau_img": 0.07,
                "tau_xt": 0.07,
                "lr": 0.001,
                "weight_decay": 0.0001,
                "betas": [0.9, 0.999],
            },
            "train": {"device": "cuda:0", "batch_size": 512, "num_workers": 4, "epochs": 100, "eta_min_ratio": 0.01},
            "eval": {"topk": [1, 5, 10]},
            "logging": {"ckpt_path": "auto", "cache_dir": "cache"},
        },
    }


def write_reference_checkpoint(
    path: Path,
    *,
    gate: bool = True,
    backend: str = "openai",
    d: int = LATENT_DIM,
    h: int = HIDDEN_DIM,
    text_dim: int = TEXT_DIM,
    seed: int = 0,
    pix_radius: int = PIX_RADIUS,
) -> Path:
    torch.save(
        reference_dict(gate=gate, backend=backend, d=d, h=h, text_dim=text_dim, seed=seed, pix_radius=pix_radius), path
    )
    return path


# ---- the independent formulas (float64) ---------------------------------------------------------


def _f64(state: dict) -> dict:
    return {k: v.detach().double().numpy() for k, v in state.items()}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def ae_formula(ae_state: dict, x: np.ndarray, *, tanh_gelu: bool = False) -> np.ndarray:
    """(N, 64) -> (N, d): the reference AEProj in float64 (`tanh_gelu` only to show the test has teeth)."""
    p = _f64(ae_state)
    x = np.asarray(x, dtype=np.float64)
    main = np.maximum(x @ p["proj.0.weight"].T + p["proj.0.bias"], 0.0) @ p["proj.2.weight"].T + p["proj.2.bias"]
    short = x @ p["shortcut.weight"].T + p["shortcut.bias"]
    g = 1.0 / (1.0 + np.exp(-p["gate"][0])) if "gate" in p else 1.0
    z = _unit(main + g * short)
    a = z @ p["post_mlp.0.weight"].T + p["post_mlp.0.bias"]
    if tanh_gelu:
        act = 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))
    else:
        act = 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))
    return _unit(act @ p["post_mlp.3.weight"].T + p["post_mlp.3.bias"])


def text_formula(txt_state: dict, t: np.ndarray) -> np.ndarray:
    """(N, text_dim) -> (N, d): the reference TextProj in float64."""
    p = _f64(txt_state)
    return _unit(np.asarray(t, dtype=np.float64) @ p["proj.weight"].T + p["proj.bias"])


def random_units(n: int, dim: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


# ---- shared inputs ------------------------------------------------------------------------------

GATES = [pytest.param(True, id="gate"), pytest.param(False, id="no_gate")]
BACKENDS = ["openai", "hf"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """A reference checkpoint for each (gate, backend), different weights for each."""
    folder = tmp_path_factory.mktemp("ref")
    out = {}
    for i, gate in enumerate((True, False)):
        for j, backend in enumerate(BACKENDS):
            path = folder / f"{'gate' if gate else 'nogate'}_{backend}_last.pth"
            out[gate, backend] = write_reference_checkpoint(path, gate=gate, backend=backend, seed=10 * i + j)
    return out


def state_of(path: Path) -> tuple[dict, dict]:
    """The weights as written, read back with plain torch."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return raw["ae_state_dict"], raw["txt_state_dict"]


PATCH = (slice(8, 22), slice(10, 24))  # 14 x 14 px of nodata: windows centred in rows 12-17, cols 14-19 are empty
STRAY = (2, 33)


def field(seed: int) -> np.ndarray:
    v = unit_field(HEIGHT_PX, WIDTH_PX, seed=seed)
    v[:, PATCH[0], PATCH[1]] = np.nan
    v[:, STRAY[0], STRAY[1]] = np.nan
    return v


def ae_raster(path: Path, kind: str, seed: int = 0, bottom_up: bool = False) -> Path:
    """kind: int8 (AlphaEarth encoding), float32 (NaN nodata) or float32-declared (nodata -9999)."""
    if kind == "int8":
        return write_raster(path, field(seed), bottom_up=bottom_up)
    nodata = -9999.0 if kind == "float32-declared" else None
    return write_raster(path, field(seed), dtype="float32", nodata=nodata, bottom_up=bottom_up)


def sample_pixels(seed: int) -> list[tuple[int, int]]:
    """40 (row, col) pixels of the north-up geography: corners, edges, nodata cases and random ones."""
    last_r, last_c = HEIGHT_PX - 1, WIDTH_PX - 1
    fixed = [
        (0, 0),
        (0, last_c),
        (last_r, 0),
        (last_r, last_c),  # corners: clipped windows
        (0, 17),
        (last_r, 20),
        (15, 0),
        (14, last_c),
        (1, 1),
        (last_r - 1, last_c - 2),  # edges
        STRAY,
        (2, 32),
        (3, 33),  # a lone nodata pixel and its neighbours
        (15, 17),
        (12, 14),
        (17, 19),  # inside the patch: the whole window is nodata
        (8, 10),
        (11, 13),
        (21, 23),
        (8, 23),  # nodata pixels whose windows reach valid pixels
        (7, 10),
        (22, 15),
    ]  # valid pixels beside the patch
    rng = np.random.default_rng(seed)
    rand = [
        (int(r), int(c))
        for r, c in zip(
            rng.integers(0, HEIGHT_PX, N_SAMPLES - len(fixed)), rng.integers(0, WIDTH_PX, N_SAMPLES - len(fixed))
        )
    ]
    return fixed + rand


def file_index(transform, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column, in a file with `transform`, of the north-up geography's pixel centres."""
    x = ORIGIN[0] + (np.asarray(cols, dtype=np.float64) + 0.5) * PIXEL_M
    y = ORIGIN[1] - (np.asarray(rows, dtype=np.float64) + 0.5) * PIXEL_M
    c, r = ~transform @ (x, y)
    return np.floor(r).astype(int), np.floor(c).astype(int)


def cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    code, _, err = run_script_in_process("infer_aether_raster.py", [*args, "--no-progress"], monkeypatch, capsys)
    return code, err


def infer_args(ae: Path, ckpt: Path, out: Path, pooling: str) -> list[str]:
    return [
        "--ae_tif",
        str(ae),
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--pooling",
        pooling,
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ]


# ---- 1. what load_checkpoint makes of a reference file ----------------------------------------

TEXT_ENCODERS = {
    "openai": {"backend": "openai", "model": "text-embedding-3-large", "dimensions": 384, "dim": 384},
    "hf": {
        "backend": "sentence-transformers",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "dimensions": None,
        "dim": 384,
    },
}


@pytest.mark.parametrize("pix_radius, radius_m", [(4, 45.0), (2, 25.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_file_is_read(tmp_path, backend, pix_radius, radius_m):
    path = write_reference_checkpoint(tmp_path / "last.pth", backend=backend, pix_radius=pix_radius)
    ckpt = Checkpoint.load(path)
    assert ckpt.origin == "reference"
    assert ckpt.base_radius_m == pytest.approx(radius_m)
    assert {**ckpt.text.identity, "dim": ckpt.text.dim} == TEXT_ENCODERS[backend]


# ---- 2. the projectors against the formula -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_embedder_projects_as_the_formula(ckpts, gate, backend):
    path = ckpts[gate, backend]
    ae_state, _ = state_of(path)
    projector = Projector(path, device="cpu", precision="fp32")
    assert projector.latent_dim == LATENT_DIM
    x = random_units(300, N_BANDS, seed=1)
    got = projector.project(x)
    assert got.shape == (len(x), LATENT_DIM)
    expected = ae_formula(ae_state, x)
    error = float(np.abs(got - expected).max())
    print(f"\nAE projector (gate={gate}, {backend}): max error vs float64 {error:.1e}")
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # the comparison has teeth: an ignored gate or the tanh GELU would be caught
    if gate:
        no_sigmoid = ae_formula({k: v for k, v in ae_state.items() if k != "gate"}, x)
        assert np.abs(no_sigmoid - expected).max() > 1e-2
    assert np.abs(ae_formula(ae_state, x, tanh_gelu=True) - expected).max() > 100 * ATOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_text_projector_is_the_formula(ckpts, gate, backend):
    path = ckpts[gate, backend]
    ae_state, txt_state = state_of(path)
    model = Checkpoint.load(path).build_model()
    t = random_units(200, TEXT_DIM, seed=2)
    with torch.no_grad():
        got = model.text(torch.from_numpy(t.astype(np.float32))).double().numpy()
        ae_got = model.ae(torch.from_numpy(random_units(50, N_BANDS, seed=3).astype(np.float32))).double().numpy()
    np.testing.assert_allclose(got, text_formula(txt_state, t), atol=ATOL, rtol=0)
    np.testing.assert_allclose(ae_got, ae_formula(ae_state, random_units(50, N_BANDS, seed=3)), atol=ATOL, rtol=0)


class FixedTextEncoder(TextEncoder):
    """A text encoder with a checkpoint's identity whose embeddings are fixed unit vectors, one per
    text (seeded by its CRC-32): the text projector's input is then known here exactly, without
    loading a model or calling an API."""

    def __init__(self, identity: dict):
        self.backend, self.model, self.dimensions = identity["backend"], identity["model"], identity["dimensions"]

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return np.stack([random_units(1, TEXT_DIM, seed=zlib.crc32(t.encode()))[0] for t in texts]).astype(np.float32)


def identity_of(backend: str) -> dict:
    return {k: v for k, v in TEXT_ENCODERS[backend].items() if k != "dim"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_texts_is_the_formula(ckpts, backend):
    path = ckpts[True, backend]
    _, txt_state = state_of(path)
    projector = Projector(path, device="cpu", precision="fp32")
    assert projector.checkpoint.text.identity == identity_of(backend)
    texts = ["A place of cafe, a type of amenity, named Regatta.", "A quiet park by the sea.", "Kauppatori"]
    encoder = FixedTextEncoder(identity_of(backend))
    got = embed_texts(projector, texts, encoder=encoder)
    np.testing.assert_allclose(got, text_formula(txt_state, encoder.encode_batch(texts)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_texts_refuses_another_text_encoder(ckpts, backend):
    projector = Projector(ckpts[False, backend], device="cpu", precision="fp32")
    other = FixedTextEncoder(identity_of("hf" if backend == "openai" else "openai"))
    with pytest.raises(AetherError):
        embed_texts(projector, ["a cafe"], encoder=other)


# ---- 3. rasters through infer_aether_raster.py -------------------------------------------------

RASTER_CASES = [
    pytest.param(
        gate,
        backend,
        bottom_up,
        "int8",
        id=f"{'gate' if gate else 'no_gate'}-{backend}-{'bottom_up' if bottom_up else 'north_up'}",
    )
    for gate in (True, False)
    for backend in BACKENDS
    for bottom_up in (False, True)
]
RASTER_CASES += [
    pytest.param(True, "hf", False, "float32", id="gate-hf-north_up-float32"),
    pytest.param(False, "openai", True, "float32-declared", id="no_gate-openai-bottom_up-float32-declared"),
]


@pytest.mark.parametrize("gate, backend, bottom_up, kind", RASTER_CASES)
def test_cli_raster_matches_the_formula(tmp_path, ckpts, monkeypatch, capsys, gate, backend, bottom_up, kind):
    ckpt = ckpts[gate, backend]
    ae_state, _ = state_of(ckpt)
    seed = 3 * int(gate) + int(bottom_up)
    ae = ae_raster(tmp_path / "ae.tif", kind, seed=seed, bottom_up=bottom_up)
    values, invalid = stored_values(ae)  # file row order
    samples = sample_pixels(seed)
    rows, cols = np.array(samples).T
    all_rows, all_cols = np.meshgrid(np.arange(HEIGHT_PX), np.arange(WIDTH_PX), indexing="ij")
    with rasterio.open(ae) as src:
        in_rows, in_cols = file_index(src.transform, rows, cols)
        in_all = file_index(src.transform, all_rows.ravel(), all_cols.ravel())
        crs = src.crs
    for pooling in ("pixel", "window"):
        out = tmp_path / f"{pooling}.tif"
        code, err = cli(infer_args(ae, ckpt, out, pooling), monkeypatch, capsys)
        assert code == 0, err
        with rasterio.open(out) as dst:
            assert (dst.count, dst.height, dst.width) == (LATENT_DIM, HEIGHT_PX, WIDTH_PX)
            assert dst.dtypes == ("float32",) * LATENT_DIM
            assert dst.crs == crs
            assert dst.transform.e < 0, "the output is north-up"
            z = dst.read().astype(np.float64)
            out_rows, out_cols = file_index(dst.transform, rows, cols)
            out_all = file_index(dst.transform, all_rows.ravel(), all_cols.ravel())
        nan = np.isnan(z)
        assert (nan.all(axis=0) == nan.any(axis=0)).all(), "NaN must cover all bands of a pixel"

        # the whole nodata mask
        if pooling == "pixel":
            expected_invalid = invalid[in_all]
        else:
            expected_invalid = np.array(
                [brute_force(values, invalid, r, c, HALF_PX, HALF_PX) is None for r, c in zip(*in_all)]
            )
        np.testing.assert_array_equal(nan[0][out_all], expected_invalid, err_msg=f"{pooling} nodata mask")

        # sampled pixels against the formula
        checked, empty, errors = 0, 0, []
        for i, (r, c) in enumerate(zip(in_rows, in_cols)):
            got = z[:, out_rows[i], out_cols[i]]
            if pooling == "pixel":
                x = None if invalid[r, c] else _unit(values[:, r, c])
            else:
                x = brute_force(values, invalid, r, c, HALF_PX, HALF_PX)
            if x is None:
                assert np.isnan(got).all(), f"{pooling}: sample {samples[i]} should be NaN"
                empty += 1
                continue
            expected = ae_formula(ae_state, x[None])[0]
            errors.append(float(np.abs(got - expected).max()))
            np.testing.assert_allclose(
                got, expected, atol=ATOL, rtol=0, err_msg=f"{pooling}: sample {samples[i]} (geography row, col)"
            )
            checked += 1
        print(f"\n{pooling}: {checked} pixels checked, max error {max(errors):.1e}; {empty} NaN")
        assert checked >= 25 and empty >= (4 if pooling == "pixel" else 3)


def test_window_uses_the_checkpoint_pix_radius(tmp_path, monkeypatch, capsys):
    """pix_radius 2 (25 m of ground radius) pools 5 x 5 pixels, not the 9 x 9 of pix_radius 4."""
    ckpt = write_reference_checkpoint(tmp_path / "r2.pth", pix_radius=2, seed=5)
    ae_state, _ = state_of(ckpt)
    ae = ae_raster(tmp_path / "ae.tif", "int8", seed=7)
    values, invalid = stored_values(ae)
    out = tmp_path / "out.tif"
    code, err = cli(infer_args(ae, ckpt, out, "window"), monkeypatch, capsys)
    assert code == 0, err
    with rasterio.open(out) as dst:
        z = dst.read().astype(np.float64)
    for r, c in [(0, 0), (5, 5), (12, 30), (29, 35), (7, 9), (15, 17)]:
        x = brute_force(values, invalid, r, c, 2, 2)
        if x is None:
            assert np.isnan(z[:, r, c]).all()
            continue
        np.testing.assert_allclose(
            z[:, r, c], ae_formula(ae_state, x[None])[0], atol=ATOL, rtol=0, err_msg=f"pixel {(r, c)}"
        )
    wide = ae_formula(ae_state, brute_force(values, invalid, 5, 5, 4, 4)[None])[0]
    assert np.abs(z[:, 5, 5] - wide).max() > 1e-3, "a 9 x 9 window would give something else"


# ---- 4. refusals -------------------------------------------------------------------------------


def _without(part: str, key: str):
    def edit(ckpt: dict) -> None:
        del ckpt[part][key]

    return edit


def _reshaped(part: str, key: str, shape: tuple[int, ...]):
    def edit(ckpt: dict) -> None:
        ckpt[part][key] = torch.randn(shape)

    return edit


D, Hd = LATENT_DIM, HIDDEN_DIM
BAD_WEIGHTS = [
    pytest.param(_reshaped("ae_state_dict", "proj.2.weight", (D, 255)), "proj.2.weight", id="proj.2.weight_d_255"),
    pytest.param(
        _reshaped("ae_state_dict", "proj.0.weight", (255, N_BANDS)), "proj.0.weight", id="proj.0.weight_255_64"
    ),
    pytest.param(_reshaped("ae_state_dict", "shortcut.weight", (D, 63)), "shortcut.weight", id="shortcut.weight_d_63"),
    pytest.param(
        _reshaped("ae_state_dict", "post_mlp.3.weight", (D, Hd + 1)), "post_mlp.3.weight", id="post_mlp.3.weight_d_h+1"
    ),
    pytest.param(_reshaped("txt_state_dict", "proj.bias", (D + 1,)), "proj.bias", id="txt_proj.bias_d+1"),
    pytest.param(_without("ae_state_dict", "post_mlp.3.bias"), "post_mlp.3.bias", id="missing_post_mlp.3.bias"),
    pytest.param(_without("ae_state_dict", "proj.0.bias"), "proj.0.bias", id="missing_proj.0.bias"),
    pytest.param(_without("txt_state_dict", "proj.weight"), "proj.weight", id="missing_txt_proj.weight"),
]


def one_line(message: str) -> bool:
    return bool(message.strip()) and len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, key", BAD_WEIGHTS)
def test_bad_weights_are_refused_naming_the_key(tmp_path, edit, key):
    ckpt = reference_dict()
    edit(ckpt)
    path = tmp_path / "bad.pth"
    torch.save(ckpt, path)
    with pytest.raises(AetherError) as info:
        Checkpoint.load(path)
    message = str(info.value)
    assert one_line(message), message
    assert key in message, message


def _nonsense_dict(path: Path) -> None:
    torch.save({"foo": torch.zeros(3), "bar": [1, 2, 3], "epoch": "yesterday"}, path)


def _state_dicts_not_dicts(path: Path) -> None:
    ckpt = reference_dict()
    ckpt["ae_state_dict"] = "nonsense"
    torch.save(ckpt, path)


def _no_ae_state_dict(path: Path) -> None:
    ckpt = reference_dict()
    del ckpt["ae_state_dict"]
    torch.save(ckpt, path)


def _a_list(path: Path) -> None:
    torch.save([torch.zeros(2), 1, "x"], path)


def _text_file(path: Path) -> None:
    path.write_text("epoch: 100\nae_state_dict: none\nthis is not a checkpoint\n", encoding="utf-8")


FOREIGN = [_nonsense_dict, _state_dicts_not_dicts, _no_ae_state_dict, _a_list, _text_file]


@pytest.mark.parametrize("write", FOREIGN, ids=[f.__name__.strip("_") for f in FOREIGN])
def test_foreign_files_are_refused(tmp_path, write):
    path = tmp_path / "foreign.pth"
    write(path)
    with pytest.raises(AetherError) as info:
        Checkpoint.load(path)
    assert one_line(str(info.value)), str(info.value)


class _SystemPayload:
    """Unpickling it runs a shell command (touch MARKER)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _TouchPayload:
    """Unpickling it calls pathlib.Path.touch(MARKER)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _malicious_dict(payload) -> dict:
    """A reference-looking checkpoint whose gate is the payload."""
    ckpt = reference_dict()
    ckpt["ae_state_dict"]["gate"] = payload
    return ckpt


MALICIOUS = [
    pytest.param(_SystemPayload, "torch", id="os.system-torch.save"),
    pytest.param(_TouchPayload, "pickle", id="Path.touch-pickle.dump"),
]


def write_malicious(path: Path, payload_type, how: str, marker: Path) -> Path:
    obj = _malicious_dict(payload_type(marker))
    if how == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return path


@pytest.mark.parametrize("payload_type, how", MALICIOUS)
def test_malicious_payload_is_live(tmp_path, payload_type, how):
    """The payloads used below really act when unpickled without restriction (so the refusals mean something)."""
    marker = tmp_path / "unsafe_marker"
    pickle.loads(pickle.dumps(_malicious_dict(payload_type(marker)), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("payload_type, how", MALICIOUS)
def test_malicious_pickle_is_refused_by_checkpoint_load(tmp_path, payload_type, how):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pth", payload_type, how, marker)
    with pytest.raises(AetherError) as info:
        Checkpoint.load(path)
    assert one_line(str(info.value)), str(info.value)
    assert not marker.exists(), "the payload ran"


def _cli_refusal(tmp_path: Path, ckpt: Path, monkeypatch, capsys) -> str:
    ae = ae_raster(tmp_path / "ae.tif", "int8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = cli(infer_args(ae, ckpt, out_dir / "aether.tif", "window"), monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert list(out_dir.iterdir()) == [], "nothing may be written"
    return lines[0]


@pytest.mark.parametrize("payload_type, how", MALICIOUS)
def test_cli_refuses_malicious_pickle(tmp_path, monkeypatch, capsys, payload_type, how):
    marker = tmp_path / "pwned"
    ckpt = write_malicious(tmp_path / "evil.pth", payload_type, how, marker)
    _cli_refusal(tmp_path, ckpt, monkeypatch, capsys)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("edit, key", [BAD_WEIGHTS[0], BAD_WEIGHTS[5]])
def test_cli_refuses_bad_weights(tmp_path, monkeypatch, capsys, edit, key):
    ckpt = reference_dict()
    edit(ckpt)
    path = tmp_path / "bad.pth"
    torch.save(ckpt, path)
    line = _cli_refusal(tmp_path, path, monkeypatch, capsys)
    assert key in line, line


def test_cli_refuses_a_text_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "notes.pth"
    _text_file(path)
    _cli_refusal(tmp_path, path, monkeypatch, capsys)
