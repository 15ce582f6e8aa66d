#!/usr/bin/env bash
# The bundled example end to end: train, embed the raster, three retrieval queries, evaluation,
# PCA pictures and training curves (model.arch aether, the default), then the same training and
# evaluation with model.arch mlp, and how close per-pixel inference is to window inference.
#
# Usage: bash scripts/example_tour.sh [--out DIR] [--refresh-docs]
#   --out DIR        where everything is written (default: a new folder under $TMPDIR or /tmp);
#                    the repository is not touched
#   --refresh-docs   also copy the pictures and metrics into docs/ (what the docs show; for
#                    maintainers: it changes tracked files)
# About 75 s on 2 CPU cores once installed (docs/timings.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="" refresh=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --refresh-docs) refresh=1; shift ;;
        *) echo "error: unknown argument $1 (usage: bash scripts/example_tour.sh [--out DIR] [--refresh-docs])" >&2; exit 2 ;;
    esac
done
out="${out:-$(mktemp -d "${TMPDIR:-/tmp}/aether-tour.XXXXXX")}"
mkdir -p "$out/img/retrieval"
run="$out/helsinki" mlp="$out/helsinki_mlp" ae=data/AE/helsinki_standin_ae_int8.tif

aether train --cfg config.yaml --set train.run_dir="$run" --overwrite --no-progress
aether infer --ae_tif $ae --ckpt "$run/best.pt" --out "$run/aether.tif" --no-progress
aether retrieve --ckpt "$run/best.pt" --emb "$run/aether.tif" --queries docs/example_queries.txt \
    --out "$run/retrieval" --no-progress
aether evaluate --ckpt "$run/best.pt" --landuse data/landuse/helsinki_landuse.geojson --no-progress
aether plot pca --tif $ae --out "$out/img/example_alphaearth_pca.png" --scale 3
aether plot pca --tif "$run/aether.tif" --out "$out/img/example_aether_pca.png" --scale 3
aether plot curves --metrics "$run/metrics.jsonl" --out "$out/img/example_training_curves.png"
cp "$run"/retrieval/*.png "$out/img/retrieval/"
aether train --cfg config.yaml --set model.arch=mlp --set train.run_dir="$mlp" --overwrite --no-progress
aether evaluate --ckpt "$mlp/best.pt" --landuse data/landuse/helsinki_landuse.geojson --no-progress
python scripts/compare_pooling.py --ckpt "$run/best.pt"

if [ $refresh = 1 ]; then
    mkdir -p docs/img/retrieval
    cp "$out"/img/*.png docs/img/
    cp "$out"/img/retrieval/*.png docs/img/retrieval/
    cp "$run/eval/metrics.md" docs/example_metrics.md
    cp "$mlp/eval/metrics.md" docs/example_metrics_mlp.md
    echo "updated docs/img, docs/example_metrics.md and docs/example_metrics_mlp.md from $out"
else
    echo "the tour's models, rasters, maps, metrics and pictures are in $out"
fi
