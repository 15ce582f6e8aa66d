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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from tqdm.auto import tqdm

from aether.model.checkpoint import model_from_checkpoint
from aether.core.log import log
from aether.data.dataset import build_dataset, spatial_blocks
from aether.core.errors import AetherError, first_line
from aether.core.files import atomic_write_text, file_sha256
from aether.model.metrics import mean_reciprocal_rank, recall_at_k
from aether.model.architectures import AetherModel
from aether.data.poi import read_poi_frame, render_description, template_fields
from aether.geo.pooling import pool_points
from aether.geo.raster import RasterInfo, ground_distances_m, open_raster
from aether.geo.tiles import is_tile_set

DEFAULT_CATEGORY_TEMPLATE = "A place of {value}, a type of {key}."
CATEGORY_FIELDS = ("key", "value")  # POI columns a category is made of, as the POI files spell them
KS = (1, 5, 10)
DISTANCES_M = (50, 100, 250)
SEARCH_RADIUS_M = 500.0
MAX_SEARCH_RADIUS_M = 50_000.0
LANDUSE_WINDOW_ROWS = 512  # rows of the land-use grid rasterized at a time
MIN_CATEGORY_POIS = 5
FOLDS = 5
LANDUSE_PIXELS_PER_CLASS = 500
LANDUSE_MIN_PIXELS = 50
CANDIDATES_PER_BATCH = 500_000  # candidate pixels pooled and projected at once in localisation
PROBE_SEED = 0
MODELS = ("trained", "untrained", "chance")
FEATURES = ("alphaearth", "aether", "untrained")


@dataclass
class ProjectorPair:
    """AE and text projectors under one name, as functions from inputs to unit latent vectors."""

    name: str
    model: AetherModel

    @torch.no_grad()
    def ae(self, vectors: np.ndarray, batch: int = 65536) -> np.ndarray:
        out = [self.model.ae(torch.from_numpy(np.ascontiguousarray(vectors[i:i + batch], dtype=np.float32)))
               for i in range(0, len(vectors), batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.ae.out_dim), np.float32)

    @torch.no_grad()
    def text(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.text(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))).numpy()


