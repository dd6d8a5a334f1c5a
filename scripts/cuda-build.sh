#!/usr/bin/env bash
# Builds `zlora` with `--features cuda,nccl`, one binary per GPU architecture, on a machine without
# a GPU. The kernels are PTX for one architecture (candle's CUDA_COMPUTE_CAP): see docs/gpu.md.
# `nccl` (training on several GPUs, docs/multi-gpu.md) opens libnccl.so.2 at run time, so NCCL is
# needed neither here nor by a run on one GPU.
#
#   scripts/cuda-build.sh                    # sm90 (H100/H200) with CUDA 13.0 from PyPI
#   scripts/cuda-build.sh 80 86 89 90 120    # one binary per architecture
#   scripts/cuda-build.sh --toolkit /usr/local/cuda-12.4 80 89   # an installed toolkit
#
# Architectures: 80 (A100; its PTX also JIT-compiles on every later GPU), 86 (RTX 30xx, A40,
# A6000), 89 (RTX 40xx, L4, L40S), 90 (H100/H200, sm_90a: runs on those only), 120 (RTX 50xx,
# sm_120a, CUDA >= 12.8). Default: $CUDA_COMPUTE_CAP, else 90.
#
# Without --toolkit the CUDA 13.0 compiler, headers and libraries come from PyPI with exact
# versions (the unpinned dependencies of nvidia-cuda-nvcc would pull in 13.5, which cudarc
# refuses); CUDA 13 binaries need an NVIDIA driver >= 580. PyPI has no CUDA 12 compiler (its
# nvidia-cuda-nvcc-cu12 wheels hold ptxas but no nvcc), so a build for older drivers needs an
# installed CUDA 12.x toolkit (--toolkit; cudarc accepts nvcc 11.4-13.4).
#
# Each binary is built in $CARGO_TARGET_DIR (default target/cuda) and copied to
# dist/zlora-<version>-linux-x86_64-cuda<X.Y>-sm<ARCH> with a .sha256 next to it.
# Environment: ZLORA_CUDA_VENV (where the wheels go, default ~/.cache/zlora/cuda13),
# ZLORA_DIST (default dist).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "cuda-build: $*" >&2; exit 1; }

toolkit=""
archs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --toolkit) [ $# -ge 2 ] || die "--toolkit needs a folder (the one holding bin/nvcc)"
                   toolkit=$2; shift 2 ;;
        -*) die "unknown option '$1': expected --toolkit DIR" ;;
        *) archs+=("$1"); shift ;;
    esac
done
[ ${#archs[@]} -gt 0 ] || archs=("${CUDA_COMPUTE_CAP:-90}")
for arch in "${archs[@]}"; do
    case "$arch" in
        80|86|89|90|120) ;;
        *) die "architecture '$arch': expected 80, 86, 89, 90 or 120" ;;
    esac
done
dist=${ZLORA_DIST:-dist}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}

# The toolkit: an installed one, or CUDA 13.0 from PyPI (one folder that looks like a toolkit).
venv=${ZLORA_CUDA_VENV:-$HOME/.cache/zlora/cuda13}
if [ -n "$toolkit" ]; then
    [ -x "$toolkit/bin/nvcc" ] || die "--toolkit $toolkit: no bin/nvcc there"
    cu=$(cd "$toolkit" && pwd)
else
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
    cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
fi
release=$("$cu/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
[ -n "$release" ] || die "$cu/bin/nvcc --version names no release"
version_number() { echo $(( ${1%%.*} * 1000 + ${1#*.} * 10 )); }
cuda=$(version_number "$release")
[ "$cuda" -ge 11040 ] && [ "$cuda" -le 13040 ] \
    || die "nvcc $release: candle's cudarc accepts CUDA 11.4 to 13.4"
for arch in "${archs[@]}"; do
    # cudaforge builds 90 and 120 as the arch-specific sm_90a / sm_120a.
    [ "$arch" != 120 ] || [ "$cuda" -ge 12080 ] || die "sm_120 needs CUDA >= 12.8 (this is $release)"
    [ "$arch" != 90 ] || [ "$cuda" -ge 12000 ] || die "sm_90a needs CUDA >= 12.0 (this is $release)"
done
echo "nvcc: CUDA $release ($cu); architectures: ${archs[*]}"

# Unversioned library names for the linker, plus a libcuda stub (SONAME libcuda.so.1, so the
# driver's library is the one loaded at run time).
link="$CARGO_TARGET_DIR/cuda-link/lib"
mkdir -p "$link"
for name in libcudart libnvrtc libcurand libcublas libcublasLt; do
    lib=""
    for found in "$cu"/lib/$name.so.* "$cu"/lib64/$name.so.* "$cu"/targets/x86_64-linux/lib/$name.so.*; do
        # The shortest name is the SONAME (libcublas.so.13, not libcublas.so.13.1.0.3).
        [ -e "$found" ] && { [ -z "$lib" ] || [ ${#found} -lt ${#lib} ]; } && lib=$found
    done
    [ -n "$lib" ] || die "$name.so.* not found under $cu/lib, lib64 or targets/x86_64-linux/lib"
    ln -sf "$lib" "$link/$name.so"
done
cargo fetch --quiet
meta=$(cargo metadata --format-version 1 --features zlora/cuda 2>/dev/null)
cudarc=$(python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))' <<<"$meta")
version=$(python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["version"] for p in m["packages"] if p["name"]=="zlora-cli"))' <<<"$meta")
grep -ohE '^\s+pub fn (cu[A-Za-z0-9_]+)\(|^\s+fn (cu[A-Za-z0-9_]+)\(' "$cudarc"/src/driver/sys/*.rs \
    | sed -E 's/^\s+(pub )?fn //; s/\(//' | sort -u \
    | awk '{print "int " $1 "(void) { return 34; }"}' > "$link/libcuda_stub.c"
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda_stub.c"
echo "libcuda stub: $(wc -l < "$link/libcuda_stub.c") entry points"

export PATH="$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu"
export CUDA_TOOLKIT_ROOT_DIR="$(cd "$link/.." && pwd)"
mkdir -p "$dist"
for arch in "${archs[@]}"; do
    export CUDA_COMPUTE_CAP=$arch
    cargo build --release -p zlora-cli --features cuda,nccl
    bin="$CARGO_TARGET_DIR/release/zlora"
    # The embedded PTX must target exactly the architecture asked for (sm_90a for 90).
    want=$(case $arch in 90|120) echo "sm_${arch}a" ;; *) echo "sm_$arch" ;; esac)
    targets=$(grep -aoE '\.target sm_[0-9]+[af]?' "$bin" | sort -u | sed 's/\.target //' | tr '\n' ' ')
    [ "$targets" = "$want " ] || die "$bin embeds PTX for '$targets', expected $want"
    artifact="$dist/zlora-$version-linux-x86_64-cuda$release-sm$arch"
    cp "$bin" "$artifact"
    (cd "$dist" && sha256sum "$(basename "$artifact")" > "$(basename "$artifact").sha256")
    needs=$(readelf -d "$artifact" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')
    echo "built $artifact (PTX $want; needs at run time: $needs)"
done
