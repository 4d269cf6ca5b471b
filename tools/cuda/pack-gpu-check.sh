#!/usr/bin/env bash
# Packs what tools/cuda/gpu-check.sh needs on the GPU machine (no Rust, no internet, 64 MiB with the
# tree) into .gpu-carry/ (git-ignored), from a `tools/cuda/build.sh` build:
#   bin/        illmrec (cuda,cpu-variants: GPU layers by default, CUDA as a loadable backend),
#               its libllama/libggml/libggml-base, the CPU variants, libgomp, and the kiosk load test
#               (examples/loadtest); NOT libggml-cuda.so: gpu-check.sh builds it there for its GPU
#   ggml/       the vendored ggml sources the CUDA backend builds from (tools/cuda/ggml-src.sh)
#   gemma3-270m.meta   the default model's metadata and tensor list (tools/cuda/shape_model.py)
#   bench/      a small prepared dataset for `illmrec bench` (test.jsonl: seeded histories of the
#               demo bundle's items) and users.jsonl for the parity runs
#
# Usage: tools/cuda/build.sh && tools/cuda/build.sh --example loadtest && tools/cuda/pack-gpu-check.sh
# Then, with a GPU machine: the device tool's run, command `tools/cuda/gpu-check.sh`,
# carry [".gpu-carry"] (see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
carry="${GPU_CARRY:-.gpu-carry}"
rel="${CARGO_TARGET_DIR:-target-cuda}/release"
model="${MODEL:-}"
if [ -z "$model" ]; then
  for m in models/gemma-3-270m-f32.gguf models/gemma-3-270m-q4_k_m.gguf; do
    [ -f "$m" ] && { model=$m; break; }
  done
fi
[ -n "$model" ] || { echo "no Gemma 3 270M GGUF in models/ (models/fetch-default-model.sh, or MODEL=...)" >&2; exit 1; }
[ -x "$rel/illmrec" ] || { echo "$rel/illmrec missing: run tools/cuda/build.sh first" >&2; exit 1; }
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for p in tools/.venv/bin/python python3; do
    if "$p" -c 'import numpy' 2>/dev/null; then python=$p; break; fi
  done
fi
[ -n "$python" ] || { echo "no Python with numpy (tools/setup-venv.sh, or PYTHON=...)" >&2; exit 1; }

rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/bench"
cp "$rel/illmrec" "$carry/bin/"
shopt -s nullglob
# The libraries under the names the binary asks for (libllama.so.0, libggml.so.0, libggml-base.so.0),
# and the CPU variants a GPU server's processor picks from (Intel Xeon Skylake-SP to Sapphire
# Rapids, AMD EPYC Zen 2 to 4, and the portable ones). Not libggml-cuda.so (built on the GPU
# machine for its architecture), not libggml-blas.so (OpenBLAS may be missing there), not the
# unversioned duplicates nor libllama-common: 64 MiB travel in all.
for f in "$rel"/lib*.so.0; do
  case "$(basename "$f")" in
    libllama-common*) ;;
    *) cp "$f" "$carry/bin/" ;;
  esac
done
for v in x64 sse42 haswell skylakex icelake cooperlake sapphirerapids zen4; do
  [ -f "$rel/libggml-cpu-$v.so" ] && cp "$rel/libggml-cpu-$v.so" "$carry/bin/"
done
if [ -x "$rel/examples/loadtest" ]; then
  cp "$rel/examples/loadtest" "$carry/bin/"
else
  echo "note: $rel/examples/loadtest missing (tools/cuda/build.sh --example loadtest): no load test there" >&2
fi
gomp=$(ldconfig -p | awk '/libgomp.so.1 .*x86-64/{print $NF; exit}')
if [ -n "$gomp" ]; then cp "$gomp" "$carry/bin/"; fi
strip "$carry"/bin/* 2>/dev/null || true
# The load test looks for the binary and the demo bundle under the folder it was built from.
echo "$repo" > "$carry/manifest_dir"

tools/cuda/ggml-src.sh "$carry" >/dev/null
"$python" tools/cuda/shape_model.py meta --model "$model" --out "$carry/gemma3-270m.meta"

# A prepared dataset for `illmrec bench`: 96 seeded histories of 3 to 10 demo-bundle items, each
# with a target and 20 negatives; users.jsonl: the first 32 as `score`/`embed` input.
"$python" - "$carry/bench" models/demo-bundle/items.jsonl <<'EOF'
import json, random, sys
out, items = sys.argv[1], sys.argv[2]
ids = [json.loads(l)["id"] for l in open(items) if l.strip()]
rng = random.Random(29)
with open(f"{out}/test.jsonl", "w") as t, open(f"{out}/users.jsonl", "w") as u:
    for n in range(96):
        pick = rng.sample(ids, rng.randint(3, 10) + 21)
        hist, target, neg = pick[:-21], pick[-21], pick[-20:]
        t.write(json.dumps({"user": n, "history": hist, "target": target, "negatives": neg}) + "\n")
        if n < 32:
            u.write(json.dumps({"user": n, "history": hist}) + "\n")
EOF
cp models/demo-bundle/items.jsonl "$carry/bench/items.jsonl"
{
  echo "packed $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?') in $repo"
  echo "binary: $rel/illmrec ($(cat "${CARGO_TARGET_DIR:-target-cuda}/cuda-build.stamp" 2>/dev/null || echo 'stamp missing'))"
  echo "model shape from: $model"
} > "$carry/PACKED"
size=$(du -sb "$carry" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "$carry: $((size >> 20)) MiB; with the tree ($((tree >> 20)) MiB) $(((size + tree) >> 20)) MiB of the 64 MiB that travel" >&2
[ $((size + tree)) -lt $((64 << 20)) ] || { echo "too big to travel" >&2; exit 1; }
