"""The training configuration: one YAML file, validated before any heavy work.

Every key has a type and a default here; an unknown key, a wrong type, a value out
of range or a missing input file is an AetherError naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aether.core.log import log
from aether.core.errors import AetherError, first_line, shown
from aether.data.poi import DEFAULT_TEMPLATE, template_fields
from aether.geo.raster import is_remote
from aether.config.reference import is_reference_config, translate_config
from aether.geo.tiles import expand_tiles, is_tile_set


@dataclass
class DataConfig:
    ae_tif: str = "data/AE/helsinki_standin_ae_int8.tif"
    poi: str = "data/poi/helsinki_poi.geojson"
    n_bands: int = 64
    id_column: str = "osm_id"
    description_column: str = "description"
    template: str = DEFAULT_TEMPLATE
    lon_column: str = "lon"
    lat_column: str = "lat"
    poi_crs: str | None = None
    base_radius_m: float = 45.0
    aug_radius_m: float = 95.0
    val_fraction: float = 0.2
    val_block_m: float = 250.0


@dataclass
class TextConfig:
    backend: str = "sentence-transformers"
    model: str = "all-MiniLM-L6-v2"
    dimensions: int | None = None
    base_url: str | None = None
    batch_size: int = 64
    max_retries: int = 6
    request_timeout_s: float = 60.0
    device: str = "auto"
    cache_dir: str = "data/cache"


@dataclass
class ModelConfig:
    arch: str = "aether"  # aether: the paper's projectors; mlp: a GELU MLP on both sides (aether.model.architectures)
    latent_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.5
    gate: bool = True  # aether: the AE shortcut is scaled by a learned sigmoid gate


@dataclass
class LossConfig:
    lam: float = 0.2
    temperature: float = 0.07  # of the AE-POI term (the reference's tau_xt)
    ae_ae_temperature: float | None = None  # of the AE-AE term (tau_img); null: loss.temperature
    learn_temperature: bool = False
    min_temperature: float = 0.01


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    warmup_epochs: int = 1
    min_lr_ratio: float = 0.0  # the cosine schedule ends at this x lr (the reference's eta_min_ratio)
    seed: int = 0
    device: str = "auto"
    run_dir: str = "ckpts/helsinki"
    init_from: str | None = None  # a checkpoint (either format) whose projectors training starts from


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ARCHS = ("aether", "mlp")  # the architectures aether.model.architectures builds
MAX_WIDTH = 16384  # model.latent_dim and hidden_dim: a 16,384-wide layer is already 1 GiB of fp32 weights
_BACKENDS = ("sentence-transformers", "openai")
_DEVICES = ("auto", "cpu", "cuda")


def load_config(path: str | Path | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, validate, resolve paths.

    Relative paths are taken from the config file's folder.
    """
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AetherError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:  # ValueError: an int of > 4,300 digits
            raise AetherError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
        if not isinstance(raw, dict):
            raise AetherError(f"config file {path} must hold a mapping of sections (data, text, model, loss, train)")
        if is_reference_config(raw):
            log(f"config {path} is in the reference code's schema (inwind0212/AETHER); it reads as:")
            raw = translate_config(raw, say=lambda line: log(f"  {line}"))
        base = path.resolve().parent
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    _validate(cfg)
    _resolve_paths(cfg, base)
    if check_files:
        for key in ("ae_tif", "poi"):
            value = getattr(cfg.data, key)
            if key == "ae_tif" and is_tile_set(value):
                expand_tiles(value, "config data.ae_tif: tile")  # refuses an empty or unreadable set
            elif not is_remote(value) and not Path(value).exists():
                raise AetherError(f"config data.{key}: file {value} does not exist")
        if cfg.train.init_from is not None and not Path(cfg.train.init_from).is_file():
            raise AetherError(f"config train.init_from: checkpoint {cfg.train.init_from} does not exist")
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config saved in a checkpoint (already resolved)."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


