"""The training configuration's schema, declared with pydantic: every key's type, default, range
and meaning, in one place (the config reference in docs/config.md is generated from it).

Values are strict (a YAML string is not a number, true is not 1); a range or cross-key rule is
a validator whose message becomes the one line a user reads ("config train.epochs: must be >= 1,
got 0"), through `validate_config`, which turns pydantic's errors into an AetherError naming the
key, the first one only.
"""

from __future__ import annotations

import difflib
import math
import string
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from aether.core.errors import AetherError, shown
from aether.text.templates import DEFAULT_TEMPLATE, template_fields

ARCHS = ("aether", "mlp")  # the architectures aether.model.architectures builds
MAX_WIDTH = 16384  # model.latent_dim and hidden_dim: a 16,384-wide layer is already 1 GiB of fp32 weights
BACKENDS = ("sentence-transformers", "openai")
DEVICES = ("auto", "cpu", "cuda")
SECTIONS = ("data", "text", "model", "loss", "train")


def rule(holds: Callable[[Any], bool], message: str) -> AfterValidator:
    """A key's rule: `holds(value)`, else `message` (with {value} filled in, as `shown` quotes it)."""

    def check(value):
        if not holds(value):
            raise PydanticCustomError("aether", message.replace("{value}", "{shown}"), {"shown": shown(value)})
        return value

    return AfterValidator(check)


