#!/usr/bin/env bash
# Installs a CUDA toolkit from the Python package index into tools/cuda/.toolkit/ (git-ignored):
# nvcc with its compiler parts (cicc, ptxas, cudafe++, fatbinary, nvlink), the CUDA runtime,
# cuBLAS, the CCCL headers (cub, thrust, libcu++) and the CRT headers; then lays them out as a
# toolkit that CMake's FindCUDAToolkit and ggml-cuda's build find:
#   tools/cuda/.toolkit/cuda/{bin/nvcc, include/, lib64/ -> lib/, lib/libcudart.so, lib/stubs/libcuda.so}
# No root, no NVIDIA driver, no GPU needed. About 1.1 GB on disk (cuBLAS-Lt alone is 540 MB).
#
# CUDA 13.0 and not 12.x: the CUDA 12 wheels (nvidia-cuda-nvcc-cu12, every version up to 12.9.86)
# hold only ptxas and libnvvm, not nvcc, cicc or cudafe++; the CUDA 13 wheels hold the whole
# compiler. 13.0 is what the GPU machines here have (nvcc 13.0, driver 580). CUDA 13 builds run on
# NVIDIA drivers >= 580 and GPUs of compute capability >= 7.5 (Turing and newer).
#
# Usage: tools/cuda/install-toolkit.sh            (idempotent; prints the toolkit's root)
#        CUDA_TOOLKIT_PREFIX=/elsewhere tools/cuda/install-toolkit.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prefix="${CUDA_TOOLKIT_PREFIX:-$here/.toolkit}"
root="$prefix/cuda"
python="${PYTHON:-python3}"

# Pinned to CUDA 13.0 update 2 (the versions the `cuda-toolkit==13.0.2` meta-package names).
wheels=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, ptxas, cudafe++, fatbinary, nvlink, bin2c
  nvidia-nvvm==13.0.88          # cicc (nvvm/bin), libdevice
  nvidia-cuda-crt==13.0.88      # include/crt/*.h (host/device glue headers nvcc includes)
  nvidia-cuda-runtime==13.0.96  # cudart (.so.13, static), cuda.h, cuda_runtime.h, cuda_fp16.h, ...
  nvidia-cublas==13.1.0.3       # libcublas.so.13, libcublasLt.so.13, headers (shared only: no static cuBLAS)
  nvidia-cuda-cccl==13.0.85     # include/cccl/{cub,thrust,cuda}
)

if [ -x "$root/bin/nvcc" ] && [ -f "$prefix/.installed" ] \
   && [ "$(cat "$prefix/.installed")" = "${wheels[*]}" ]; then
  echo "$root"
  exit 0
fi

mkdir -p "$prefix/wheels"
# The wheels are platform wheels with no Python code; fetch them for any Python, manylinux x86_64.
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  --python-version 3.11 --implementation py \
  -d "$prefix/wheels" "${wheels[@]%%#*}" >&2
rm -rf "$prefix/site" "$root"
files=()
for w in "${wheels[@]}"; do
  name="${w%%==*}"; version="${w##*==}"; version="${version%% *}"
  f=$(ls "$prefix/wheels/${name//-/_}-${version}-"*.whl | head -1)
  files+=("$f")
done
"$python" -m pip install --quiet --no-deps --no-index --no-compile --target "$prefix/site" "${files[@]}" >&2

# Every CUDA 13 wheel installs under nvidia/cu13/, one merged toolkit tree.
ln -sfn site/nvidia/cu13 "$root"
cd "$root"
[ -e lib64 ] || ln -s lib lib64
chmod +x bin/* nvvm/bin/* 2>/dev/null || true
# Unversioned names, as a toolkit installed by NVIDIA's installer has them (the linker asks for
# -lcudart, -lcublas, ...).
for so in lib/lib*.so.*; do
  base="${so%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
done

# libcuda.so is the NVIDIA driver's library and is in no wheel. ggml-cuda links it (its VMM pool
# calls cuMemCreate, cuMemMap, ...), so the linker needs a stub with the driver API's symbols,
# as the toolkit's own lib/stubs/libcuda.so is: generated here from cuda.h (every function cuda.h
# declares, under the exported names its macros map to, e.g. cuMemGetInfo -> cuMemGetInfo_v2).
# Its soname is libcuda.so.1, so at run time the real driver library is loaded; the stub is
# never on a run-time path.
mkdir -p lib/stubs
if [ ! -f lib/stubs/libcuda.so ]; then
  tmp=$(mktemp -d)
  printf '#include <cuda.h>\n' > "$tmp/h.c"
  gcc -E -P -Iinclude "$tmp/h.c" \
    | tr '\n' ' ' | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$tmp/stub.c"
  gcc -shared -fPIC -o lib/stubs/libcuda.so -Wl,-soname,libcuda.so.1 "$tmp/stub.c"
  echo "libcuda stub: $(wc -l < "$tmp/stub.c") driver API symbols" >&2
  rm -rf "$tmp"
fi

echo "${wheels[*]}" > "$prefix/.installed"
"$root/bin/nvcc" --version | tail -2 >&2
echo "$root"
