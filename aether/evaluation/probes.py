"""Linear probes: AlphaEarth against AETHER (and an untrained AETHER) features on the same points
and the same spatially blocked folds, for the POI's category group and for land use per pixel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.features import rasterize
from rasterio.windows import Window
from tqdm.auto import tqdm

from aether.core.errors import AetherError, first_line
from aether.data.dataset import spatial_blocks
from aether.geo.pooling import pool_points
from aether.geo.raster import RasterInfo
from aether.model.architectures import AetherModel

LANDUSE_WINDOW_ROWS = 512  # rows of the land-use grid rasterized at a time


LANDUSE_PIXELS_PER_CLASS = 500


LANDUSE_MIN_PIXELS = 50


PROBE_SEED = 0


FEATURES = ("alphaearth", "aether", "untrained")


@dataclass
class ProjectorPair:
    """AE and text projectors under one name, as functions from inputs to unit latent vectors."""

    name: str
    model: AetherModel

    @torch.no_grad()
    def ae(self, vectors: np.ndarray, batch: int = 65536) -> np.ndarray:
        out = [
            self.model.ae(torch.from_numpy(np.ascontiguousarray(vectors[i : i + batch], dtype=np.float32)))
            for i in range(0, len(vectors), batch)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.ae.out_dim), np.float32)

    @torch.no_grad()
    def text(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.text(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))).numpy()


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


def linear_probe(
    features: dict[str, np.ndarray], labels: np.ndarray, folds: np.ndarray, progress: bool = False, desc: str = "probe"
) -> dict[str, float]:
    """Macro-F1 of out-of-fold predictions of standardised logistic regression, per feature set.

    Every feature set is fitted and tested on the same folds (one `folds` array for all);
    classes are weighted by inverse frequency. BLAS runs single-threaded here: beside
    PyTorch's thread pool, a multi-threaded BLAS makes these small fits 40 times slower.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

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


def landuse_samples(
    layer,
    column: str,
    info: RasterInfo,
    per_class: int,
    min_pixels: int,
    seed: int,
    window_rows: int = LANDUSE_WINDOW_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and class labels of up to `per_class` pixels of each class with at least
    `min_pixels` pixels, the polygons burnt into the raster's grid (pixel centres; a smaller
    polygon wins where polygons overlap), sampled with `seed`, `window_rows` rows at a time."""
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
    for r0 in range(0, info.height, window_rows):
        h = min(window_rows, info.height - r0)
        window = rasterize(
            shapes,
            out_shape=(h, info.width),
            fill=0,
            dtype="uint16",
            transform=rasterio.windows.transform(Window(0, r0, info.width, h), transform),
        )
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


def category_group_probe(
    keys: np.ndarray,
    lon: np.ndarray,
    lat: np.ndarray,
    features: dict[str, np.ndarray],
    min_pois: int,
    block_m: float,
    folds: int,
    progress: bool,
) -> dict | None:
    """Macro-F1 of predicting the category group (OSM key) of held-out POIs from each feature set."""
    groups = sorted(g for g in set(keys) if g and int(np.sum(keys == g)) >= min_pois)
    if len(groups) < 2:
        return None
    rows = np.flatnonzero(np.isin(keys, groups))
    fold_of = spatial_folds(lon[rows], lat[rows], block_m, folds, PROBE_SEED)
    if len(np.unique(fold_of)) < 2:
        return None
    scores = linear_probe(
        {name: x[rows] for name, x in features.items()}, keys[rows], fold_of, progress, "probe: POI category group"
    )
    return {"n": len(rows), "classes": groups, "folds": int(len(np.unique(fold_of))), "macro_f1": scores}


def landuse_probe(
    layer,
    column: str,
    info: RasterInfo,
    base_radius_m: float,
    pairs: dict[str, ProjectorPair],
    block_m: float,
    folds: int,
    progress: bool,
) -> dict | None:
    """Macro-F1 of predicting land use per pixel from the base-window AlphaEarth mean and its projections."""
    from pyproj import Transformer

    rows, cols, labels = landuse_samples(layer, column, info, LANDUSE_PIXELS_PER_CLASS, LANDUSE_MIN_PIXELS, PROBE_SEED)
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
    scores = linear_probe(
        {"alphaearth": feats, "aether": pairs["trained"].ae(feats), "untrained": pairs["untrained"].ae(feats)},
        labels[ok],
        fold_of,
        progress,
        "probe: land use",
    )
    return {
        "n": int(ok.sum()),
        "classes": sorted(set(labels[ok])),
        "folds": int(len(np.unique(fold_of))),
        "macro_f1": scores,
    }
