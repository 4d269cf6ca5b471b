#!/usr/bin/env bash
# Builds ggml's CUDA backend alone, as a loadable library (libggml-cuda.so, ggml's GGML_BACKEND_DL),
# from the llama.cpp sources that llama-cpp-sys-2 vendors. A CPU binary built with
# `--features cpu-variants` loads it at start (ggml_backend_load_all: next to the executable, or
# GGML_BACKEND_PATH=/path/libggml-cuda.so), so the binary itself needs no CUDA to build or to start.
#
# Usage: tools/cuda/build-backend.sh GGML_SRC BUILD_DIR [ARCHS]
#   GGML_SRC   the vendored llama.cpp's ggml/ folder (…/llama-cpp-sys-2-0.1.161/llama.cpp/ggml, or
#              the copy tools/cuda/pack-gpu-check.sh makes)
#   BUILD_DIR  the CMake build folder; libggml-cuda.so ends up in BUILD_DIR/bin
#   ARCHS      CMAKE_CUDA_ARCHITECTURES, default "80-real;86-real;89-real;90-real" (see docs/gpu.md)
# Environment: CUDACXX (nvcc; else nvcc on PATH, else tools/cuda/.toolkit), JOBS (default: all
# cores), CUDA_LAUNCHER (e.g. ccache), GGML_CUDA_FA_ALL_QUANTS etc. passed through as -D options.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="${1:?ggml source folder}"; build="${2:?build folder}"
archs="${3:-80-real;86-real;89-real;90-real}"
if [ -z "${CUDACXX:-}" ]; then
  if command -v nvcc >/dev/null; then CUDACXX=$(command -v nvcc)
  elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDACXX=/usr/local/cuda/bin/nvcc
  else CUDACXX="$here/.toolkit/cuda/bin/nvcc"; fi
fi
export CUDACXX
cuda_root="$(cd "$(dirname "$CUDACXX")/.." && pwd)"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
extra=()
for v in $(env | grep -oE '^GGML_[A-Z0-9_]+' || true); do extra+=("-D$v=${!v}"); done
[ -n "${CUDA_LAUNCHER:-}" ] && extra+=("-DCMAKE_CUDA_COMPILER_LAUNCHER=$CUDA_LAUNCHER" "-DCMAKE_CXX_COMPILER_LAUNCHER=$CUDA_LAUNCHER" "-DCMAKE_C_COMPILER_LAUNCHER=$CUDA_LAUNCHER")
# The options llama-cpp-sys-2's build.rs gives ggml (GGML_CUDA_NCCL OFF, GGML_NATIVE OFF, Release),
# with the backend as a loadable module; the CPU backend is not built (the binary brings its own).
cmake -S "$src" -B "$build" "${gen[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$CUDACXX" -DCUDAToolkit_ROOT="$cuda_root" \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CPU=OFF -DGGML_NATIVE=OFF \
  -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF \
  -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
  "${extra[@]}" >&2
cmake --build "$build" --target ggml-cuda -j "${JOBS:-$(nproc)}" >&2
lib=$(find "$build" -name 'libggml-cuda.so' | head -1)
[ -n "$lib" ] || { echo "libggml-cuda.so not built" >&2; exit 1; }
echo "$lib"
