"""The reference code's config schema (Liu et al., GitHub inwind0212/AETHER), in this project's terms.

`translate_config` turns the reference's config (its config.yaml, or the `hyper_parameters` a
reference checkpoint holds) into this project's sections and keys, saying what each key became;
what cannot be honoured is refused in one line. README "Coming from the reference code" has the
same table.
"""
from __future__ import annotations

import os
from typing import Callable

from aether.errors import AetherError, shown

NATIVE_PIXEL_M = 10.0  # AlphaEarth's pixel: the reference's pixel radii are counted in these
REFERENCE_ETA_MIN_RATIO = 0.01  # the reference's default when train.eta_min_ratio is absent
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0  # the reference clips its logit scales 1 / tau to [1, 100]

# Keys only the reference's schema has: one of them marks a config as the reference's.
_MARKERS = {"data": {"poi_path", "aef_tif", "pix_radius", "aug_pix_radius", "feat_mode", "split_seed", "val_ratio",
                     "test_ratio", "crs"},
            "text": {"hf_model", "openai_model", "emb_dim"},
            "model": {"ae_type", "text_type", "out_dim", "lambda", "tau_img", "tau_xt", "suffix"},
            "logging": None, "eval": None}


def is_reference_config(raw: dict) -> bool:
    """Does this parsed YAML use the reference code's schema?"""
    for section, keys in _MARKERS.items():
        values = raw.get(section)
        if section in raw and keys is None:
            return True
        if isinstance(values, dict) and keys & set(values):
            return True
    return False


def radius_m(pix_radius: int) -> float:
    """Ground radius of the reference's (2r+1) x (2r+1) window of 10 m pixels: r = 4 is 45 m."""
    return (pix_radius + 0.5) * NATIVE_PIXEL_M


def window_text(pix_radius: int) -> str:
    side = 2 * pix_radius + 1
    return f"{side} x {side} pixels of {NATIVE_PIXEL_M:g} m"


def run_folder_name(raw: dict) -> str:
    """The output folder the reference's train.py names after a config (outputs/<this>)."""
    d, m, t = raw.get("data", {}), raw.get("model", {}), raw.get("train", {})
    name = (f"tri2_{str(m.get('ae_type') or 'AE').strip()}-{str(m.get('text_type') or 'Text').strip()}_"
            f"{str(m.get('suffix') or 'nosuf').strip().replace(' ', '')}_"
            f"pix{int(d.get('pix_radius', 0))}-aug{int(d.get('aug_pix_radius', 2))}_"
            f"tau{float(m.get('tau_img', 0.07)):.2f}-{float(m.get('tau_xt', 0.07)):.2f}_"
            f"lam{float(m.get('lambda', 0.0)):.2f}_"
            f"h{int(m.get('hidden_dim', 0))}_l{int(m.get('layers', 1))}_d{int(m.get('out_dim', 128))}_"
            f"bs{int(t.get('batch_size', 0))}_lr{float(m.get('lr', 0.0)):.0e}_epo{int(t.get('epochs', 0))}")
    return name.replace(os.sep, "_")


class _Translation:
    """Builds this project's raw config from the reference's, one key at a time."""

    def __init__(self, raw: dict, say: Callable[[str], None] | None):
        self.raw, self.say = raw, say
        self.out: dict[str, dict] = {s: {} for s in ("data", "text", "model", "loss", "train")}
        self.seen: set[tuple[str, str]] = set()

    def get(self, section: str, key: str, default=None):
        self.seen.add((section, key))
        return self.raw.get(section, {}).get(key, default)

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

    def refuse(self, source: str, why: str) -> None:
        raise AetherError(f"reference config {source}: {why}")

    def number(self, section: str, key: str, kind=float):
        value = self.get(section, key)
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value) if kind is float else _whole(value)
        except (TypeError, ValueError):
            self.refuse(f"{section}.{key}",
                        f"expected a {'number' if kind is float else 'whole number'}, got {shown(value)}")


def _whole(value) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def translate_config(raw: dict, say: Callable[[str], None] | None = None) -> dict:
    """This project's raw config (sections data, text, model, loss, train) for a reference config.

    `say` receives one line per translated or unused key; None translates silently (a
    checkpoint's hyper_parameters). Unknown keys and settings this project cannot honour raise
    an AetherError naming the key.
    """
    for section, values in raw.items():
        if section not in ("data", "text", "model", "train", "eval", "logging"):
            raise AetherError(f"reference config: unknown section {shown(section)} (the reference has data, text, model, "
                              f"train, eval, logging)")
        if not isinstance(values, dict):
            raise AetherError(f"reference config {section}: must be a mapping, got {shown(values)}")
    tr = _Translation(raw, say)
    _data(tr)
    _text(tr)
    _model(tr)
    _train(tr)
    _eval_and_logging(tr)
    unknown = sorted(f"{s}.{k}" for s, values in raw.items() for k in values if (s, k) not in tr.seen)
    if unknown:
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
    if mode != "pixel":
        tr.refuse("data.feat_mode", f"{shown(mode)} is not a mode of the reference code; its only mode is 'pixel' "
                                    f"(a window mean of pixels)")
    for key, target in (("pix_radius", "data.base_radius_m"), ("aug_pix_radius", "data.aug_radius_m")):
        if tr.has("data", key):
            r = tr.number("data", key, int)
            if r < 0:
                tr.refuse(f"data.{key}", f"must be >= 0 pixels, got {r}")
            tr.put(target, radius_m(r), f"data.{key}: {r}", window_text(r))
    if tr.has("data", "split_seed"):
        tr.put("train.seed", tr.number("data", "split_seed", int), "data.split_seed",
               "seeds the spatial split and the training, as the reference's one seed did")
    if tr.has("data", "val_ratio"):
        ratio = tr.number("data", "val_ratio")
        if not 0.0 <= ratio < 1.0:
            tr.refuse("data.val_ratio", f"must be in [0, 1), got {ratio}")
        tr.put("data.val_fraction", ratio, "data.val_ratio",
               "no validation: last.pt holds the final weights, no best.pt is written" if ratio == 0
               else "held out in spatial blocks of data.val_block_m, not at random: random splits leak neighbours")
    if tr.has("data", "test_ratio") and tr.number("data", "test_ratio") > 0:
        tr.refuse("data.test_ratio", f"{tr.get('data', 'test_ratio')} is not supported: AETHER holds out one "
                                     f"spatial validation split (data.val_fraction), which evaluate.py scores; "
                                     f"set test_ratio: 0 and use val_ratio")


