"""What a search writes into its output folder: per query a similarity GeoTIFF, the best places
as GeoJSON and a PNG heatmap (`aether.retrieval.heatmap`), an index of the queries, and for a
task of a search at scale its candidates; all written atomically, under the folder's lock."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.warp import transform as warp_transform

from aether.core.files import atomic_write, atomic_write_text, folder_lock, temp_file_beside
from aether.geo.raster import RasterInfo
from aether.retrieval.topk import TopCandidates

logger = logging.getLogger(__name__)


CANDIDATES = "candidates.npz"  # a tile's top candidates per query, for merging tiles


LOCK = ".retrieve.lock"  # held in the output folder while a search writes there


@dataclass
class QueryResult:
    query: str
    tif: Path
    geojson: Path | None
    png: Path | None
    hits: list[dict]


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe version of a query."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "query"


_PARTIAL = re.compile(
    r"\.(q\d+_[a-z0-9-]*\.(tif|geojson|png)\.\w{8}\.partial\.(tif|geojson|png)"
    r"|(q\d+_[a-z0-9-]*\.vrt|queries\.json|candidates\.npz|run\.json)\.\w{8}\.tmp)"
)


def remove_stale_partials(out: Path) -> None:
    """Remove the partial files an earlier search into `out` left when it was killed (this run holds
    the folder's lock, so no live search owns them)."""
    stale = [p for p in out.iterdir() if _PARTIAL.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info(f"removed {len(stale)} partial files of an earlier interrupted search in {out}")


class CandidateFile:
    """`candidates.npz` written a pass at a time (each query's best pixels in lon/lat, as
    `candidate_arrays` lays them out), so no more than one pass's candidates are held; it
    appears, whole, when the block ends without an error."""

    def __init__(self, path: Path, info: RasterInfo):
        self.path, self.info = path, info

    def __enter__(self) -> CandidateFile:
        import zipfile

        self._file = atomic_write(self.path)
        self._zip = zipfile.ZipFile(self._file.__enter__(), "w", allowZip64=True)  # np.savez's layout
        return self

    def add(self, first: int, candidates: list[TopCandidates]) -> None:
        for i, arrays in enumerate(candidate_arrays(self.info, candidates), start=first):
            for key, array in arrays.items():
                with self._zip.open(f"{key}_{i}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def __exit__(self, *exc) -> None:
        self._zip.close()
        self._file.__exit__(*exc)


def output_files(out: Path, names: list[str]) -> list[Path]:
    """Every file a search of the queries `names` may write into `out` (which are written depends
    on the kind of search): per query its map, mosaic, places and heatmap; the index; a task's
    candidates and run record."""
    files = [out / "queries.json", out / CANDIDATES, out / "run.json"]
    return files + [out / f"{name}{ext}" for name in names for ext in (".tif", ".vrt", ".geojson", ".png")]


def output_folder_lock(out: Path):
    """The lock a search holds in its output folder (created if missing, removed if left empty)."""
    return folder_lock(out, LOCK, f"output folder {out}", "choose another --out folder")


def candidate_arrays(info: RasterInfo, candidates: list[TopCandidates]):
    """Per query, its best pixels as candidates.npz holds them: score, lon, lat, order (row * width + col)."""
    for cands in candidates:
        scores, rows, cols = cands.final()
        x, y = info.xy(rows, cols)
        lon, lat = warp_transform(info.crs, "EPSG:4326", x.tolist(), y.tolist()) if len(x) else ([], [])
        yield {"score": scores, "lon": np.asarray(lon), "lat": np.asarray(lat), "order": rows * info.width + cols}


def query_names(queries: list[str]) -> list[str]:
    width = max(2, len(str(len(queries))))
    return [f"q{i:0{width}d}_{slug(q)}" for i, q in enumerate(queries, start=1)]


def write_geojson(path: Path, query: str, hits: list[dict], temps: list[Path]) -> Path:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [h["lon"], h["lat"]]},
            "properties": {"query": query, **{k: v for k, v in h.items() if k not in ("lon", "lat")}},
        }
        for h in hits
    ]
    fd, tmp = temp_file_beside(path, ".partial.geojson")
    temps.append(tmp)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f, ensure_ascii=False, indent=1)
    return tmp


def write_index(out: Path, results: list[QueryResult], source: str, ckpt: str, top_k: int, nms_m: float) -> None:
    index = {
        "source": str(source),
        "checkpoint": str(ckpt),
        "top_k": top_k,
        "nms_radius_m": nms_m,
        "queries": [
            {
                "query": r.query,
                "tif": r.tif.name,
                "geojson": r.geojson.name,
                "png": r.png.name if r.png else None,
                "best_score": r.hits[0]["score"] if r.hits else None,
            }
            for r in results
        ],
    }
    atomic_write_text(out / "queries.json", json.dumps(index, ensure_ascii=False, indent=1))
