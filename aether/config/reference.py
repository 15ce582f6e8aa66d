"""The reference code's config schema (Liu et al., GitHub inwind0212/AETHER), in this project's terms.

`translate_config` turns the reference's config (its config.yaml, or the `hyper_parameters` a
reference checkpoint holds) into this project's sections and keys, saying what each key became;
what cannot be honoured is refused in one line. docs/reference-code.md has the
same table.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from aether.core.errors import AetherError, shown
from aether.geo.alphaearth import PIXEL_M  # the reference's pixel radii are counted in these

REFERENCE_ETA_MIN_RATIO = 0.01  # the reference's default when train.eta_min_ratio is absent
# What the reference's train.py uses for a key its config leaves out (its getattr defaults).
REFERENCE_DEFAULTS = {
    "aug_pix_radius": 2,
    "hidden_dim": 256,
    "out_dim": 128,
    "lambda": 0.0,
    "lr": 5e-4,
    "weight_decay": 1e-4,
    "tau_xt": 0.07,
    "tau_img": 0.07,
    "betas": [0.9, 0.999],
}
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0  # the reference clips its logit scales 1 / tau to [1, 100]

# Every key the reference's schema has, by section (what `translate_config` reads or passes over).
REFERENCE_SCHEMA = {
    "data": {
        "poi_path",
        "aef_tif",
        "crs",
        "feat_mode",
        "pix_radius",
        "aug_pix_radius",
        "split_seed",
        "val_ratio",
        "test_ratio",
    },
    "text": {"backend", "hf_model", "openai_model", "emb_dim", "batch_size"},
    "model": {
        "ae_type",
        "text_type",
        "suffix",
        "layers",
        "hidden_dim",
        "out_dim",
        "lambda",
        "lr",
        "weight_decay",
        "tau_xt",
        "tau_img",
        "betas",
    },
    "train": {"device", "batch_size", "epochs", "eta_min_ratio", "num_workers"},
    "eval": {"topk"},
    "logging": {"ckpt_path", "run_dir", "cache_dir", "save_every", "save_last", "print_val_ii_sims"},
}
# Keys only the reference's schema has: one of them marks a config as the reference's.
_MARKERS = {
    "data": {
        "poi_path",
        "aef_tif",
        "pix_radius",
        "aug_pix_radius",
        "feat_mode",
        "split_seed",
        "val_ratio",
        "test_ratio",
        "crs",
    },
    "text": {"hf_model", "openai_model", "emb_dim"},
    "model": {"ae_type", "text_type", "out_dim", "lambda", "tau_img", "tau_xt", "suffix"},
    "logging": None,
    "eval": None,
}


def is_reference_config(raw: dict) -> bool:
    """Does this parsed YAML use the reference code's schema?"""
    for section, keys in _MARKERS.items():
        values = raw.get(section)
        if section in raw and keys is None:
            return True
        if isinstance(values, dict) and keys & set(values):
            return True
    return False


def clipped_temperature(tau: float) -> float:
    """The temperature the reference trains with for a configured `tau`: it clips 1 / tau to [1, 100]."""
    return min(max(tau, MIN_TEMPERATURE), MAX_TEMPERATURE)


def radius_m(pix_radius: int) -> float:
    """Ground radius of the reference's (2r+1) x (2r+1) window of 10 m pixels: r = 4 is 45 m."""
    return (pix_radius + 0.5) * PIXEL_M


def window_text(pix_radius: int) -> str:
    side = 2 * pix_radius + 1
    return f"{side} x {side} pixels of {PIXEL_M:g} m"


def run_folder_name(raw: dict) -> str:
    """The output folder the reference's train.py names after a config (outputs/<this>), with its
    defaults for keys left out (a value that is no number is written as it is)."""
    d, m, t = raw.get("data", {}), raw.get("model", {}), raw.get("train", {})

    def num(section: dict, key: str, default, spec: str) -> str:
        value = section.get(key, default)
        try:
            return format(float(value) if "f" in spec or "e" in spec else int(value), spec)
        except (TypeError, ValueError):
            return str(value)

    name = (
        f"tri2_{str(m.get('ae_type') or 'AE').strip()}-{str(m.get('text_type') or 'Text').strip()}_"
        f"{str(m.get('suffix') or 'nosuf').strip().replace(' ', '')}_"
        f"pix{num(d, 'pix_radius', 0, 'd')}-aug{num(d, 'aug_pix_radius', 2, 'd')}_"
        f"tau{num(m, 'tau_img', 0.07, '.2f')}-{num(m, 'tau_xt', 0.07, '.2f')}_"
        f"lam{num(m, 'lambda', 0.0, '.2f')}_"
        f"h{num(m, 'hidden_dim', 0, 'd')}_l{num(m, 'layers', 1, 'd')}_d{num(m, 'out_dim', 128, 'd')}_"
        f"bs{num(t, 'batch_size', 0, 'd')}_lr{num(m, 'lr', 0.0, '.0e')}_epo{num(t, 'epochs', 0, 'd')}"
    )
    return name.replace(os.sep, "_")


