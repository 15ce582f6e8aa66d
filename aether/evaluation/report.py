"""The evaluation's report: a Markdown table of every metric, and the notes that qualify it."""

from __future__ import annotations

from collections.abc import Callable

import rasterio

from aether.evaluation.localisation import DISTANCES_M
from aether.evaluation.probes import FEATURES
from aether.geo.raster import RasterInfo
from aether.model.metrics import KS

MODELS = ("trained", "untrained", "chance")


def standard_notes(info: RasterInfo, landuse_probe: bool) -> list[str]:
    with rasterio.open(info.path) as src:
        standin = src.tags().get("AETHER_STANDIN") == "true"
    notes = [
        "The category-group probe uses held-out POIs only: the AETHER projector was trained on the "
        "training POIs' descriptions, which name their category, so features there would leak the label."
    ]
    if standin:
        notes.append(
            "The AlphaEarth raster is a STAND-IN computed from OpenStreetMap layers (land use, natural "
            "cover, buildings, roads, water), not real AlphaEarth: absolute numbers say little about "
            "real data."
        )
    if landuse_probe:
        notes.append(
            "Land-use pixels are sampled over the whole raster: the projectors never saw land-use labels, "
            "only POI descriptions."
        )
    if standin and landuse_probe:
        notes.append(
            "The land-use probe on the stand-in is flattered: the stand-in was itself computed from OSM "
            "land use, so its features encode the labels being predicted."
        )
    return notes


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def metrics_markdown(m: dict) -> str:
    """The metrics as Markdown: rows metrics, columns trained / untrained / chance; then the probes."""
    n = m["data"]["held_out"]
    lines = [
        f"Held-out POIs: {n} (spatial blocks of {m['data']['val_block_m']:g} m, seed {m['data']['seed']}); "
        f"checkpoint epoch {m['epoch']}.",
        "",
        "| metric | trained | untrained | chance |",
        "|---|---|---|---|",
    ]

    def row(label: str, values: dict, key: str, fmt: Callable = _fmt) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(values[model].get(key)) for model in MODELS) + " |")

    names = {"t2ae": "text-to-AE", "ae2t": "AE-to-text"}
    if m["retrieval"] is not None:
        for d in ("t2ae", "ae2t"):
            for k in KS:
                row(f"{names[d]} Recall@{k}", m["retrieval"], f"{d}_r{k}")
            row(f"{names[d]} MRR", m["retrieval"], f"{d}_mrr")
    c = m["category_retrieval"]
    if c:
        lines.append(
            f"| category retrieval mAP ({c['n_categories']} categories with >= {c['min_pois']} POIs) | "
            + " | ".join(_fmt(c["map"][model]) for model in MODELS)
            + " |"
        )
    loc = m["localisation"]
    if loc is not None:
        r = loc["search_radius_m"]
        for t in DISTANCES_M:
            if t < r:  # at or beyond the search radius every model scores 1: nothing to show
                row(f"localisation: best pixel within {t} m (search radius {r:g} m)", loc, f"acc_{t}m")
        row("localisation: median error (m)", loc, "median_m", lambda v: f"{v:.0f}")
        row("localisation: mean error (m)", loc, "mean_m", lambda v: f"{v:.0f}")
    if len(lines) == 4:  # measured without text: no table of text metrics
        lines = lines[:1]
    lines += [
        "",
        "| linear probe (macro-F1, spatially blocked folds) | AlphaEarth | AETHER | untrained AETHER |",
        "|---|---|---|---|",
    ]
    labels = {"poi_category_group": "POI category group (OSM key), held-out POIs", "landuse": "land use per pixel"}
    for key, label in labels.items():
        p = m["probes"][key]
        if p:
            lines.append(
                f"| {label}: {p['n']} points, {len(p['classes'])} classes, {p['folds']} folds | "
                + " | ".join(_fmt(p["macro_f1"][f]) for f in FEATURES)
                + " |"
            )
    if m["notes"]:
        lines += [""] + [f"- {note}" for note in m["notes"]]
    return "\n".join(lines) + "\n"
