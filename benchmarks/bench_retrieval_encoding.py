"""How stored AETHER rasters rank against retrieval on the fly, for each output type.

Embeds one AlphaEarth raster with one checkpoint as int8, int16 and float32 AETHER rasters, runs
the same queries on each (`retrieve.py --emb`) and from the AlphaEarth raster itself
(`--ae_tif`, the reference), and prints per output type: how many of the on-the-fly top-10
places each run finds (the same pixel, and within 10 m), the largest score error over every
pixel, and the file size.

    python benchmarks/bench_retrieval_encoding.py --ae_tif ../shared/data/real_ae/appleton_wi_2024_ae_4326_int8.tif \\
        --ckpt ckpts/helsinki/best.pt [--queries docs/example_queries.txt]

Target: top-10 agreement >= 9/10 and score error <= 0.001 for the recommended stored type.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import machine

from aether.infer.spec import EmbedOptions
from aether.retrieval.search import SearchOptions

QUERIES = [
    "quiet cafes near water",
    "a park with trees",
    "a shopping street with many shops",
    "a school",
    "a parking lot",
    "a supermarket",
    "a church",
    "a restaurant",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ae_tif", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--queries", help="a file with one query per line (default: eight built-in queries)")
    args = parser.parse_args()

    import rasterio

    from aether.geo.raster import metres_per_degree, open_raster
    from aether.infer.pipeline import embed_raster
    from aether.infer.spec import available_dtypes
    from aether.retrieval.search import read_queries, retrieve

    queries = read_queries(args.queries) if args.queries else QUERIES
    info = open_raster(args.ae_tif)
    if info.is_geographic:
        lat = float(np.mean(info.latitude_range()))
        m_lat, m_lon = metres_per_degree(np.asarray(lat))
        scale = np.array([abs(info.transform.e) * float(m_lat), abs(info.transform.a) * float(m_lon)])
    else:
        scale = np.array([abs(info.transform.e), abs(info.transform.a)]) * info.unit_m
    print(f"machine: {machine()}")
    print(f"raster: {args.ae_tif} ({info.width} x {info.height} px); checkpoint {args.ckpt}; {len(queries)} queries")
    options = dict(device="cpu", precision="fp32", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = retrieve(
            queries, args.ckpt, str(tmp / "fly"), ae_tif=args.ae_tif, **options, options=SearchOptions(heatmaps=False)
        )
        ref_maps = []
        for result in reference:
            with rasterio.open(result.tif) as src:
                ref_maps.append(src.read(1))
        for dtype in [d for d in ("int8", "int16", "float32") if d in available_dtypes()]:
            emb = embed_raster(
                args.ae_tif, args.ckpt, str(tmp / f"aether_{dtype}.tif"), **options, options=EmbedOptions(dtype=dtype)
            )
            results = retrieve(
                queries, args.ckpt, str(tmp / dtype), emb_tif=str(emb), **options, options=SearchOptions(heatmaps=False)
            )
            same, near, errors = [], [], []
            for result, ref, ref_map in zip(results, reference, ref_maps):
                a = np.array([(h["row"], h["col"]) for h in ref.hits], dtype=float)
                b = np.array([(h["row"], h["col"]) for h in result.hits], dtype=float)
                same.append(len({tuple(p) for p in a} & {tuple(p) for p in b}))
                dist = np.sqrt((((a[:, None] - b[None]) * scale) ** 2).sum(-1))
                near.append(int((dist.min(axis=1) <= 10.0).sum()))
                with rasterio.open(result.tif) as src:
                    errors.append(float(np.nanmax(np.abs(src.read(1) - ref_map))))
            size_mb = Path(emb).stat().st_size / 1e6
            print(
                f"{dtype:>7}: top-10 places equal to on the fly {min(same)}-{max(same)} of 10 (per query: {same}), "
                f"within 10 m {min(near)}-{max(near)}; largest score error {max(errors):.5f}; file {size_mb:.1f} MB"
            )


if __name__ == "__main__":
    main()
