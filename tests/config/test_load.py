"""aether.config.load_config: defaults, --set overrides, path resolution, and one clear error per mistake."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aether.config.load import config_from_dict, load_config
from aether.config.schema import Config
from aether.core.errors import AetherError
from aether.data.poi import DEFAULT_TEMPLATE


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    """A config in tmp/cfg/ naming data files (empty: only their existence is checked) beside it."""
    folder = tmp_path / "cfg"
    _write(folder / "ae.tif", "")
    _write(folder / "pois" / "p.geojson", "")
    return _write(folder / "config.yaml", yaml.safe_dump({"data": {"ae_tif": "ae.tif", "poi": "pois/p.geojson"}}))


def _with(cfg_file: Path, section: str, **values) -> Path:
    """The fixture's config with `values` set in `section`."""
    raw = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    raw.setdefault(section, {}).update(values)
    return _write(cfg_file, yaml.safe_dump(raw))


# ---- what loads ------------------------------------------------------------------------------


def test_defaults_load_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, check_files=False)
    assert cfg.data.n_bands == 64
    assert cfg.data.template == DEFAULT_TEMPLATE
    assert (cfg.data.base_radius_m, cfg.data.aug_radius_m) == (45.0, 95.0)
    assert cfg.text.backend == "sentence-transformers" and cfg.text.dimensions is None
    assert (cfg.loss.lam, cfg.loss.temperature, cfg.loss.learn_temperature) == (0.2, 0.07, False)
    assert (cfg.train.epochs, cfg.train.batch_size) == (10, 256)
    assert cfg.train.run_dir == str(tmp_path / "ckpts" / "helsinki")  # relative to the working folder


def test_a_file_naming_only_data_paths_gets_defaults_elsewhere(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.model == Config().model
    assert cfg.loss == Config().loss
    assert cfg.train.epochs == Config().train.epochs


def test_bundled_config_loads():
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "config.yaml", check_files=False)
    assert cfg.data.ae_tif == str(root / "data" / "AE" / "helsinki_standin_ae_int8.tif")


