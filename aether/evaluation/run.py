"""Evaluation of a checkpoint on the held-out POIs of its own spatial split, against baselines.

Every metric is reported for the trained projector pair, for an untrained pair of the
same shape (initialised as training initialises it, seed `train.seed`) and for chance
(computed exactly, not sampled):

- cross-modal retrieval: text-to-AE and AE-to-text Recall@1/5/10 and MRR;
- category retrieval: one query per category (key=value) with enough held-out POIs,
  ranked over all held-out POI locations; average precision per category, and its mean;
- localisation: each held-out POI's own description against every pixel of the AETHER map
  within a search radius of the POI; the distance from the best pixel to the POI;
- linear probes, AlphaEarth versus AETHER features on the same points and the same spatially
  blocked folds: the POI's category group (OSM key), and land use per pixel when a layer is given.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aether.core.errors import AetherError
from aether.core.files import atomic_write_text, check_writable_dir, file_sha256
from aether.data.dataset import build_dataset
from aether.data.poi import read_poi_frame, render_description, template_fields
from aether.evaluation.localisation import localisation
from aether.evaluation.probes import (
    LANDUSE_MIN_PIXELS,
    PROBE_SEED,
    ProjectorPair,
    category_group_probe,
    landuse_probe,
    read_landuse,
)
from aether.evaluation.report import MODELS, metrics_markdown, standard_notes
from aether.evaluation.scores import average_precision, chance_average_precision, chance_retrieval, retrieval_metrics
from aether.geo.raster import open_raster
from aether.geo.tiles import is_tile_set
from aether.model.architectures import untrained_model
from aether.model.embed import check_raster, text_encoder_of
from aether.model.projector import Projector
from aether.text.cache import EmbeddingCache, encode_texts

logger = logging.getLogger(__name__)

DEFAULT_CATEGORY_TEMPLATE = "A place of {value}, a type of {key}."
CATEGORY_FIELDS = ("key", "value")  # POI columns a category is made of, as the POI files spell them
SEARCH_RADIUS_M = 500.0
MAX_SEARCH_RADIUS_M = 50_000.0
MIN_CATEGORY_POIS = 5
FOLDS = 5


def _poi_categories(cfg, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(key, value) of each POI id from the POI file, or None when it has no such columns."""
    frame = read_poi_frame(cfg.data.poi, cfg.data.lon_column, cfg.data.lat_column, cfg.data.poi_crs)
    if not all(c in frame.columns for c in CATEGORY_FIELDS):
        return None
    if cfg.data.id_column in frame.columns:
        row_of = {str(v): i for i, v in enumerate(frame[cfg.data.id_column])}
    else:
        row_of = {str(i): i for i in range(len(frame))}
    rows = np.array([row_of[str(i)] for i in ids])

    def column(name: str) -> np.ndarray:
        values = frame[name].to_numpy()[rows]
        return np.array(
            ["" if v is None or (isinstance(v, float) and v != v) else str(v).strip() for v in values], dtype=object
        )

    return column("key"), column("value")


@dataclass(frozen=True)
class EvalOptions:
    """What `evaluate` measures beyond retrieval: `landuse` (a polygon layer, with its class in
    `landuse_column`) adds the land-use probe; localisation searches `search_radius_m` around each
    POI; categories with at least `min_category_pois` held-out POIs are queried (as
    `category_template` words them); probes use `folds` spatially blocked folds. `ae_tif` and
    `poi` replace the files the checkpoint's config names (moved, or another copy). `text` False
    measures only what needs no text (the linear probes): offline, whatever the checkpoint's text
    encoder (the authors' models need OpenAI for the rest)."""

    landuse: str | None = None
    landuse_column: str = "landuse"
    search_radius_m: float = SEARCH_RADIUS_M
    min_category_pois: int = MIN_CATEGORY_POIS
    folds: int = FOLDS
    category_template: str = DEFAULT_CATEGORY_TEMPLATE
    ae_tif: str | None = None
    poi: str | None = None
    text: bool = True

    def check(self) -> EvalOptions:
        """Refuse, before any work, options evaluation cannot run with; returns itself."""
        if not 0 < self.search_radius_m <= MAX_SEARCH_RADIUS_M:
            raise AetherError(
                f"--search-radius-m must be in (0, {MAX_SEARCH_RADIUS_M:,.0f}] metres, got {self.search_radius_m}"
            )
        if self.min_category_pois < 2:
            raise AetherError(f"--min-category-pois must be at least 2, got {self.min_category_pois}")
        if self.folds < 2:
            raise AetherError(f"--folds must be at least 2, got {self.folds}")
        try:
            fields = template_fields(self.category_template)
            self.category_template.format(**{f: "x" for f in fields})
        except (ValueError, KeyError, IndexError) as exc:
            raise AetherError(f"--category-template is not a valid template ({exc})") from None
        unknown = sorted(set(fields) - set(CATEGORY_FIELDS))
        if unknown:
            raise AetherError(f"--category-template uses {unknown}; a category only has {{key}} and {{value}}")
        return self