class _Translation:
    """Builds this project's raw config from the reference's, one key at a time."""

    def __init__(self, raw: dict, say: Callable[[str], None] | None, lenient: bool = False):
        self.raw, self.say, self.lenient = raw, say, lenient
        self.out: dict[str, dict] = {s: {} for s in ("data", "text", "model", "loss", "train")}
        self.seen: set[tuple[str, str]] = set()

    def get(self, section: str, key: str, default=None):
        self.seen.add((section, key))
        return self.raw.get(section, {}).get(key, default)

    def ignore(self, section: str, key: str) -> None:
        """Mark a key as read that this translation has no use for here."""
        self.seen.add((section, key))

    def has(self, section: str, key: str) -> bool:
        return key in self.raw.get(section, {})

    def put(self, key: str, value, source: str | None = None, why: str = "") -> None:
        section, name = key.split(".")
        self.out[section][name] = value
        if self.say is not None and source is not None:
            self.say(f"config {source} -> {key}: {shown(value)}" + (f" ({why})" if why else ""))

    def drop(self, source: str, why: str) -> None:
        if self.say is not None:
            self.say(f"config {source}: not used ({why})")

    def refuse(self, source: str, why: str, essential: bool = False) -> None:
        """A setting this project cannot honour: an error, unless the translation is lenient (a
        checkpoint's record of how it was trained, which need not be trainable here) and the
        setting is not `essential` to using the checkpoint."""
        if essential or not self.lenient:
            raise AetherError(f"reference config {source}: {why}")

    def number(self, section: str, key: str, kind=float, default=None, value=None):
        """The setting as a number (`value` when given, else the key's, else `default`); anything
        else is refused, naming the key."""
        value = self.get(section, key, default) if value is None else value
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value) if kind is float else _whole(value)
        except (TypeError, ValueError):
            self.refuse(
                f"{section}.{key}",
                f"expected a {'number' if kind is float else 'whole number'}, got {shown(value)}",
                essential=True,
            )


def _whole(value) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def translate_config(raw: dict, say: Callable[[str], None] | None = None, lenient: bool = False) -> dict:
    """This project's raw config (sections data, text, model, loss, train) for a reference config.

    Keys it leaves out get the reference code's own defaults. `say` receives one line per
    translated or unused key; None translates silently. Unknown keys and settings this project
    cannot honour raise an AetherError naming the key; with `lenient` (a checkpoint's
    hyper_parameters: a record of how it was trained, read to use it, not to train) they are
    passed over, except what using the checkpoint needs (its text encoder and window).
    """
    if lenient:
        raw = {section: values for section, values in raw.items() if isinstance(values, dict)}
    for section, values in raw.items():
        if section not in ("data", "text", "model", "train", "eval", "logging") and not lenient:
            raise AetherError(
                f"reference config: unknown section {shown(section)} (the reference has data, text, "
                f"model, train, eval, logging)"
            )
        if not isinstance(values, dict):
            raise AetherError(f"reference config {section}: must be a mapping, got {shown(values)}")
    tr = _Translation(raw, say, lenient)
    _data(tr)
    _text(tr)
    _model(tr)
    _train(tr)
    _eval_and_logging(tr)
    unknown = sorted(f"{s}.{k}" for s, values in raw.items() for k in values if (s, k) not in tr.seen)
    if unknown and not lenient:
        raise AetherError(f"reference config: unknown key {unknown[0]} (not in the reference code's schema)")
    return {section: values for section, values in tr.out.items() if values}