def test_overrides_parse_yaml_scalars(cfg_file):
    cfg = load_config(
        cfg_file,
        [
            "train.epochs=3",
            "loss.lam=0.5",
            "loss.temperature=1",  # an int where a float is expected is fine
            "loss.learn_temperature=true",
            "text.dimensions=null",
            "text.model=my-model",
            "data.poi_crs=EPSG:4326",
            "data.template=A {value} called {name}",
            " model.dropout = 0 ",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.loss.lam == 0.5
    assert cfg.loss.temperature == 1.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.loss.learn_temperature is True
    assert cfg.text.dimensions is None
    assert cfg.text.model == "my-model"
    assert cfg.data.poi_crs == "EPSG:4326"
    assert cfg.data.template == "A {value} called {name}"
    assert cfg.model.dropout == 0.0


def test_overrides_beat_the_file_and_the_last_one_wins(cfg_file):
    _with(cfg_file, "train", epochs=7, seed=5)
    cfg = load_config(cfg_file, ["train.epochs=2", "train.epochs=4"])
    assert (cfg.train.epochs, cfg.train.seed) == (4, 5)


def test_dimensions_override_sets_an_int(cfg_file):
    assert load_config(cfg_file, ["text.backend=openai", "text.dimensions=256"]).text.dimensions == 256


@pytest.mark.parametrize("where", ["file", "override"])
def test_exponent_floats_are_floats(cfg_file, where):
    if where == "file":
        _write(cfg_file, cfg_file.read_text(encoding="utf-8") + "train:\n  lr: 1e-4\n")
        cfg = load_config(cfg_file)
    else:
        cfg = load_config(cfg_file, ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4


def test_template_override_of_a_single_field(cfg_file):
    assert load_config(cfg_file, ["data.template={name}"]).data.template == "{name}"


def test_relative_paths_resolve_against_the_config_folder(cfg_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the config's folder
    _write(cfg_file.parent / "models" / "local-model" / "config.json", "{}")
    _with(cfg_file, "text", model="models/local-model", cache_dir="cache")
    _with(cfg_file, "train", run_dir="../runs/a")
    folder = cfg_file.parent.resolve()
    cfg = load_config(cfg_file)
    assert cfg.data.ae_tif == str(folder / "ae.tif")
    assert cfg.data.poi == str(folder / "pois" / "p.geojson")
    assert cfg.text.cache_dir == str(folder / "cache")
    assert cfg.text.model == str(folder / "models" / "local-model")
    assert Path(cfg.train.run_dir).resolve() == tmp_path.resolve() / "runs" / "a"


def test_absolute_paths_and_hub_model_names_are_kept(cfg_file, tmp_path):
    ae = _write(tmp_path / "elsewhere" / "ae.tif", "")
    cfg = load_config(cfg_file, [f"data.ae_tif={ae}", "text.model=sentence-transformers/all-MiniLM-L6-v2"])
    assert cfg.data.ae_tif == str(ae)
    assert cfg.text.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_config_from_dict_round_trips(cfg_file):
    cfg = load_config(cfg_file, ["train.epochs=3", "loss.lam=0.4"])
    assert config_from_dict(cfg.to_dict()) == cfg


# ---- what is refused: an AetherError naming the key ---------------------------------------------

BAD_OVERRIDES = [
    # override, text the message must contain
    ("train.epoch=3", "unknown key train.epoch (did you mean train.epochs?)"),
    ("loss.lamda=0.5", "unknown key loss.lamda (did you mean loss.lam?)"),
    ("trian.epochs=3", "unknown key trian (did you mean train?)"),
    ("foo.bar=1", "unknown key foo (known: data, text, model, loss, train)"),
    ("train.epochs=three", "config train.epochs: expected int, got 'three'"),
    ("train.epochs=true", "config train.epochs: expected int, got True"),
    ("train.epochs=2.5", "config train.epochs: expected int, got 2.5"),
    ("loss.lam=[0.1]", "config loss.lam: expected float, got [0.1]"),
    ("loss.learn_temperature=1", "config loss.learn_temperature: expected bool, got 1"),
    ("train.epochs=null", "config train.epochs: expected int, got None"),
    ("data.base_radius_m=-5", "config data.base_radius_m: must be >= 0"),
    ("data.aug_radius_m=30", "config data.aug_radius_m: must be >= data.base_radius_m"),
    ("loss.lam=1.5", "config loss.lam:"),
    ("loss.lam=-0.1", "config loss.lam:"),
    ("loss.lam=.nan", "config loss.lam:"),
    ("data.val_fraction=-0.1", "config data.val_fraction: must be in [0, 1)"),
    ("data.val_fraction=1", "config data.val_fraction: must be in [0, 1)"),
    ("model.arch=clip", "config model.arch: must be one of aether, mlp"),
    ("model.latent_dim=2000000000", "config model.latent_dim: must be in [1, 16,384]"),
    ("model.hidden_dim=0", "config model.hidden_dim: must be in [1, 16,384]"),
    ("train.seed=-1", "config train.seed: must be in [0, 2**32 - 1]"),
    ("train.seed=4294967296", "config train.seed: must be in [0, 2**32 - 1]"),
    ("loss.ae_ae_temperature=0", "config loss.ae_ae_temperature: must be > 0 or null"),
    ("train.betas=[0.9]", "config train.betas: must be two numbers in [0, 1)"),
    ("train.betas=0.9", "config train.betas: expected a list"),
    ("train.min_lr_ratio=2", "config train.min_lr_ratio: must be in [0, 1]"),
    ("data.val_block_m=0", "config data.val_block_m:"),
    ("data.n_bands=0", "config data.n_bands:"),
    ("train.batch_size=1", "config train.batch_size: must be >= 2"),
    ("train.epochs=0", "config train.epochs: must be >= 1"),
    ("train.lr=0", "config train.lr:"),
    ("train.warmup_epochs=-1", "config train.warmup_epochs:"),
    ("train.device=gpu", "config train.device: must be one of auto, cpu, cuda"),
    ("loss.temperature=0", "config loss.temperature: must be > 0"),
    ("loss.min_temperature=0.5", "config loss.min_temperature:"),
    ("model.dropout=1", "config model.dropout:"),
    ("model.latent_dim=0", "config model.latent_dim:"),
    ("text.backend=huggingface", "config text.backend: must be one of sentence-transformers, openai"),
    ("text.dimensions=0", "config text.dimensions:"),
    ("text.batch_size=0", "config text.batch_size:"),
    ("data.template=named {name", "config data.template: not a valid template"),
    ("data.template=named {} here", "config data.template: not a valid template"),
    ("data.template=named {0} here", "config data.template: not a valid template"),
    ("data.template=named {name.first} here", "config data.template: not a valid template"),
    ("train.epochs", "override 'train.epochs' must look like section.key=value"),
    ("epochs=3", "override 'epochs=3' must look like section.key=value"),
]


@pytest.mark.parametrize("override, message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_names_the_key(cfg_file, override, message):
    with pytest.raises(AetherError, match=re.escape(message)):
        load_config(cfg_file, [override])


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("train", {"epoch": 3}, "unknown key train.epoch (did you mean train.epochs?)"),
        ("trainer", {"epochs": 3}, "unknown key trainer (did you mean train?)"),
        ("train", {"epochs": "3"}, "config train.epochs: expected int, got '3'"),
        ("train", {"batch_size": True}, "config train.batch_size: expected int, got True"),
        ("loss", {"temperature": [0.1]}, "config loss.temperature: expected float, got [0.1]"),
        ("data", {"base_radius_m": -1}, "config data.base_radius_m:"),
        ("data", {"template": "{name"}, "config data.template:"),
    ],
)
def test_bad_file_value_names_the_key(cfg_file, section, values, message):
    _with(cfg_file, section, **values)
    with pytest.raises(AetherError, match=re.escape(message)):
        load_config(cfg_file)


def test_a_section_that_is_not_a_mapping(cfg_file):
    _write(cfg_file, cfg_file.read_text(encoding="utf-8") + "train: 5\n")
    with pytest.raises(AetherError, match=r"config train must be a mapping, got int"):
        load_config(cfg_file)
    with pytest.raises(AetherError, match=r"config section 'train' must be a mapping"):
        load_config(cfg_file, ["train.epochs=3"])


@pytest.mark.parametrize("key, missing", [("ae_tif", "ae.tif"), ("poi", "pois/p.geojson")])
def test_missing_data_file_names_the_key(cfg_file, key, missing):
    (cfg_file.parent / missing).unlink()
    with pytest.raises(AetherError, match=rf"config data\.{key}: file .* does not exist"):
        load_config(cfg_file)
    assert load_config(cfg_file, check_files=False).data.ae_tif.endswith("ae.tif")


def test_missing_config_file(tmp_path):
    with pytest.raises(AetherError, match=r"config file .*nowhere\.yaml does not exist"):
        load_config(tmp_path / "nowhere.yaml")


@pytest.mark.parametrize(
    "content", [b"data: [unclosed\n  poi: {", b"\xff\xfe\x00garbage\x80"], ids=["syntax", "binary"]
)
def test_a_file_that_is_not_yaml(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(AetherError, match=r"config file .*config\.yaml is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("content", ["- data\n- train\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, content):
    path = _write(tmp_path / "config.yaml", content)
    with pytest.raises(AetherError, match=r"must hold a mapping of sections"):
        load_config(path)


def test_the_config_page_lists_what_the_schema_declares():
    """docs/config.md's table of keys is generated from the schema; a key added, renamed or given
    another default without regenerating it fails here."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
