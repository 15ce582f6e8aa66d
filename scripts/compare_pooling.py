"""How close per-pixel inference (--pooling pixel, the reference code's) is to window inference
(the default: what the projector saw in training), on one raster and checkpoint.

    python scripts/compare_pooling.py --ckpt ckpts/helsinki/best.pt [--ae_tif data/AE/helsinki_standin_ae_int8.tif]
        [--queries docs/example_queries.txt]

Prints the cosine between the two AETHER vectors of each pixel (percentiles), and for each query
how many of the 1% best-scoring pixels the two maps share.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import rasterio

from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from aether.model.embed import embed_texts
from aether.model.projector import Projector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--ae_tif", default="data/AE/helsinki_standin_ae_int8.tif")
    parser.add_argument("--queries", default="docs/example_queries.txt")
    args = parser.parse_args()

    maps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pooling in ("window", "pixel"):
            out = embed_raster(
                args.ae_tif,
                args.ckpt,
                str(Path(tmp) / f"{pooling}.tif"),
                progress=False,
                options=EmbedOptions(pooling=pooling, dtype="float32", precision="fp32", device="cpu"),
            )
            with rasterio.open(out) as src:
                maps[pooling] = src.read().reshape(src.count, -1).T
    valid = np.isfinite(maps["window"]).all(axis=1) & np.isfinite(maps["pixel"]).all(axis=1)
    window, pixel = maps["window"][valid], maps["pixel"][valid]
    cosine = np.einsum("ij,ij->i", window, pixel)
    pct = np.percentile(cosine, [1, 5, 50, 95])
    print(
        f"{valid.sum():,} pixels valid in both; cosine(window, pixel): mean {cosine.mean():.3f}, "
        f"1st / 5th / 50th / 95th percentile {pct[0]:.3f} / {pct[1]:.3f} / {pct[2]:.3f} / {pct[3]:.3f}"
    )
    queries = [
        q.strip()
        for q in Path(args.queries).read_text(encoding="utf-8").splitlines()
        if q.strip() and not q.startswith("#")
    ]
    texts = embed_texts(Projector(args.ckpt, device="cpu", precision="fp32"), queries)
    top = max(1, len(window) // 100)
    for query, t in zip(queries, texts):
        best = [set(np.argpartition(-(m @ t), top)[:top]) for m in (window, pixel)]
        print(f"{query!r}: the 1% best pixels ({top:,}) of the two maps share {len(best[0] & best[1]) / top:.0%}")


if __name__ == "__main__":
    main()
