#!/usr/bin/env bash
# Builds illmrec with CUDA, with the toolkit tools/cuda/install-toolkit.sh installs (or the one
# CUDA_PATH names), into its own target folder (target-cuda/, never the CPU build's target/).
#
#   tools/cuda/build.sh                      # CUDA 13 kernels for Ampere, Ada, Hopper (below)
#   CUDA_ARCHS=90-real tools/cuda/build.sh   # one architecture: about a quarter of the kernel time
#
# What it builds: `cargo build --release --features cuda,cpu-variants`. ggml's CUDA code then
# becomes a loadable backend, target-cuda/release/libggml-cuda.so, next to the binary and its CPU
# variants (libggml-cpu-*.so). At start, llama.cpp's ggml_backend_load_all() loads it; where it
# cannot (no NVIDIA driver: libcuda.so.1 missing), it is skipped and the binary runs on the CPU.
# `--features cuda` alone (MODE=static) links CUDA into the binary statically, as llama-cpp-sys-2
# does by default: that needs the static cuBLAS (libcublas_static.a), which the pip wheels do not
# ship, and the binary then needs libcuda.so.1 to start at all; see docs/gpu.md.
#
# Environment:
#   CUDA_ARCHS   CMAKE_CUDA_ARCHITECTURES (default "80-real;86-real;89-real;90-real": A100, RTX 30xx/
#                A10/A40, RTX 40xx/L4/L40, H100/H200; add 120a-real for RTX 50xx/Blackwell, or
#                "90-virtual" style entries for PTX that newer GPUs JIT-compile)
#   CUDA_PATH    an existing CUDA toolkit (bin/nvcc, include/, lib64/) instead of the pip one
#   CARGO_TARGET_DIR  default target-cuda
#   MODE         dl (default: cuda,cpu-variants) or static (cuda only)
#   NO_CCACHE=1  do not use ccache even when it is installed
# Extra arguments go to cargo (e.g. --bin illmrec).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${CUDA_PATH:-}" ]; then
  CUDA_PATH=$(tools/cuda/install-toolkit.sh)
fi
export CUDA_PATH CUDAToolkit_ROOT="$CUDA_PATH" CUDACXX="$CUDA_PATH/bin/nvcc"
export PATH="$CUDA_PATH/bin:$PATH"
archs="${CUDA_ARCHS:-80-real;86-real;89-real;90-real}"
export CMAKE_CUDA_ARCHITECTURES="$archs"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
case "${MODE:-dl}" in
  dl) features=cuda,cpu-variants ;;
  static) features=cuda ;;
  *) echo "MODE is dl or static" >&2; exit 2 ;;
esac
if [ -z "${NO_CCACHE:-}" ] && command -v ccache >/dev/null; then
  export CMAKE_CUDA_COMPILER_LAUNCHER=ccache CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
fi
# llama-cpp-sys-2 passes CMAKE_* variables to CMake but does not re-run its build script when they
# change, and keeps its CMake cache: a changed architecture list or toolkit needs llama.cpp
# rebuilt in this target folder.
stamp="$CARGO_TARGET_DIR/cuda-build.stamp"
want="archs=$archs features=$features cuda=$CUDA_PATH"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$want" ]; then
  echo "CUDA settings changed ($(cat "$stamp") -> $want): rebuilding llama.cpp in $CARGO_TARGET_DIR" >&2
  cargo clean --release -p llama-cpp-sys-2
fi
mkdir -p "$CARGO_TARGET_DIR"
start=$(date +%s)
cargo build --release --features "$features" "$@"
echo "$want" > "$stamp"
if [ "$features" = cuda,cpu-variants ]; then
  # The CUDA backend next to the binary (build.rs copies only the CPU variants and BLAS).
  lib=$(ls -t "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/backends/libggml-cuda.so | head -1)
  cp -f "$lib" "$CARGO_TARGET_DIR/release/libggml-cuda.so"
fi
echo "built in $(( $(date +%s) - start )) s: $CARGO_TARGET_DIR/release/illmrec (CUDA archs $archs, features $features)" >&2
