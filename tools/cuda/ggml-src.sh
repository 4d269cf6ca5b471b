#!/usr/bin/env bash
# Copies the part of llama-cpp-sys-2's vendored llama.cpp that ggml's CUDA backend builds from
# (ggml's CMake files, public headers, core sources, src/ggml-cuda/ and the CPU backend's headers:
# about 4.6 MB) into DEST,
# so it can travel to a machine without Rust or crates.io. The crate ships ggml without its
# ggml.pc.in, tests/ and examples/, which ggml's own CMakeLists.txt expects when ggml is built on
# its own: an empty ggml.pc.in is written (tests and examples are turned off by build-backend.sh).
#
# Usage: tools/cuda/ggml-src.sh DEST      (prints DEST/ggml)
set -euo pipefail
dest="${1:?destination folder}"
version=0.1.161
crate=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-$version 2>/dev/null | head -1)
if [ -z "$crate" ]; then
  # Not unpacked yet: let cargo fetch the locked dependencies.
  (cd "$(dirname "$0")/../.." && cargo fetch --locked >&2)
  crate=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-$version | head -1)
fi
g="$crate/llama.cpp/ggml"
rm -rf "$dest/ggml"; mkdir -p "$dest/ggml/src"
cp -r "$g/CMakeLists.txt" "$g/cmake" "$g/include" "$dest/ggml/"
find "$g/src" -maxdepth 1 -type f -exec cp {} "$dest/ggml/src/" \;
cp -r "$g/src/ggml-cuda" "$dest/ggml/src/"
# ggml-quants.c includes ggml-cpu/ggml-cpu-impl.h (headers only; the CPU backend is not built).
mkdir -p "$dest/ggml/src/ggml-cpu" && cp "$g"/src/ggml-cpu/*.h "$dest/ggml/src/ggml-cpu/"
[ -f "$dest/ggml/ggml.pc.in" ] || : > "$dest/ggml/ggml.pc.in"
echo "llama-cpp-sys-2 $version" > "$dest/ggml/VENDORED_FROM"
echo "$dest/ggml"
