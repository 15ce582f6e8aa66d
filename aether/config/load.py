"""From a YAML file and `--set section.key=value` overrides to a checked `Config`: the reference
code's config translated (`aether.config.reference`), relative paths resolved, the data files
checked, every mistake one line naming the key."""

from __future__ import annotations

import logging
import typing
from pathlib import Path

import yaml

from aether.config.reference import REFERENCE_SCHEMA, is_reference_config, translate_config
from aether.config.schema import SECTIONS, Config, validate_config
from aether.core.errors import AetherError, first_line, shown
from aether.geo.gdal import is_remote
from aether.geo.tiles import expand_tiles, is_tile_set

logger = logging.getLogger(__name__)


def load_config(path: str | Path | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, validate, resolve paths.

    Relative paths are taken from the config file's folder; in a reference-code config, from the
    working folder, as the reference's train.py takes them. A reference config's overrides may
    use its own key names (`data.aef_tif`), or this project's.
    """
    raw: dict = {}
    base = Path.cwd()
    overrides = [_split_override(item) for item in overrides]
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        if is_reference_config(raw):
            theirs = [o for o in overrides if o[1] in REFERENCE_SCHEMA.get(o[0], ())]
            overrides = [o for o in overrides if o not in theirs]
            for section, name, value in theirs:
                _set(raw, section, name, value.parsed if isinstance(value, _OverrideText) else value)
            logger.info(f"config {path} is in the reference code's schema (inwind0212/AETHER); it reads as:")
            raw = translate_config(raw, say=lambda line: logger.info(f"  {line}"))
        else:
            base = path.resolve().parent
    for section, name, value in overrides:
        _set(raw, section, name, value)
    cfg = validate_config(_typed_overrides(raw))
    _resolve_paths(cfg, base)
    if check_files:
        _check_files(cfg)
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config saved in a checkpoint (already resolved)."""
    return validate_config(raw)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise AetherError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:  # ValueError: an int of > 4,300 digits
        raise AetherError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise AetherError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return raw


class _OverrideText(str):
    """An override's text, with its YAML reading: a key that takes text gets the text as typed
    (so `data.template={name}` stays a string), other keys get the parsed value."""

    parsed: object


def _split_override(item: str) -> tuple[str, str, _OverrideText]:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise AetherError(f"override {shown(item)} must look like section.key=value, e.g. train.epochs=3")
    section, _, name = key.strip().partition(".")
    text = _OverrideText(value.strip())
    try:
        text.parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):
        text.parsed = value.strip()
    return section, name, text


def _set(raw: dict, section: str, name: str, value) -> None:
    if not isinstance(raw.setdefault(section, {}), dict):
        raise AetherError(f"config section {shown(section)} must be a mapping")
    raw[section][name] = value


def _typed_overrides(raw: dict) -> dict:
    """The raw config with each override's value as its key takes it: the typed text for a key
    that takes text, its YAML reading for any other (an unknown key keeps its reading, for the
    schema to name)."""
    out = {}
    for section, values in raw.items():
        model = Config.model_fields.get(section)
        if not isinstance(values, dict):
            out[section] = values
            continue
        fields = model.annotation.model_fields if model is not None else {}
        out[section] = {}
        for name, value in values.items():
            if isinstance(value, _OverrideText):
                field = fields.get(name)
                takes_text = field is not None and str in (field.annotation, *typing.get_args(field.annotation))
                value = str(value) if takes_text and value.parsed is not None else value.parsed
            out[section][name] = value
    return out


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


def _check_files(cfg: Config) -> None:
    for key in ("ae_tif", "poi"):
        value = getattr(cfg.data, key)
        if key == "ae_tif" and is_tile_set(value):
            expand_tiles(value, "config data.ae_tif: tile")  # refuses an empty or unreadable set
        elif not is_remote(value) and not Path(value).exists():
            raise AetherError(f"config data.{key}: file {value} does not exist")
    if cfg.train.init_from is not None and not Path(cfg.train.init_from).is_file():
        raise AetherError(f"config train.init_from: checkpoint {cfg.train.init_from} does not exist")