def _yaml_float(value):
    """YAML 1.1 reads 1e-4 (no decimal point) as text: such text is the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_yaml_float)]


def one_of(choices: tuple[str, ...]) -> AfterValidator:
    return rule(lambda v: v in choices, f"must be one of {', '.join(choices)}, got {{value}}")


def _check_template(template: str) -> str:
    try:
        list(string.Formatter().parse(template))  # malformed braces raise ValueError here
        fields = template_fields(template)  # refuses widths that would fill memory, before format() tries them
        template.format(**{k: "x" for k in fields})
    except (ValueError, KeyError, IndexError) as exc:
        raise PydanticCustomError("aether", "not a valid template ({error})", {"error": str(exc)}) from None
    except AetherError as exc:
        raise PydanticCustomError("aether", "{error}", {"error": str(exc)}) from None
    return template


def _cross(key: str, message: str) -> PydanticCustomError:
    """A rule between keys of one section, reported on `key`."""
    return PydanticCustomError("aether_key", message, {"key": key})


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    ae_tif: str = Field(
        "data/AE/helsinki_standin_ae_int8.tif",
        description="AlphaEarth raster (GeoTIFF, VRT or URL), or a set of tiles (a glob or .txt list)",
    )
    poi: str = Field(
        "data/poi/helsinki_poi.geojson",
        description="POI file (GeoJSON, GeoPackage, GeoParquet, Shapefile, or CSV with lon/lat)",
    )
    n_bands: Annotated[int, rule(lambda v: v >= 1, "must be at least 1, got {value}")] = Field(
        64, description="bands of the AlphaEarth raster"
    )
    id_column: str = Field("osm_id", description="POI id column (the row number where absent; duplicates are refused)")
    description_column: str = Field("description", description="POI text column (else the template is used)")
    template: Annotated[str, AfterValidator(_check_template)] = Field(
        DEFAULT_TEMPLATE, description="text for POIs without a description, from their columns"
    )
    lon_column: str = Field("lon", description="CSV longitude column")
    lat_column: str = Field("lat", description="CSV latitude column")
    poi_crs: str | None = Field(
        None,
        description="CRS of the POI file's coordinates, overriding any it declares "
        "(null: its own; a CSV's: degrees, EPSG:4326)",
    )
    base_radius_m: Annotated[Number, rule(lambda v: v >= 0, "must be >= 0 metres, got {value}")] = Field(
        45.0, description="ground radius of the base view's window (45 m: 9 x 9 pixels of 10 m)"
    )
    aug_radius_m: Number = Field(95.0, description="ground radius of the augmented view's window, >= base_radius_m")
    val_fraction: Annotated[
        Number, rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0: no validation), got {value}")
    ] = Field(
        0.2,
        description="share of POIs held out for validation, in spatial blocks; "
        "0: none (no best.pt, last.pt holds the final weights)",
    )
    val_block_m: Annotated[Number, rule(lambda v: v > 0, "must be > 0 metres, got {value}")] = Field(
        250.0, description="side of the spatial blocks the validation split holds out whole"
    )

    @model_validator(mode="after")
    def _windows(self):
        if self.aug_radius_m < self.base_radius_m:
            raise _cross(
                "aug_radius_m", f"must be >= data.base_radius_m ({self.base_radius_m}), got {self.aug_radius_m}"
            )
        return self


class TextConfig(_Section):
    backend: Annotated[str, one_of(BACKENDS)] = Field("sentence-transformers", description="text encoder backend")
    model: str = Field("all-MiniLM-L6-v2", description="text model (the packaged MiniLM works offline)")
    dimensions: Annotated[int | None, rule(lambda v: v is None or v > 0, "must be > 0 or null, got {value}")] = Field(
        None, description="openai only: the embedding size asked for"
    )
    base_url: str | None = Field(None, description="openai only: another OpenAI-compatible endpoint")
    batch_size: Annotated[int, rule(lambda v: v >= 1, "must be >= 1, got {value}")] = Field(
        64, description="texts encoded per batch"
    )
    max_retries: Annotated[int, rule(lambda v: v >= 0, "must be >= 0, got {value}")] = Field(
        6, description="openai only: retries of a failed request (the client's own, with backoff)"
    )
    request_timeout_s: Annotated[Number, rule(lambda v: v > 0, "must be > 0 seconds, got {value}")] = Field(
        60.0, description="openai only: seconds a request may take"
    )
    device: Annotated[str, one_of(DEVICES)] = Field("auto", description="where sentence-transformers runs")
    cache_dir: str = Field(
        "data/cache",
        description="folder of the on-disk text embedding cache (SQLite; keyed by backend, model, dimensions and text)",
    )

    @model_validator(mode="after")
    def _openai_only(self):
        if self.dimensions is not None and self.backend != "openai":
            raise _cross("dimensions", "applies to the openai backend only; set it to null")
        return self


class ModelConfig(_Section):
    arch: Annotated[str, one_of(ARCHS)] = Field(
        "aether", description="aether: the paper's projectors; mlp: a GELU MLP on both sides"
    )
    latent_dim: Annotated[int, rule(lambda v: 1 <= v <= MAX_WIDTH, f"must be in [1, {MAX_WIDTH:,}], got {{value}}")] = (
        Field(128, description="size of the shared latent space (AETHER raster bands; at most 16,384)")
    )
    hidden_dim: Annotated[int, rule(lambda v: 1 <= v <= MAX_WIDTH, f"must be in [1, {MAX_WIDTH:,}], got {{value}}")] = (
        Field(256, description="aether: the AE post-MLP's hidden width; mlp: both MLPs' (at most 16,384)")
    )
    dropout: Annotated[Number, rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1), got {value}")] = Field(
        0.5, description="dropout in the MLPs"
    )
    gate: bool = Field(True, description="aether: the AE shortcut is scaled by a learned sigmoid gate")


class LossConfig(_Section):
    lam: Annotated[Number, rule(lambda v: 0.0 <= v <= 1.0, "lambda must be in [0, 1], got {value}")] = Field(
        0.2, description="lambda: weight of the AE-AE term (1 - lambda: the AE-POI term)"
    )
    temperature: Annotated[Number, rule(lambda v: v > 0, "must be > 0, got {value}")] = Field(
        0.07, description="temperature of the AE-POI term (the reference's tau_xt)"
    )
    ae_ae_temperature: Annotated[
        Number | None, rule(lambda v: v is None or v > 0, "must be > 0 or null (null: loss.temperature), got {value}")
    ] = Field(None, description="temperature of the AE-AE term (the reference's tau_img); null: loss.temperature")
    learn_temperature: bool = Field(False, description="learn both temperatures")
    min_temperature: Number = Field(0.01, description="a learned temperature's floor")

    @model_validator(mode="after")
    def _floor(self):
        lowest = min(self.temperature, self.ae_ae_temperature or self.temperature)
        if not 0 < self.min_temperature <= lowest:
            raise _cross(
                "min_temperature", f"must be in (0, {lowest:g}] (the lowest temperature), got {self.min_temperature}"
            )
        return self


class TrainConfig(_Section):
    epochs: Annotated[int, rule(lambda v: v >= 1, "must be >= 1, got {value}")] = Field(10, description="epochs")
    batch_size: Annotated[
        int, rule(lambda v: v >= 2, "must be >= 2 (a contrastive batch needs negatives), got {value}")
    ] = Field(
        256,
        description="the global contrastive batch (capped at the training set's size; "
        "under torchrun, shared among the processes)",
    )
    lr: Annotated[Number, rule(lambda v: v > 0, "must be > 0, got {value}")] = Field(1e-3, description="AdamW's rate")
    weight_decay: Annotated[Number, rule(lambda v: v >= 0, "must be >= 0, got {value}")] = Field(
        0.1, description="AdamW's weight decay"
    )
    betas: Annotated[
        list[Number],
        rule(lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "must be two numbers in [0, 1), got {value}"),
    ] = Field(default_factory=lambda: [0.9, 0.999], description="AdamW's betas")
    warmup_epochs: Annotated[int, rule(lambda v: v >= 0, "must be >= 0, got {value}")] = Field(
        1, description="epochs of linear warmup before the cosine schedule"
    )
    min_lr_ratio: Annotated[Number, rule(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1], got {value}")] = Field(
        0.0, description="the cosine schedule ends at this x lr (the reference's eta_min_ratio)"
    )
    seed: Annotated[
        int, rule(lambda v: 0 <= v <= 2**32 - 1, "must be in [0, 2**32 - 1] (NumPy's seeds), got {value}")
    ] = Field(0, description="seeds the split, the initialisation and the shuffles")
    device: Annotated[str, one_of(DEVICES)] = Field("auto", description="auto: CUDA when present, else the CPU")
    run_dir: str = Field("ckpts/helsinki", description="folder of best.pt, last.pt and metrics.jsonl")
    init_from: str | None = Field(
        None, description="a checkpoint (either format) whose projectors training starts from"
    )


class Config(BaseModel):
    """The whole configuration: one section per part of the work."""

    model_config = ConfigDict(strict=True, extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return self.model_dump()


def validate_config(raw: dict) -> Config:
    """The Config `raw` describes, or an AetherError naming the first key that is wrong and why."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise AetherError(_message(first)) from None


