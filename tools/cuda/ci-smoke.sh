#!/usr/bin/env bash
# CI's CUDA check, on a machine with no GPU: installs the pip CUDA toolkit (tools/cuda/install-toolkit.sh),
# configures ggml's CUDA backend from the vendored llama.cpp exactly as the CUDA builds do
# (tools/cuda/build-backend.sh's options: FindCUDAToolkit, nvcc and the host g++ must agree), and
# compiles a few of its sources for one architecture: the backend's core (ggml-cuda.cu: the ggml
# backend interface, cuBLAS and the CUDA driver API calls) and small kernels. It does not compile
# all 144 kernel files (about an hour on 2 cores: tools/cuda/build.sh does, see docs/gpu.md).
#
# Usage: tools/cuda/ci-smoke.sh [OBJECTS...]   (object names, default below; GENERATOR=make: no ninja)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
root=$(tools/cuda/install-toolkit.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$(tools/cuda/ggml-src.sh "$work/src")
export CUDACXX="$root/bin/nvcc"
gen=(); [ "${GENERATOR:-}" != make ] && command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$CUDACXX" -DCUDAToolkit_ROOT="$root" -DCMAKE_CUDA_ARCHITECTURES=90-real \
  -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CPU=OFF -DGGML_NATIVE=OFF \
  -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF \
  -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF > "$work/configure.log" \
  || { cat "$work/configure.log"; exit 1; }
grep -E "CUDA Toolkit found|compiler identification is NVIDIA|host compiler" "$work/configure.log"
objs=("$@")
if [ ${#objs[@]} -eq 0 ]; then
  objs=(ggml-cuda.cu.o softmax.cu.o norm.cu.o)
fi
if [ ${#gen[@]} -gt 0 ]; then
  targets=()
  for o in "${objs[@]}"; do targets+=("src/ggml-cuda/CMakeFiles/ggml-cuda.dir/$o"); done
  ninja -C "$work/build" -j "$(nproc)" "${targets[@]}"
else
  # Unix Makefiles: each source has an object target in its directory's Makefile.
  make -C "$work/build/src/ggml-cuda" -j "$(nproc)" "${objs[@]}"
fi
echo "CUDA smoke check passed: configure and ${objs[*]} for sm_90 with $("$CUDACXX" --version | grep -o 'release [0-9.]*') in $(( $(date +%s) - start )) s"