def _data(tr: _Translation) -> None:
    if tr.has("data", "poi_path"):
        tr.put("data.poi", str(tr.get("data", "poi_path")), "data.poi_path")
    if tr.has("data", "aef_tif"):
        tr.put("data.ae_tif", str(tr.get("data", "aef_tif")), "data.aef_tif")
    tr.put("data.id_column", "id")
    tr.put("data.description_column", "description")
    tr.put("data.template", "A place named {name}.")  # the reference's text for a POI without a description
    if tr.has("data", "crs"):
        tr.drop(f"data.crs: {tr.get('data', 'crs')}", "POIs are reprojected from their file's own CRS to the raster's")
    mode = tr.get("data", "feat_mode", "pixel")
    if str(mode).lower() != "pixel":  # the reference compares it lower-cased
        tr.refuse(
            "data.feat_mode",
            f"{shown(mode)} is not a mode of the reference code; its only mode is 'pixel' (a window mean of pixels)",
        )
    if not tr.has("data", "pix_radius"):
        tr.refuse(
            "data.pix_radius", "is missing; the reference's train.py needs it (4: a 9 x 9 window)", essential=True
        )
    base = tr.number("data", "pix_radius", int)
    aug = tr.number("data", "aug_pix_radius", int, REFERENCE_DEFAULTS["aug_pix_radius"])
    for key, r in (("pix_radius", base), ("aug_pix_radius", aug)):
        if r < 0:
            tr.refuse(f"data.{key}", f"must be >= 0 pixels, got {r}", essential=True)
    tr.put("data.base_radius_m", radius_m(base), f"data.pix_radius: {base}", window_text(base))
    if aug < base:
        tr.refuse(
            "data.aug_pix_radius",
            f"{aug} is smaller than data.pix_radius {base}"
            + ("" if tr.has("data", "aug_pix_radius") else " (the reference's default is 2)")
            + ": the augmented view is the larger window; set aug_pix_radius >= pix_radius",
        )
        aug = base  # lenient: a checkpoint's record; inference uses its base window alone
    tr.put("data.aug_radius_m", radius_m(aug), f"data.aug_pix_radius: {aug}", window_text(aug))
    if tr.has("data", "split_seed"):
        tr.put(
            "train.seed",
            tr.number("data", "split_seed", int),
            "data.split_seed",
            "seeds the spatial split and the training, as the reference's one seed did",
        )
    if tr.has("data", "val_ratio"):
        ratio = tr.number("data", "val_ratio")
        if not 0.0 <= ratio < 1.0:
            tr.refuse("data.val_ratio", f"must be in [0, 1), got {ratio}")
        tr.put(
            "data.val_fraction",
            ratio,
            "data.val_ratio",
            "no validation: last.pt holds the final weights, no best.pt is written"
            if ratio == 0
            else "held out in spatial blocks of data.val_block_m, not at random: random splits leak neighbours",
        )
    if tr.has("data", "test_ratio") and tr.number("data", "test_ratio") > 0:
        tr.refuse(
            "data.test_ratio",
            f"{tr.get('data', 'test_ratio')} is not supported: AETHER holds out one "
            f"spatial validation split (data.val_fraction), which evaluate.py scores; "
            f"set test_ratio: 0 and use val_ratio",
        )


def _text(tr: _Translation) -> None:
    backend = str(tr.get("text", "backend", "hf")).lower()  # the reference compares it lower-cased
    if backend == "openai":
        model = tr.get("text", "openai_model")
        if not model:
            tr.refuse(
                "text.openai_model",
                "the openai backend needs a model name, e.g. text-embedding-3-large",
                essential=True,
            )
        tr.put("text.backend", "openai", "text.backend: openai")
        tr.put("text.model", str(model), "text.openai_model")
        if tr.has("text", "emb_dim"):
            tr.put(
                "text.dimensions", tr.number("text", "emb_dim", int), "text.emb_dim", "sent to OpenAI as dimensions="
            )
        tr.ignore("text", "hf_model")
    elif backend == "hf":
        model = tr.get("text", "hf_model", "sentence-transformers/all-MiniLM-L6-v2")
        tr.put(
            "text.backend",
            "sentence-transformers",
            "text.backend: hf",
            "mean-pooled, normalised token embeddings, as the reference's HF encoder",
        )
        tr.put(
            "text.model",
            str(model),
            "text.hf_model",
            "texts are cut at the model's own limit (256 word pieces for all-MiniLM-L6-v2), the reference's at 128",
        )
        if tr.has("text", "emb_dim"):
            tr.drop(f"text.emb_dim: {tr.get('text', 'emb_dim')}", "the hf model's own dimension is used")
        tr.ignore("text", "openai_model")
    else:
        tr.refuse("text.backend", f"must be hf or openai, got {shown(tr.get('text', 'backend'))}", essential=True)
    if tr.has("text", "batch_size"):
        tr.put("text.batch_size", tr.number("text", "batch_size", int), "text.batch_size")


