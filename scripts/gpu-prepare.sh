#!/usr/bin/env bash
# Prepares what the GPU benchmark (scripts/bench_gpu.py) carries to a GPU machine that has
# PyTorch but no Rust toolchain and no network (docs/gpu.md):
#   .gpu/zlora.xz   the CUDA build (scripts/cuda-build.sh), stripped and compressed to fit
#                   the 64 MiB a device call carries
#   .whl/           the diffusers wheel the reference needs (pure Python)
# Both folders are git-ignored (added to .git/info/exclude here).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/cuda-build.sh
mkdir -p .gpu .whl
for dir in /.gpu/ /.whl/; do
    grep -qxF "$dir" .git/info/exclude || echo "$dir" >> .git/info/exclude
done
strip -o .gpu/zlora target/cuda/release/zlora
xz -T0 -6 -f .gpu/zlora
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==8.7.0
ls -l .gpu .whl