def untrained_model(n_bands: int, text_dim: int, cfg, seed: int) -> AetherModel:
    """A projector pair of the checkpoint's shape, initialised as `train` initialises it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AetherModel.from_config(cfg, n_bands, text_dim)
    return model.eval()


# ----- ranking metrics and their chance values -----

def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over relevant items of the precision at their score.

    Tied scores are one cut-off: every item scoring at least as high counts as ranked
    above (as scikit-learn's average_precision_score), so ties never help.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if not relevant.any():
        raise ValueError("average precision needs at least one relevant item")
    order = np.argsort(-scores, kind="stable")
    s, rel = scores[order], relevant[order]
    hits = np.cumsum(rel)
    # the last position of each run of tied scores is where that run's cut-off lies
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    run_end = np.repeat(last, np.diff(np.r_[-1, last]))
    precision = hits[run_end] / (run_end + 1)
    return float(precision[rel].mean())


def chance_recall(n: int, k: int) -> float:
    """Recall@k of a random ranking of n targets: k / n (at most 1)."""
    return min(1.0, k / n)


def chance_mrr(n: int) -> float:
    """Mean reciprocal rank of a random ranking of n targets: H_n / n."""
    return float(np.sum(1.0 / np.arange(1, n + 1)) / n)


def chance_average_precision(n: int, n_relevant: int) -> float:
    """Expected average precision of a uniformly random ranking of n items, n_relevant of them relevant.

    E[AP] = H_n / n + (R - 1) / (n (n - 1)) * (n - H_n); it is 1 / n * H_n for R = 1 and 1 for R = n.
    """
    if not 1 <= n_relevant <= n:
        raise ValueError(f"need 1 <= relevant <= n, got {n_relevant} of {n}")
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    if n == 1:
        return 1.0
    return harmonic / n + (n_relevant - 1) / (n * (n - 1)) * (n - harmonic)


def retrieval_metrics(text_z: np.ndarray, ae_z: np.ndarray) -> dict[str, float]:
    """Text-to-AE and AE-to-text Recall@k and MRR; row i of each is the same POI."""
    t, a = torch.from_numpy(text_z), torch.from_numpy(ae_z)
    out = {}
    for name, q, d in (("t2ae", t, a), ("ae2t", a, t)):
        out.update({f"{name}_r{k}": v for k, v in recall_at_k(q, d, KS).items()})
        out[f"{name}_mrr"] = mean_reciprocal_rank(q, d)
    return out


def chance_retrieval(n: int) -> dict[str, float]:
    out = {}
    for name in ("t2ae", "ae2t"):
        out.update({f"{name}_r{k}": chance_recall(n, k) for k in KS})
        out[f"{name}_mrr"] = chance_mrr(n)
    return out


# ----- spatial folds and linear probes -----

def spatial_folds(lon: np.ndarray, lat: np.ndarray, block_m: float, n_folds: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each point; whole square blocks of side `block_m` go to one fold.

    Blocks are laid on the same local metric grid as the validation split, shuffled with
    `seed`, then dealt largest first to the fold with the fewest points so folds are about
    equal. k is at most the number of blocks.
    """
    n_blocks, block_of = spatial_blocks(lon, lat, block_m)
    sizes = np.bincount(block_of, minlength=n_blocks)
    shuffled = np.random.default_rng(seed).permutation(n_blocks)
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    k = min(n_folds, n_blocks)
    fold_of_block = np.empty(n_blocks, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for b in order:
        f = int(np.argmin(load))
        fold_of_block[b] = f
        load[f] += sizes[b]
    return fold_of_block[block_of]


def linear_probe(features: dict[str, np.ndarray], labels: np.ndarray, folds: np.ndarray,
                 progress: bool = False, desc: str = "probe") -> dict[str, float]:
    """Macro-F1 of out-of-fold predictions of standardised logistic regression, per feature set.

    Every feature set is fitted and tested on the same folds (one `folds` array for all);
    classes are weighted by inverse frequency. BLAS runs single-threaded here: beside
    PyTorch's thread pool, a multi-threaded BLAS makes these small fits 40 times slower.
    """
    from threadpoolctl import threadpool_limits
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    classes = np.unique(labels)
    out = {}
    fold_ids = np.unique(folds)
    bar = tqdm(total=len(features) * len(fold_ids), desc=desc, unit="fit", disable=not progress)
    for name, x in features.items():
        predicted = np.empty_like(labels)
        for f in fold_ids:
            test = folds == f
            train_labels = labels[~test]
            if len(np.unique(train_labels)) < 2:
                predicted[test] = train_labels[0]
            else:
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
                with threadpool_limits(1, user_api="blas"):
                    clf.fit(x[~test], train_labels)
                    predicted[test] = clf.predict(x[test])
            bar.update(1)
        out[name] = float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0))
    bar.close()
    return out


# ----- localisation -----

def _disc_pixels(info: RasterInfo, x0: float, y0: float, lat_deg: float, radius_m: float):
    """Rows, columns and ground distances of the raster pixels whose centres lie within radius_m."""
    r0, c0 = info.rowcol(np.array([x0]), np.array([y0]))
    rx, ry = info.radius_px(radius_m, lat_deg if info.is_geographic else None)
    rx, ry = int(rx) + 1, int(ry) + 1
    rows = np.arange(max(int(r0[0]) - ry, 0), min(int(r0[0]) + ry + 1, info.height))
    cols = np.arange(max(int(c0[0]) - rx, 0), min(int(c0[0]) + rx + 1, info.width))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    px, py = info.xy(rr, cc)
    dist = ground_distances_m(x0, y0, px, py, info.is_geographic, info.unit_m, lat_deg)
    inside = dist <= radius_m
    return rr[inside], cc[inside], dist[inside]