def _message(error: dict) -> str:
    loc, kind, value = error["loc"], error["type"], error.get("input")
    path = ".".join(str(part) for part in loc if not isinstance(part, int))
    key = path + "".join(f"[{part}]" for part in loc if isinstance(part, int))
    if kind == "extra_forbidden":
        *section, name = [str(part) for part in loc]
        known = list(_model_at(section).model_fields)
        prefix = "".join(f"{s}." for s in section)
        name = name if len(name) <= 80 else name[:80] + "..."
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(known)})"
        return f"config: unknown key {prefix}{name}{hint}"
    if kind == "model_type":
        return f"config {key or 'file'} must be a mapping, got {type(value).__name__}"
    if kind == "aether":
        return f"config {key}: {error['msg']}"
    if kind == "aether_key":
        return f"config {key}.{error['ctx']['key']}: {error['msg']}"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"config {key}: must be a finite number, got {value}"
    if kind == "list_type":
        return f"config {key}: expected a list, got {shown(value)}"
    return f"config {key}: expected {_type_names(loc)}, got {shown(value)}"


def _model_at(section: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for name in section:
        model = model.model_fields[name].annotation
    return model


def _type_names(loc: tuple) -> str:
    """What a key takes, as messages say it: int, float, bool, str, or 'int or null'."""
    names = [str(part) for part in loc if not isinstance(part, int)]
    annotation = _model_at(names[:-1]).model_fields[names[-1]].annotation
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    if isinstance(loc[-1], int):  # an item of a list
        text = text.split("[", 1)[-1].rstrip("]")
    for old, new in (
        ("typing.", ""),
        ("Annotated[", ""),
        ("<class '", ""),
        ("'>", ""),
        (" | None", " or null"),
        ("NoneType", "null"),
    ):
        text = text.replace(old, new)
    return text.split(",")[0].strip()