def evaluate(
    ckpt: str | Path, out_dir: str | Path | None = None, options: EvalOptions | None = None, progress: bool = True
) -> dict:
    """Evaluate `ckpt` on its own held-out POIs, as `options` ask; write metrics.json and metrics.md
    into `out_dir` (default: `eval` beside the checkpoint) and return the metrics."""
    started = time.time()
    options = (options or EvalOptions()).check()
    ckpt = Path(ckpt)
    projector = Projector(ckpt, device="cpu", precision="fp32")
    cfg = projector.checkpoint.config
    out_dir = Path(out_dir) if out_dir is not None else ckpt.resolve().parent / "eval"
    check_writable_dir(out_dir, "output folder")
    _point_at_data(cfg, options)
    layer = read_landuse(options.landuse, options.landuse_column) if options.landuse is not None else None
    info = open_raster(cfg.data.ae_tif, projector.n_bands)
    check_raster(projector, info)
    if options.text:
        info.check_window(options.search_radius_m, fix="use a smaller --search-radius-m")  # the localisation disc
    encoder = text_encoder_of(projector.checkpoint) if options.text else None
    dataset, info, encoder = build_dataset(cfg, encoder=encoder, progress=progress, with_text=options.text)
    if options.text and dataset.text.shape[1] != projector.checkpoint.text.dim:
        raise AetherError(
            f"text embeddings have {dataset.text.shape[1]} dimensions; the checkpoint expects "
            f"{projector.checkpoint.text.dim}"
        )
    val = _held_out(cfg, dataset, projector)
    pairs = {
        "trained": ProjectorPair("trained", projector.checkpoint.build_model()),
        "untrained": ProjectorPair(
            "untrained", untrained_model(projector.n_bands, projector.checkpoint.text.dim, cfg, cfg.train.seed)
        ),
    }
    base = dataset.base[val]
    ae_z = {name: pair.ae(base) for name, pair in pairs.items()}
    categories = _poi_categories(cfg, dataset.pois.ids[val])
    notes = []
    if categories is None:
        notes.append(f"POI file has no {' and '.join(CATEGORY_FIELDS)} columns: no category retrieval or probe.")
    measured = {"retrieval": None, "category_retrieval": None, "localisation": None}
    if options.text:
        measured = _text_metrics(
            dataset, val, info, projector, pairs, ae_z, categories, encoder, options, notes, progress
        )
    else:
        notes.append(
            "Measured without text (--no-text): no retrieval, category retrieval or localisation, only the "
            "linear probes on AlphaEarth and AETHER features."
        )
    probes = _probes(dataset, val, info, projector, pairs, ae_z, categories, layer, options, notes, progress)
    notes += standard_notes(info, probes["landuse"] is not None)
    metrics = {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": file_sha256(ckpt),
        "epoch": projector.checkpoint.epoch,
        "data": {
            "ae_tif": cfg.data.ae_tif,
            "poi": cfg.data.poi,
            "pois": len(dataset),
            "held_out": int(len(val)),
            "val_block_m": cfg.data.val_block_m,
            "val_fraction": cfg.data.val_fraction,
            "seed": cfg.train.seed,
        },
        **measured,
        "probes": probes,
        "notes": notes,
        "elapsed_s": round(time.time() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "metrics.md", metrics_markdown(metrics))
    logger.info(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}; {metrics['elapsed_s']:.1f} s")
    return metrics


def _point_at_data(cfg, options: EvalOptions) -> None:
    """Point the checkpoint's config at the raster and POIs `options` give (moved since training),
    and refuse, before any work, a set of tiles or a file that is not there."""
    for key, value in (("ae_tif", options.ae_tif), ("poi", options.poi)):
        if value is not None:
            setattr(cfg.data, key, str(Path(value).resolve()))
        path = getattr(cfg.data, key)
        if key == "ae_tif" and is_tile_set(path):
            raise AetherError(
                f"evaluation works on one raster, and {path} names a set of tiles; pass --ae_tif with "
                f"one tile (or a VRT of tiles in one UTM zone)"
            )
        if not Path(path).exists():
            origin = (
                "given" if value is not None else "named by the checkpoint's config; pass --" + key + " if it moved"
            )
            raise AetherError(f"{key} file {path} does not exist ({origin})")


def _held_out(cfg, dataset, projector: Projector) -> np.ndarray:
    """The rows evaluated: the checkpoint's own held-out POIs, or every POI (said so) for a
    checkpoint trained without a validation split or with the reference code's random one."""
    if cfg.data.val_fraction == 0 or projector.checkpoint.origin == "reference":
        # trained without validation, or with the reference code's own random split, which is not rebuilt here
        val = np.arange(len(dataset))
        why = (
            "the checkpoint was trained without a validation split (data.val_fraction = 0)"
            if cfg.data.val_fraction == 0
            else "the reference code's random validation split is not rebuilt here"
        )
        logger.info(
            f"{why}: evaluating on all {len(val)} POIs of {cfg.data.poi}; on the POIs it was trained on, these are "
            f"training figures"
        )
    else:
        val = np.flatnonzero(dataset.is_val)
        logger.info(
            f"evaluating on {len(val)} held-out POIs (of {len(dataset)}; spatial blocks of {cfg.data.val_block_m:g} m, "
            f"seed {cfg.train.seed})"
        )
    if len(val) < 2:
        raise AetherError(f"the checkpoint's split holds {len(val)} held-out POIs; evaluation needs at least 2")
    return val


def _text_metrics(dataset, val, info, projector, pairs, ae_z, categories, encoder, options, notes, progress) -> dict:
    """What needs the POIs' text: cross-modal retrieval, category retrieval and localisation."""
    text_z = {name: pair.text(dataset.text[val]) for name, pair in pairs.items()}
    retrieval = {name: retrieval_metrics(text_z[name], ae_z[name]) for name in pairs}
    retrieval["chance"] = chance_retrieval(len(val))
    category_result = None
    if categories is not None:
        cfg = projector.checkpoint.config
        category_result = category_retrieval(
            *categories, ae_z, pairs, encoder, cfg, options.category_template, options.min_category_pois
        )
        if category_result is None:
            notes.append(f"no category has {options.min_category_pois} or more held-out POIs: no category retrieval.")
    loc = localisation(
        info,
        dataset.pois.x[val],
        dataset.pois.y[val],
        dataset.pois.lat[val],
        projector.base_radius_m,
        text_z,
        pairs,
        options.search_radius_m,
        progress,
    )
    return {
        "retrieval": retrieval,
        "category_retrieval": category_result,
        "localisation": {"search_radius_m": options.search_radius_m, **loc},
    }


def _probes(dataset, val, info, projector, pairs, ae_z, categories, layer, options, notes, progress) -> dict:
    """The linear probes, AlphaEarth against AETHER features: the POIs' category group, and land
    use per pixel when a layer is given."""
    block_m = projector.checkpoint.config.data.val_block_m
    probe_group = None
    if categories is not None:
        probe_group = category_group_probe(
            categories[0],
            dataset.pois.lon[val],
            dataset.pois.lat[val],
            {"alphaearth": dataset.base[val], "aether": ae_z["trained"], "untrained": ae_z["untrained"]},
            options.min_category_pois,
            block_m,
            options.folds,
            progress,
        )
        if probe_group is None:
            notes.append("too few held-out POIs, category groups or spatial blocks for the category-group probe.")
    probe_landuse = None
    if layer is not None:
        probe_landuse = landuse_probe(
            layer, options.landuse_column, info, projector.base_radius_m, pairs, block_m, options.folds, progress
        )
        if probe_landuse is None:
            notes.append(
                f"land-use layer {options.landuse}: fewer than 2 classes with {LANDUSE_MIN_PIXELS} pixels on the "
                f"raster, or one spatial block: no land-use probe."
            )
        else:
            probe_landuse.update(file=str(Path(options.landuse).resolve()), column=options.landuse_column)
    return {"poi_category_group": probe_group, "landuse": probe_landuse, "seed": PROBE_SEED, "block_m": block_m}


def category_retrieval(
    keys: np.ndarray,
    values: np.ndarray,
    ae_z: dict[str, np.ndarray],
    pairs: dict[str, ProjectorPair],
    encoder,
    cfg,
    template: str,
    min_pois: int,
) -> dict | None:
    """Average precision of each category's template query over all held-out POI locations, per pair
    and chance; None when no category has `min_pois` held-out POIs."""
    counts: dict[tuple[str, str], int] = {}
    for kv in zip(keys, values):
        if all(kv):
            counts[kv] = counts.get(kv, 0) + 1
    chosen = sorted(kv for kv, c in counts.items() if c >= min_pois)
    if not chosen:
        return None
    queries = [render_description(template, {"key": k, "value": v}) for k, v in chosen]
    cache = EmbeddingCache(cfg.text.cache_dir)
    try:
        query_emb, _ = encode_texts(encoder, queries, cache, cfg.text.batch_size, progress=False)
    finally:
        cache.close()
    n = len(keys)
    per_category = []
    for (k, v), query, emb in zip(chosen, queries, query_emb):
        relevant = (keys == k) & (values == v)
        ap = {name: average_precision(ae_z[name] @ pair.text(emb[None])[0], relevant) for name, pair in pairs.items()}
        ap["chance"] = chance_average_precision(n, int(relevant.sum()))
        per_category.append({"category": f"{k}={v}", "n": int(relevant.sum()), "query": query, "ap": ap})
    return {
        "n_categories": len(per_category),
        "min_pois": min_pois,
        "template": template,
        "categories": per_category,
        "map": {m: float(np.mean([c["ap"][m] for c in per_category])) for m in MODELS},
    }