class _OverrideText(str):
    """An override's text, with its YAML reading: a key that takes text gets the text as typed
    (so `data.template={name}` stays a string), other keys get the parsed value."""

    parsed: object


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise AetherError(f"override {shown(item)} must look like section.key=value, e.g. train.epochs=3")
    section, _, name = key.strip().partition(".")
    parsed = _OverrideText(value.strip())
    try:
        parsed.parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):
        parsed.parsed = value.strip()
    if not isinstance(raw.setdefault(section, {}), dict):
        raise AetherError(f"config section {shown(section)} must be a mapping")
    raw[section][name] = parsed


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AetherError(f"config {prefix.rstrip('.') or 'file'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            name = key if isinstance(key, str) else shown(key)
            name = name if len(name) <= 80 else name[:80] + "..."
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise AetherError(f"config: unknown key {prefix}{name}{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], typ, f"{prefix}{name}")
    return cls(**values)


def _coerce(value, typ, key: str):
    if typing.get_origin(typ) is list:
        if isinstance(value, _OverrideText):
            value = value.parsed
        if not isinstance(value, (list, tuple)):
            raise AetherError(f"config {key}: expected a list, got {shown(value)}")
        item = typing.get_args(typ)[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    allowed = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union else (typ,)
    if isinstance(value, _OverrideText):
        value = str(value) if str in allowed and value.parsed is not None else value.parsed
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no decimal point) as text
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(number, key)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise AetherError(f"config {key}: expected {names}, got {shown(value)}")


def _finite(value: float, key: str) -> float:
    """A float setting, refused when it is not finite (inf or nan: no setting means that)."""
    if not math.isfinite(value):
        raise AetherError(f"config {key}: must be a finite number, got {value}")
    return value


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise AetherError(f"config {key}: {message}")


def _validate(cfg: Config) -> None:
    d, t, m, lo, tr = cfg.data, cfg.text, cfg.model, cfg.loss, cfg.train
    _check(d.n_bands >= 1, "data.n_bands", f"must be at least 1, got {d.n_bands}")
    _check(d.base_radius_m >= 0, "data.base_radius_m", f"must be >= 0 metres, got {d.base_radius_m}")
    _check(d.aug_radius_m >= d.base_radius_m, "data.aug_radius_m",
           f"must be >= data.base_radius_m ({d.base_radius_m}), got {d.aug_radius_m}")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction",
           f"must be in [0, 1) (0: no validation), got {d.val_fraction}")
    _check(d.val_block_m > 0, "data.val_block_m", f"must be > 0 metres, got {d.val_block_m}")
    try:
        list(string.Formatter().parse(d.template))  # malformed braces raise ValueError here
        fields = template_fields(d.template)  # refuses widths that would fill memory, before format() tries them
        d.template.format(**{k: "x" for k in fields})
    except (ValueError, KeyError, IndexError) as exc:
        raise AetherError(f"config data.template: not a valid template ({exc})") from None
    except AetherError as exc:
        raise AetherError(f"config data.template: {exc}") from None
    _check(t.backend in _BACKENDS, "text.backend", f"must be one of {', '.join(_BACKENDS)}, got {shown(t.backend)}")
    _check(t.dimensions is None or t.dimensions > 0, "text.dimensions", f"must be > 0 or null, got {t.dimensions}")
    _check(t.dimensions is None or t.backend == "openai", "text.dimensions",
           "applies to the openai backend only; set it to null")
    _check(t.batch_size >= 1, "text.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.max_retries >= 0, "text.max_retries", f"must be >= 0, got {t.max_retries}")
    _check(t.request_timeout_s > 0, "text.request_timeout_s", f"must be > 0 seconds, got {t.request_timeout_s}")
    _check(t.device in _DEVICES, "text.device", f"must be one of {', '.join(_DEVICES)}, got {shown(t.device)}")
    _check(m.arch in ARCHS, "model.arch", f"must be one of {', '.join(ARCHS)}, got {shown(m.arch)}")
    _check(1 <= m.latent_dim <= MAX_WIDTH, "model.latent_dim", f"must be in [1, {MAX_WIDTH:,}], got {shown(m.latent_dim)}")
    _check(1 <= m.hidden_dim <= MAX_WIDTH, "model.hidden_dim", f"must be in [1, {MAX_WIDTH:,}], got {shown(m.hidden_dim)}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(0.0 <= lo.lam <= 1.0, "loss.lam", f"lambda must be in [0, 1], got {lo.lam}")
    _check(lo.temperature > 0, "loss.temperature", f"must be > 0, got {lo.temperature}")
    _check(lo.ae_ae_temperature is None or lo.ae_ae_temperature > 0, "loss.ae_ae_temperature",
           f"must be > 0 or null (null: loss.temperature), got {lo.ae_ae_temperature}")
    lowest = min(lo.temperature, lo.ae_ae_temperature or lo.temperature)
    _check(0 < lo.min_temperature <= lowest, "loss.min_temperature",
           f"must be in (0, {lowest:g}] (the lowest temperature), got {lo.min_temperature}")
    _check(tr.epochs >= 1, "train.epochs", f"must be >= 1, got {tr.epochs}")
    _check(0 <= tr.seed <= 2**32 - 1, "train.seed", f"must be in [0, 2**32 - 1] (NumPy's seeds), got {shown(tr.seed)}")
    _check(tr.batch_size >= 2, "train.batch_size", f"must be >= 2 (a contrastive batch needs negatives), got {tr.batch_size}")
    _check(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
    _check(tr.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {tr.weight_decay}")
    _check(len(tr.betas) == 2 and all(0.0 <= b < 1.0 for b in tr.betas), "train.betas",
           f"must be two numbers in [0, 1), got {shown(tr.betas)}")
    _check(0.0 <= tr.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {tr.min_lr_ratio}")
    _check(tr.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {tr.warmup_epochs}")
    _check(tr.device in _DEVICES, "train.device", f"must be one of {', '.join(_DEVICES)}, got {shown(tr.device)}")


def _resolve_paths(cfg: Config, base: Path) -> None:
    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() or is_remote(p) else (base / p))

    cfg.data.ae_tif = resolve(cfg.data.ae_tif)
    cfg.data.poi = resolve(cfg.data.poi)
    cfg.text.cache_dir = resolve(cfg.text.cache_dir)
    cfg.train.run_dir = resolve(cfg.train.run_dir)
    if cfg.train.init_from is not None:
        cfg.train.init_from = resolve(cfg.train.init_from)
    # A text model given as a local folder is resolved too; a hub name is left alone.
    if (base / cfg.text.model).exists():
        cfg.text.model = resolve(cfg.text.model)
