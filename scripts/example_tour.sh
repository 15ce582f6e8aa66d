#!/usr/bin/env bash
# Every number and picture the README shows for the bundled example, from the committed data:
# train, embed the raster, three retrieval queries, evaluation, PCA pictures and training curves
# (model.arch aether, the default), then the same training and evaluation with model.arch mlp and
# how close per-pixel inference is to window inference.
# About 75 s on 2 CPU cores.   Usage: bash scripts/example_tour.sh
set -euo pipefail
cd "$(dirname "$0")/.."
run=ckpts/helsinki
python train.py --cfg config.yaml --overwrite --no-progress
python infer_aether_raster.py --ae_tif data/AE/helsinki_standin_ae_int8.tif --ckpt $run/best.pt \
    --out $run/aether.tif --no-progress
python retrieve.py --ckpt $run/best.pt --emb $run/aether.tif --queries docs/example_queries.txt \
    --out $run/retrieval --no-progress
python evaluate.py --ckpt $run/best.pt --landuse data/landuse/helsinki_landuse.geojson --no-progress
python plot.py pca --tif data/AE/helsinki_standin_ae_int8.tif --out docs/img/example_alphaearth_pca.png --scale 3
python plot.py pca --tif $run/aether.tif --out docs/img/example_aether_pca.png --scale 3
python plot.py curves --metrics $run/metrics.jsonl --out docs/img/example_training_curves.png
mkdir -p docs/img/retrieval
cp $run/retrieval/*.png docs/img/retrieval/
cp $run/eval/metrics.md docs/example_metrics.md
python train.py --cfg config.yaml --set model.arch=mlp --set train.run_dir=ckpts/helsinki_mlp --overwrite --no-progress
python evaluate.py --ckpt ckpts/helsinki_mlp/best.pt --landuse data/landuse/helsinki_landuse.geojson --no-progress
cp ckpts/helsinki_mlp/eval/metrics.md docs/example_metrics_mlp.md
python scripts/compare_pooling.py --ckpt $run/best.pt
echo "updated docs/img, docs/example_metrics.md and docs/example_metrics_mlp.md"