def _text(tr: _Translation) -> None:
    backend = tr.get("text", "backend", "hf")
    if backend == "openai":
        model = tr.get("text", "openai_model")
        if not model:
            tr.refuse("text.openai_model", "the openai backend needs a model name, e.g. text-embedding-3-large")
        tr.put("text.backend", "openai", "text.backend: openai")
        tr.put("text.model", str(model), "text.openai_model")
        if tr.has("text", "emb_dim"):
            tr.put("text.dimensions", tr.number("text", "emb_dim", int), "text.emb_dim",
                   "sent to OpenAI as dimensions=")
        tr.get("text", "hf_model")
    elif backend == "hf":
        model = tr.get("text", "hf_model", "sentence-transformers/all-MiniLM-L6-v2")
        tr.put("text.backend", "sentence-transformers", "text.backend: hf",
               "mean-pooled, normalised token embeddings, as the reference's HF encoder")
        tr.put("text.model", str(model), "text.hf_model",
               "texts are cut at the model's own limit (256 word pieces for all-MiniLM-L6-v2), the reference's at 128")
        if tr.has("text", "emb_dim"):
            tr.drop(f"text.emb_dim: {tr.get('text', 'emb_dim')}", "the hf model's own dimension is used")
        tr.get("text", "openai_model")
    else:
        tr.refuse("text.backend", f"must be hf or openai, got {shown(backend)}")
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
    for key, target, kind in (("hidden_dim", "model.hidden_dim", int), ("out_dim", "model.latent_dim", int),
                              ("lambda", "loss.lam", float), ("lr", "train.lr", float),
                              ("weight_decay", "train.weight_decay", float)):
        if tr.has("model", key):
            tr.put(target, tr.number("model", key, kind), f"model.{key}")
    for key, target in (("tau_xt", "loss.temperature"), ("tau_img", "loss.ae_ae_temperature")):
        if tr.has("model", key):
            tau = tr.number("model", key)
            used = min(max(tau, MIN_TEMPERATURE), MAX_TEMPERATURE)  # the reference clips 1/tau to [1, 100]
            tr.put(target, used, f"model.{key}", "" if used == tau else
                   f"{tau:g} clipped to [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], as the reference clips 1 / tau")
    tr.put("loss.learn_temperature", False)
    if tr.has("model", "betas"):
        betas = tr.get("model", "betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            tr.refuse("model.betas", f"expected two numbers, got {shown(betas)}")
        tr.put("train.betas", [float(b) for b in betas], "model.betas")


def _train(tr: _Translation) -> None:
    if tr.has("train", "device"):
        device = str(tr.get("train", "device"))
        ours = "cpu" if device == "cpu" else "auto"
        tr.put("train.device", ours, f"train.device: {device}",
               "CUDA when present, else the CPU, as the reference falls back" if ours == "auto" else "")
    for key, target in (("batch_size", "train.batch_size"), ("epochs", "train.epochs")):
        if tr.has("train", key):
            tr.put(target, tr.number("train", key, int), f"train.{key}")
    ratio = tr.number("train", "eta_min_ratio") if tr.has("train", "eta_min_ratio") else REFERENCE_ETA_MIN_RATIO
    tr.put("train.min_lr_ratio", ratio, "train.eta_min_ratio", "cosine schedule per step down to this x lr")
    tr.put("train.warmup_epochs", 0)  # the reference's schedule has no warmup
    if tr.has("train", "num_workers"):
        tr.drop(f"train.num_workers: {tr.get('train', 'num_workers')}",
                "features are pooled once and held in memory; there is no data loader")


def _eval_and_logging(tr: _Translation) -> None:
    if tr.has("eval", "topk"):
        tr.drop(f"eval.topk: {tr.get('eval', 'topk')}", "evaluate.py reports Recall@1/5/10")
    ckpt_path = tr.get("logging", "ckpt_path", "auto")
    if tr.has("logging", "run_dir"):
        tr.put("train.run_dir", str(tr.get("logging", "run_dir")), "logging.run_dir")
    elif ckpt_path == "auto":
        tr.put("train.run_dir", f"outputs/{run_folder_name(tr.raw)}", "logging.ckpt_path: auto",
               "the folder the reference's train.py names")
    else:
        tr.drop(f"logging.ckpt_path: {ckpt_path}", "the reference's train.py does not use it")
    if tr.has("logging", "cache_dir"):
        tr.put("text.cache_dir", str(tr.get("logging", "cache_dir")), "logging.cache_dir",
               "text embeddings are cached there; pooled windows are recomputed, they take seconds")
    for key, why in (("save_every", "last.pt is written every epoch"), ("save_last", "last.pt is written every epoch"),
                     ("print_val_ii_sims", "metrics.jsonl records both loss terms on the validation split")):
        if tr.has("logging", key):
            tr.drop(f"logging.{key}: {tr.get('logging', key)}", why)