def _model(tr: _Translation) -> None:
    ae_type, text_type = tr.get("model", "ae_type", "AEProj"), tr.get("model", "text_type", "TextProj")
    if ae_type != "AEProj":
        tr.refuse("model.ae_type", f"{shown(ae_type)} is not the reference's AE projector (AEProj)")
    if text_type != "TextProj":
        tr.refuse("model.text_type", f"{shown(text_type)} is not the reference's text projector (TextProj)")
    tr.put("model.arch", "aether", "model.ae_type/text_type: AEProj/TextProj", "the paper's projectors")
    tr.put("model.dropout", 0.0)  # the reference builds AEProj with its default p_drop = 0
    if tr.has("model", "suffix"):
        tr.drop(f"model.suffix: {tr.get('model', 'suffix')}", "it only names the reference's output folder")
    if tr.has("model", "layers"):
        tr.drop(f"model.layers: {tr.get('model', 'layers')}", "it only names the reference's output folder")
    for key, target, kind in (
        ("hidden_dim", "model.hidden_dim", int),
        ("out_dim", "model.latent_dim", int),
        ("lambda", "loss.lam", float),
        ("lr", "train.lr", float),
        ("weight_decay", "train.weight_decay", float),
    ):
        tr.put(
            target,
            tr.number("model", key, kind, REFERENCE_DEFAULTS[key]),
            f"model.{key}" + ("" if tr.has("model", key) else " (absent: the reference's default)"),
        )
    for key, target in (("tau_xt", "loss.temperature"), ("tau_img", "loss.ae_ae_temperature")):
        tau = tr.number("model", key, float, REFERENCE_DEFAULTS[key])
        used = clipped_temperature(tau)
        tr.put(
            target,
            used,
            f"model.{key}",
            ""
            if used == tau
            else f"{tau:g} clipped to [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], as the reference clips 1 / tau",
        )
    tr.put("loss.learn_temperature", False)
    betas = tr.get("model", "betas", REFERENCE_DEFAULTS["betas"])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        tr.refuse("model.betas", f"expected two numbers, got {shown(betas)}", essential=True)
    tr.put("train.betas", [tr.number("model", "betas", float, value=b) for b in betas], "model.betas")


def _train(tr: _Translation) -> None:
    if tr.has("train", "device"):
        device = str(tr.get("train", "device"))
        ours = "cpu" if device == "cpu" else "auto"
        tr.put(
            "train.device",
            ours,
            f"train.device: {device}",
            "CUDA when present, else the CPU, as the reference falls back" if ours == "auto" else "",
        )
    for key, target in (("batch_size", "train.batch_size"), ("epochs", "train.epochs")):
        if tr.has("train", key):
            tr.put(target, tr.number("train", key, int), f"train.{key}")
    ratio = tr.number("train", "eta_min_ratio") if tr.has("train", "eta_min_ratio") else REFERENCE_ETA_MIN_RATIO
    tr.put("train.min_lr_ratio", ratio, "train.eta_min_ratio", "cosine schedule per step down to this x lr")
    tr.put("train.warmup_epochs", 0)  # the reference's schedule has no warmup
    if tr.has("train", "num_workers"):
        tr.drop(
            f"train.num_workers: {tr.get('train', 'num_workers')}",
            "features are pooled once and held in memory; there is no data loader",
        )


def _eval_and_logging(tr: _Translation) -> None:
    if tr.has("eval", "topk"):
        tr.drop(f"eval.topk: {tr.get('eval', 'topk')}", "evaluate.py reports Recall@1/5/10")
    ckpt_path = tr.get("logging", "ckpt_path", "auto")
    if tr.has("logging", "run_dir"):
        tr.put("train.run_dir", str(tr.get("logging", "run_dir")), "logging.run_dir")
    else:  # the reference's train.py writes there whatever logging.ckpt_path says
        tr.put(
            "train.run_dir",
            f"outputs/{run_folder_name(tr.raw)}",
            f"logging.ckpt_path: {shown(ckpt_path)}",
            "the folder the reference's train.py names" + ("" if ckpt_path == "auto" else "; it ignores ckpt_path"),
        )
    if tr.has("logging", "cache_dir"):
        tr.put(
            "text.cache_dir",
            str(tr.get("logging", "cache_dir")),
            "logging.cache_dir",
            "text embeddings are cached there; pooled windows are recomputed, they take seconds",
        )
    for key, why in (
        ("save_every", "last.pt is written every epoch"),
        ("save_last", "last.pt is written every epoch"),
        ("print_val_ii_sims", "metrics.jsonl records both loss terms on the validation split"),
    ):
        if tr.has("logging", key):
            tr.drop(f"logging.{key}: {tr.get('logging', key)}", why)