def localisation(info: RasterInfo, x: np.ndarray, y: np.ndarray, lat: np.ndarray, base_radius_m: float,
                 text_z: dict[str, np.ndarray], pairs: dict[str, ProjectorPair], radius_m: float,
                 progress: bool = True) -> dict[str, dict[str, float]]:
    """Distance from the best-scoring pixel within `radius_m` of each POI to the POI, per pair, and chance.

    Pixel vectors are the base-window means the inference command computes (pooled at
    pixel centres with the checkpoint's base radius, then projected). POIs go in raster
    order, in batches of at most CANDIDATES_PER_BATCH candidate pixels, so memory is
    bounded by the batch. Chance picks a uniformly random valid pixel of the disc; its
    accuracies and mean are exact, its median comes from 1 m bins.
    """
    n = len(x)
    rows, cols = info.rowcol(x, y)
    order = np.lexsort((cols, rows))
    best_m = {name: np.full(n, np.nan) for name in pairs}
    chance_acc = {d: np.zeros(n) for d in DISTANCES_M}
    chance_mean = np.full(n, np.nan)
    bins = np.zeros(int(math.ceil(radius_m)) + 2)
    bar = tqdm(total=n, desc="localisation", unit="POI", disable=not progress)
    start = 0
    while start < n:
        batch, discs, total = [], [], 0
        while start < n and (not batch or total < CANDIDATES_PER_BATCH):
            i = int(order[start])
            disc = _disc_pixels(info, float(x[i]), float(y[i]), float(lat[i]), radius_m)
            batch.append(i)
            discs.append(disc)
            total += len(disc[0])
            start += 1
        flat = np.concatenate([d[0] * info.width + d[1] for d in discs])
        unique_px, inverse = np.unique(flat, return_inverse=True)
        cx, cy = info.xy(unique_px // info.width, unique_px % info.width)
        pooled = pool_points(info, cx, cy, [base_radius_m])  # a geographic raster's y is the latitude
        # scores of every candidate pixel against every query of the batch: (pixels, batch)
        scores = {name: pair.ae(pooled.views[0]) @ text_z[name][batch].T for name, pair in pairs.items()}
        offset = 0
        for j, (i, (_, _, dist)) in enumerate(zip(batch, discs)):
            idx = inverse[offset:offset + len(dist)]
            offset += len(dist)
            ok = pooled.valid[idx]
            if not ok.any():
                continue
            idx, dist = idx[ok], dist[ok]
            for name in pairs:
                best_m[name][i] = dist[int(np.argmax(scores[name][idx, j]))]
            for d in DISTANCES_M:
                chance_acc[d][i] = float(np.mean(dist <= d))
            chance_mean[i] = float(dist.mean())
            bins += np.bincount(np.minimum(dist, radius_m).astype(np.int64), minlength=len(bins))[:len(bins)] / len(dist)
        bar.update(len(batch))
    bar.close()
    scored = ~np.isnan(chance_mean)
    if not scored.any():
        raise AetherError("no held-out POI has a valid pixel within the search radius; check the raster's nodata")
    out = {}
    for name, dists in best_m.items():
        d = dists[scored]
        out[name] = {"median_m": float(np.median(d)), "mean_m": float(d.mean()),
                     **{f"acc_{t}m": float(np.mean(d <= t)) for t in DISTANCES_M}}
    cumulative = np.cumsum(bins) / bins.sum()
    out["chance"] = {"median_m": float(np.searchsorted(cumulative, 0.5) + 0.5),
                     "mean_m": float(chance_mean[scored].mean()),
                     **{f"acc_{t}m": float(chance_acc[t][scored].mean()) for t in DISTANCES_M}}
    out["n"] = int(scored.sum())
    return out


# ----- land use -----

def read_landuse(path: str | Path, column: str):
    """Read a land-use polygon layer and check its class column, before any heavy work."""
    import geopandas

    path = Path(path)
    if not path.is_file():
        raise AetherError(f"land-use file {path} does not exist")
    try:
        layer = geopandas.read_file(path)
    except Exception as exc:  # pyogrio raises its own types
        raise AetherError(f"cannot read land-use file {path}: {first_line(exc)}") from None
    if column not in layer.columns or column == layer.geometry.name:
        known = ", ".join(c for c in layer.columns if c != layer.geometry.name) or "none"
        raise AetherError(f"land-use file {path} has no column {column!r} (columns: {known}); set --landuse-column")
    if layer.crs is None:
        raise AetherError(f"land-use file {path} has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)")
    layer = layer[layer[column].notna() & layer.geometry.notna()]
    layer = layer[layer.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if len(layer) == 0:
        raise AetherError(f"land-use file {path} has no polygons with a value in column {column!r}")
    return layer


def landuse_samples(layer, column: str, info: RasterInfo, per_class: int, min_pixels: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and class labels of up to `per_class` pixels of each class with at least
    `min_pixels` pixels, the polygons burnt into the raster's grid (pixel centres; a smaller
    polygon wins where polygons overlap), sampled with `seed`."""
    from rasterio.features import rasterize

    layer = layer.to_crs(info.crs)
    layer = layer.assign(_area=layer.geometry.area).sort_values("_area", ascending=False, kind="stable")
    classes = np.array(sorted(set(layer[column].astype(str))))
    codes = np.searchsorted(classes, layer[column].astype(str).to_numpy()) + 1
    transform, flip = info.north_up_transform, info.bottom_up  # rasterize north-up, then back to file rows
    shapes = list(zip(layer.geometry, codes.tolist()))
    rng = np.random.default_rng(seed)
    # a uniform sample without replacement, in windows of rows so memory stays bounded: every
    # pixel draws a random key and each class keeps its `per_class` smallest keys
    keys = [np.zeros(0)] * (len(classes) + 1)
    picks = [np.zeros(0, np.int64)] * (len(classes) + 1)
    counts = np.zeros(len(classes) + 1, dtype=np.int64)
    for r0 in range(0, info.height, LANDUSE_WINDOW_ROWS):
        h = min(LANDUSE_WINDOW_ROWS, info.height - r0)
        window = rasterize(shapes, out_shape=(h, info.width), fill=0, dtype="uint16",
                           transform=rasterio.windows.transform(Window(0, r0, info.width, h), transform))
        flat = window.reshape(-1)
        r = rng.random(flat.size)
        counts += np.bincount(flat, minlength=len(classes) + 1)
        for code in np.unique(flat[flat > 0]):
            at = np.flatnonzero(flat == code)
            north_up_rows = r0 + at // info.width
            file_rows = info.height - 1 - north_up_rows if flip else north_up_rows
            k = np.concatenate([keys[code], r[at]])
            i = np.concatenate([picks[code], file_rows * info.width + at % info.width])
            keep = np.argsort(k, kind="stable")[:per_class]
            keys[code], picks[code] = k[keep], i[keep]
    rows, cols, labels = [], [], []
    for code, name in enumerate(classes, start=1):
        if counts[code] < min_pixels:
            continue
        pick = np.sort(picks[code])
        rows.append(pick // info.width)
        cols.append(pick % info.width)
        labels += [name] * len(pick)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype=object)
    return np.concatenate(rows), np.concatenate(cols), np.array(labels, dtype=object)


# ----- the command -----

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
        return np.array(["" if v is None or (isinstance(v, float) and v != v) else str(v).strip() for v in values],
                        dtype=object)

    return column("key"), column("value")


def _check_options(search_radius_m: float, min_category_pois: int, folds: int, category_template: str) -> None:
    if not 0 < search_radius_m <= MAX_SEARCH_RADIUS_M:
        raise AetherError(f"--search-radius-m must be > 0 and at most {MAX_SEARCH_RADIUS_M:g} metres, "
                          f"got {search_radius_m}")
    if min_category_pois < 1:
        raise AetherError(f"--min-category-pois must be at least 1, got {min_category_pois}")
    if folds < 2:
        raise AetherError(f"--folds must be at least 2, got {folds}")
    try:
        fields = template_fields(category_template)
        category_template.format(**{f: "x" for f in fields})
    except (ValueError, KeyError, IndexError) as exc:
        raise AetherError(f"--category-template is not a valid template ({exc})") from None
    unknown = sorted(set(fields) - set(CATEGORY_FIELDS))
    if unknown:
        raise AetherError(f"--category-template uses {unknown}; a category only has {{key}} and {{value}}")


def evaluate(ckpt: str | Path, out_dir: str | Path | None = None, landuse: str | Path | None = None,
             landuse_column: str = "landuse", search_radius_m: float = SEARCH_RADIUS_M,
             min_category_pois: int = MIN_CATEGORY_POIS, folds: int = FOLDS,
             category_template: str = DEFAULT_CATEGORY_TEMPLATE, ae_tif: str | None = None,
             poi: str | None = None, progress: bool = True) -> dict:
    """Evaluate `ckpt` on its own held-out POIs; write metrics.json and metrics.md into `out_dir`
    (default: `eval` beside the checkpoint) and return the metrics."""
    from aether.model.projector import AetherEmbedder
    from aether.train.loop import check_writable_dir

    started = time.time()
    _check_options(search_radius_m, min_category_pois, folds, category_template)
    ckpt = Path(ckpt)
    embedder = AetherEmbedder(ckpt, device="cpu", precision="fp32")
    cfg = embedder.cfg
    out_dir = Path(out_dir) if out_dir is not None else ckpt.resolve().parent / "eval"
    check_writable_dir(out_dir, "output folder")
    for key, value in (("ae_tif", ae_tif), ("poi", poi)):
        if value is not None:
            setattr(cfg.data, key, str(Path(value).resolve()))
        path = getattr(cfg.data, key)
        if key == "ae_tif" and is_tile_set(path):
            raise AetherError(f"evaluate.py works on one raster, and {path} names a set of tiles; pass --ae_tif with "
                              f"one tile (or a VRT of tiles in one UTM zone)")
        if not Path(path).exists():
            origin = "given" if value is not None else "named by the checkpoint's config; pass --" + key + " if it moved"
            raise AetherError(f"{key} file {path} does not exist ({origin})")
    layer = read_landuse(landuse, landuse_column) if landuse is not None else None
    info = open_raster(cfg.data.ae_tif, embedder.n_bands)
    embedder.check_raster(info)
    info.check_window(search_radius_m, fix="use a smaller --search-radius-m")  # the localisation disc

    encoder = embedder.text_encoder()
    dataset, info, encoder = build_dataset(cfg, encoder=encoder, progress=progress)
    if dataset.text.shape[1] != embedder.ckpt["text_encoder"]["dim"]:
        raise AetherError(f"text embeddings have {dataset.text.shape[1]} dimensions; the checkpoint expects "
                          f"{embedder.ckpt['text_encoder']['dim']}")
    if cfg.data.val_fraction == 0 or embedder.ckpt.get("origin") == "reference":
        # trained without validation, or with the reference code's own random split, which is not rebuilt here
        val = np.arange(len(dataset))
        why = ("the checkpoint was trained without a validation split (data.val_fraction = 0)"
               if cfg.data.val_fraction == 0 else "the reference code's random validation split is not rebuilt here")
        log(f"{why}: evaluating on all {len(val)} POIs of {cfg.data.poi}; on the POIs it was trained on, these are "
            f"training figures")
    else:
        val = np.flatnonzero(dataset.is_val)
        log(f"evaluating on {len(val)} held-out POIs (of {len(dataset)}; spatial blocks of {cfg.data.val_block_m:g} m, "
            f"seed {cfg.train.seed})")
    if len(val) < 2:
        raise AetherError(f"the checkpoint's split holds {len(val)} held-out POIs; evaluation needs at least 2")
    pairs = {"trained": ProjectorPair("trained", model_from_checkpoint(embedder.ckpt)[0]),
             "untrained": ProjectorPair("untrained", untrained_model(embedder.n_bands, dataset.text.shape[1], cfg,
                                                                    cfg.train.seed))}
    base, text = dataset.base[val], dataset.text[val]
    ae_z = {name: pair.ae(base) for name, pair in pairs.items()}
    text_z = {name: pair.text(text) for name, pair in pairs.items()}
    notes = []

    retrieval = {name: retrieval_metrics(text_z[name], ae_z[name]) for name in pairs}
    retrieval["chance"] = chance_retrieval(len(val))

    categories = _poi_categories(cfg, dataset.pois.ids[val])
    category_result = probe_group = None
    if categories is None:
        notes.append(f"POI file has no {' and '.join(CATEGORY_FIELDS)} columns: no category retrieval or probe.")
    else:
        keys, values = categories
        category_result = category_retrieval(keys, values, ae_z, pairs, encoder, cfg, category_template,
                                             min_category_pois)
        if category_result is None:
            notes.append(f"no category has {min_category_pois} or more held-out POIs: no category retrieval.")
        probe_group = _category_group_probe(keys, dataset.pois.lon[val], dataset.pois.lat[val],
                                            {"alphaearth": base, "aether": ae_z["trained"],
                                             "untrained": ae_z["untrained"]},
                                            min_category_pois, cfg.data.val_block_m, folds, progress)
        if probe_group is None:
            notes.append("too few held-out POIs, category groups or spatial blocks for the category-group probe.")

    loc = localisation(info, dataset.pois.x[val], dataset.pois.y[val], dataset.pois.lat[val], embedder.base_radius_m,
                       text_z, pairs, search_radius_m, progress)

    probe_landuse = None
    if layer is not None:
        probe_landuse = _landuse_probe(layer, landuse_column, info, embedder.base_radius_m, pairs,
                                       cfg.data.val_block_m, folds, progress)
        if probe_landuse is None:
            notes.append(f"land-use layer {landuse}: fewer than 2 classes with {LANDUSE_MIN_PIXELS} pixels on the "
                         f"raster, or one spatial block: no land-use probe.")
        else:
            probe_landuse.update(file=str(Path(landuse).resolve()), column=landuse_column)

    notes += _standard_notes(info, probe_landuse is not None)
    metrics = {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": file_sha256(ckpt),
        "epoch": embedder.ckpt.get("epoch"),
        "data": {"ae_tif": cfg.data.ae_tif, "poi": cfg.data.poi, "pois": len(dataset), "held_out": int(len(val)),
                 "val_block_m": cfg.data.val_block_m, "val_fraction": cfg.data.val_fraction, "seed": cfg.train.seed},
        "retrieval": retrieval,
        "category_retrieval": category_result,
        "localisation": {"search_radius_m": search_radius_m, **loc},
        "probes": {"poi_category_group": probe_group, "landuse": probe_landuse,
                   "seed": PROBE_SEED, "block_m": cfg.data.val_block_m},
        "notes": notes,
        "elapsed_s": round(time.time() - started, 1),
    }
    table = metrics_markdown(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "metrics.md", table)
    print(table)
    log(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}; {metrics['elapsed_s']:.1f} s")
    return metrics


def category_retrieval(keys: np.ndarray, values: np.ndarray, ae_z: dict[str, np.ndarray],
                       pairs: dict[str, ProjectorPair], encoder, cfg, template: str, min_pois: int) -> dict | None:
    """Average precision of each category's template query over all held-out POI locations, per pair
    and chance; None when no category has `min_pois` held-out POIs."""
    from aether.text.encoders import EmbeddingCache, encode_texts

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
    return {"n_categories": len(per_category), "min_pois": min_pois, "template": template,
            "categories": per_category,
            "map": {m: float(np.mean([c["ap"][m] for c in per_category])) for m in MODELS}}


def _category_group_probe(keys: np.ndarray, lon: np.ndarray, lat: np.ndarray, features: dict[str, np.ndarray],
                          min_pois: int, block_m: float, folds: int, progress: bool) -> dict | None:
    """Macro-F1 of predicting the category group (OSM key) of held-out POIs from each feature set."""
    groups = sorted(g for g in set(keys) if g and int(np.sum(keys == g)) >= min_pois)
    if len(groups) < 2:
        return None
    rows = np.flatnonzero(np.isin(keys, groups))
    fold_of = spatial_folds(lon[rows], lat[rows], block_m, folds, PROBE_SEED)
    if len(np.unique(fold_of)) < 2:
        return None
    scores = linear_probe({name: x[rows] for name, x in features.items()}, keys[rows], fold_of, progress,
                          "probe: POI category group")
    return {"n": len(rows), "classes": groups, "folds": int(len(np.unique(fold_of))), "macro_f1": scores}


def _landuse_probe(layer, column: str, info: RasterInfo, base_radius_m: float, pairs: dict[str, ProjectorPair],
                   block_m: float, folds: int, progress: bool) -> dict | None:
    """Macro-F1 of predicting land use per pixel from the base-window AlphaEarth mean and its projections."""
    from pyproj import Transformer

    rows, cols, labels = landuse_samples(layer, column, info, LANDUSE_PIXELS_PER_CLASS, LANDUSE_MIN_PIXELS,
                                         PROBE_SEED)
    if len(np.unique(labels)) < 2:
        return None
    px, py = info.xy(rows, cols)
    pooled = pool_points(info, px, py, [base_radius_m])  # the window inference gives each pixel
    ok = pooled.valid
    lon, lat = Transformer.from_crs(info.crs, "EPSG:4326", always_xy=True).transform(px[ok], py[ok])
    fold_of = spatial_folds(np.asarray(lon), np.asarray(lat), block_m, folds, PROBE_SEED)
    if len(np.unique(fold_of)) < 2 or len(np.unique(labels[ok])) < 2:
        return None
    feats = pooled.views[0][ok]
    scores = linear_probe({"alphaearth": feats, "aether": pairs["trained"].ae(feats),
                           "untrained": pairs["untrained"].ae(feats)}, labels[ok], fold_of, progress,
                          "probe: land use")
    return {"n": int(ok.sum()), "classes": sorted(set(labels[ok])), "folds": int(len(np.unique(fold_of))),
            "macro_f1": scores}


def _standard_notes(info: RasterInfo, landuse_probe: bool) -> list[str]:
    with rasterio.open(info.path) as src:
        standin = src.tags().get("AETHER_STANDIN") == "true"
    notes = ["The category-group probe uses held-out POIs only: the AETHER projector was trained on the "
             "training POIs' descriptions, which name their category, so features there would leak the label."]
    if standin:
        notes.append("The AlphaEarth raster is a STAND-IN computed from OpenStreetMap layers (land use, natural "
                     "cover, buildings, roads, water), not real AlphaEarth: absolute numbers say little about "
                     "real data.")
    if landuse_probe:
        notes.append("Land-use pixels are sampled over the whole raster: the projectors never saw land-use labels, "
                     "only POI descriptions.")
    if standin and landuse_probe:
        notes.append("The land-use probe on the stand-in is flattered: the stand-in was itself computed from OSM "
                     "land use, so its features encode the labels being predicted.")
    return notes


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def metrics_markdown(m: dict) -> str:
    """The metrics as Markdown: rows metrics, columns trained / untrained / chance; then the probes."""
    n = m["data"]["held_out"]
    lines = [f"Held-out POIs: {n} (spatial blocks of {m['data']['val_block_m']:g} m, seed {m['data']['seed']}); "
             f"checkpoint epoch {m['epoch']}.", "",
             "| metric | trained | untrained | chance |", "|---|---|---|---|"]

    def row(label: str, values: dict, key: str, fmt: Callable = _fmt) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(values[model].get(key)) for model in MODELS) + " |")

    names = {"t2ae": "text-to-AE", "ae2t": "AE-to-text"}
    for d in ("t2ae", "ae2t"):
        for k in KS:
            row(f"{names[d]} Recall@{k}", m["retrieval"], f"{d}_r{k}")
        row(f"{names[d]} MRR", m["retrieval"], f"{d}_mrr")
    c = m["category_retrieval"]
    if c:
        lines.append(f"| category retrieval mAP ({c['n_categories']} categories with >= {c['min_pois']} POIs) | "
                     + " | ".join(_fmt(c["map"][model]) for model in MODELS) + " |")
    loc = m["localisation"]
    r = loc["search_radius_m"]
    for t in DISTANCES_M:
        if t < r:  # at or beyond the search radius every model scores 1: nothing to show
            row(f"localisation: best pixel within {t} m (search radius {r:g} m)", loc, f"acc_{t}m")
    row("localisation: median error (m)", loc, "median_m", lambda v: f"{v:.0f}")
    row("localisation: mean error (m)", loc, "mean_m", lambda v: f"{v:.0f}")
    lines += ["", "| linear probe (macro-F1, spatially blocked folds) | AlphaEarth | AETHER | untrained AETHER |",
              "|---|---|---|---|"]
    labels = {"poi_category_group": "POI category group (OSM key), held-out POIs", "landuse": "land use per pixel"}
    for key, label in labels.items():
        p = m["probes"][key]
        if p:
            lines.append(f"| {label}: {p['n']} points, {len(p['classes'])} classes, {p['folds']} folds | "
                         + " | ".join(_fmt(p["macro_f1"][f]) for f in FEATURES) + " |")
    if m["notes"]:
        lines += [""] + [f"- {note}" for note in m["notes"]]
    return "\n".join(lines) + "\n"
