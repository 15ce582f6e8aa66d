#!/usr/bin/env bash
# The GPU checks of issue 13 as one run on the H200 machine (the `device` tool), prepared for a
# session that is lent it; not yet run (the sessions so far were not). The machine has Python 3.12,
# PyTorch + CUDA, numpy, tqdm, pyyaml, scipy, but no rasterio, zstandard or pytest: carry them as
# wheels in .whl (see /work/.library/device/README.md), for example
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     rasterio==1.4.3 affine cligj click-plugins zstandard pytest iniconfig pluggy
# and call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580).
# Prints the CUDA tests' results, then the inference benchmark on the GPU and on the 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_device_tiles.py -k cuda 2>&1 | tee "${OUT:-/tmp}/cuda_tests.txt"
python3 benchmarks/bench_inference.py --device cuda --sizes 4096 --archs aether 2>&1 | tee "${OUT:-/tmp}/bench_cuda.txt"
python3 benchmarks/bench_inference.py --device cpu --sizes 4096 --archs aether 2>&1 | tee "${OUT:-/tmp}/bench_cpu16.txt"
