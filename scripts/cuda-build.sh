#!/usr/bin/env bash
# Builds the `zlora` binary with `--features cuda` on a machine without a GPU or a system CUDA:
# the CUDA 13.0 compiler, headers and libraries come from PyPI (exact versions: the unpinned
# dependencies of nvidia-cuda-nvcc would pull in 13.5, which cudarc refuses), and a stub
# libcuda.so satisfies the linker (the real one comes with the NVIDIA driver at run time).
#
#   scripts/cuda-build.sh            # compute capability 90 (H100/H200); target/cuda/release/zlora
#   CUDA_COMPUTE_CAP=89 scripts/cuda-build.sh   # RTX 4090 / L40S
#
# Environment: ZLORA_CUDA_VENV (where the wheels go, default ~/.cache/zlora/cuda13),
# CARGO_TARGET_DIR (default target/cuda, kept apart from the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${ZLORA_CUDA_VENV:-$HOME/.cache/zlora/cuda13}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
"$cu/bin/nvcc" --version | tail -1

# Unversioned library names for the linker, plus a libcuda stub (SONAME libcuda.so.1, so the
# driver's library is the one loaded at run time).
link="$venv/linkroot/lib"
mkdir -p "$link"
for lib in libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libcublas.so.13 libcublasLt.so.13; do
    ln -sf "$cu/lib/$lib" "$link/${lib%%.so*}.so"
done
cargo fetch --quiet
cudarc=$(cargo metadata --format-version 1 --features zlora/cuda 2>/dev/null \
    | python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
grep -ohE '^\s+pub fn (cu[A-Za-z0-9_]+)\(|^\s+fn (cu[A-Za-z0-9_]+)\(' "$cudarc"/src/driver/sys/*.rs \
    | sed -E 's/^\s+(pub )?fn //; s/\(//' | sort -u \
    | awk '{print "int " $1 "(void) { return 34; }"}' > "$link/libcuda_stub.c"
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda_stub.c"
echo "libcuda stub: $(wc -l < "$link/libcuda_stub.c") entry points"

export PATH="$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu"
export CUDA_TOOLKIT_ROOT_DIR="$venv/linkroot"
cargo build --release -p zlora-cli --features cuda
echo "built $CARGO_TARGET_DIR/release/zlora with CUDA (compute capability $CUDA_COMPUTE_CAP)"
