#!/usr/bin/env bash
# The GPU check, in one command for a lent GPU machine (nvcc 13, CMake, ninja, PyTorch's python3 with
# numpy; no Rust, no internet; 10 minutes a command). Reads .gpu-carry/ (tools/cuda/pack-gpu-check.sh),
# writes everything to $OUT (or /tmp/gpu-check-out):
#   1. device and toolchain: nvidia-smi, nvcc, cmake
#   2. ggml's CUDA backend built there from the vendored sources (libggml-cuda.so, ARCHS: 90-real)
#      and put next to the CPU-built illmrec, which loads it at start
#   3. a model of Gemma 3 270M's shape with seeded random f32 weights (shape_model.py make)
#   4. `illmrec info`
#   5. parity: `score` (top 50 of 32 users) and `embed` ([REC] states) with --n-gpu-layers 0
#      against 99, within TOL (default 0.01) of the scores' and states' scale (compare.py)
#   6. speed: `bench` on 64 users, CPU and GPU, ms/user and users/s with --batch-users 1,4,16 (and
#      64, which this build refuses: its limit is 16)
#   7. the kiosk load test (examples/loadtest: 8 clients x 40 requests, 2 contexts) on the GPU
#   then summary.md. Each step has its own time limit and the run goes on past a failed step.
#
# Usage (device tool): command "tools/cuda/gpu-check.sh", carry [".gpu-carry"], timeout_s 600.
# Test without a GPU: NO_GPU=1 BACKEND=path/to/libggml-cuda.so (or none) tools/cuda/gpu-check.sh
# Environment: ARCHS, TOL, USERS (bench users, default 64), WARMUP (default 4), PARITY_USERS (default 32), NO_GPU, BACKEND (a prebuilt
# libggml-cuda.so: skips the build), GPU_CARRY (default .gpu-carry), PYTHON, SKIP (steps to skip,
# e.g. "load bench"), LOAD_ARGS (default "8 40 2").
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
carry="$repo/${GPU_CARRY:-.gpu-carry}"
out="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$out"
log="$out/gpu-check.log"
summary="$out/summary.md"
archs="${ARCHS:-90-real}"
tol="${TOL:-0.01}"
users="${USERS:-64}"
parity_users="${PARITY_USERS:-32}"
skip=" ${SKIP:-} "
t_start=$(date +%s)
exec > >(tee -a "$log") 2>&1
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
elapsed() { echo $(( $(date +%s) - t_start )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
[ -d "$carry/bin" ] || { echo "no $carry/bin: run tools/cuda/pack-gpu-check.sh here first and carry it"; exit 2; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for p in python3 tools/.venv/bin/python; do
    if "$p" -c 'import numpy' 2>/dev/null; then python=$p; break; fi
  done
fi

note "# GPU check, $(date -u +%FT%TZ)"
note ""
note "$(cat "$carry/PACKED" 2>/dev/null)"
note ""

step "1. device"
if [ -z "${NO_GPU:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | tee "$out/device.txt"
  note "- device: $(head -1 "$out/device.txt")"
else
  note "- device: none (NO_GPU=1: testing the script's CPU side)"
fi
nvcc_bin=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo "$repo/tools/cuda/.toolkit/cuda/bin/nvcc")
"$nvcc_bin" --version 2>&1 | tail -2
cmake --version 2>&1 | head -1
note "- nvcc: $("$nvcc_bin" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo none), $(cmake --version 2>/dev/null | head -1), python: $python"

run=/tmp/illmrec-gpu-check
rm -rf "$run"; mkdir -p "$run"
cp -a "$carry/bin/." "$run/"
B="$run/illmrec"

step "2. CUDA backend"
if [ -n "${BACKEND:-}" ]; then
  [ "$BACKEND" = none ] || cp "$BACKEND" "$run/libggml-cuda.so"
  note "- backend: ${BACKEND} (not built here)"
elif [ -n "${NO_GPU:-}" ]; then
  note "- backend: not built (NO_GPU=1 without BACKEND)"
elif [[ "$skip" == *" build "* ]]; then
  note "- backend: skipped"
else
  t=$(date +%s)
  export CUDACXX="$nvcc_bin"
  if lib=$(timeout 420 env JOBS="$(nproc)" tools/cuda/build-backend.sh "$carry/ggml" /tmp/ggml-cuda-build "$archs"); then
    cp "$lib" "$run/libggml-cuda.so"
    note "- backend: libggml-cuda.so for $archs built in $(( $(date +%s) - t )) s on $(nproc) cores ($(du -h "$lib" | cut -f1))"
  else
    note "- backend: BUILD FAILED after $(( $(date +%s) - t )) s (see gpu-check.log)"
  fi
fi
# The backend links the CUDA runtime and cuBLAS of the toolkit it was built with.
cuda_lib="$(dirname "$(dirname "$nvcc_bin")")/lib64"
export LD_LIBRARY_PATH="$cuda_lib:$(dirname "$(dirname "$nvcc_bin")")/lib:${LD_LIBRARY_PATH:-}"
[ -f "$run/libggml-cuda.so" ] && { ldd "$run/libggml-cuda.so" | grep -E "cuda|cublas|ggml|not found" | tee "$out/backend-ldd.txt"; }

step "3. model"
model=/tmp/gemma3-shape-random-f32.gguf
if [ ! -f "$model" ]; then
  t=$(date +%s)
  "$python" tools/cuda/shape_model.py make --meta "$carry/gemma3-270m.meta" --out "$model" --type f32 --seed 0
  note "- model: Gemma 3 270M's shape and tokenizer, random f32 weights (seed 0), made in $(( $(date +%s) - t )) s"
fi
export ILLMREC_MODEL="$model"

step "4. info"
timeout 60 "$B" info --model "$model" 2>&1 | tee "$out/info.txt"
note "- info: $(grep -E '^GPU' "$out/info.txt" | head -1); $(grep -E '^backends' "$out/info.txt" | cut -c1-200)"
GPU_LAYERS=99

bundle=models/demo-bundle
common=(--bundle "$bundle" --model "$model" --cache-dir /tmp/illmrec-gpu-check-cache)
if [[ "$skip" != *" parity "* ]]; then
  step "5. parity (tolerance $tol of scale)"
  head -n "$parity_users" "$carry/bench/users.jsonl" > /tmp/illmrec-gpu-check-users.jsonl
  for side in cpu gpu; do
    ngl=0; [ $side = gpu ] && ngl=$GPU_LAYERS
    t=$(date +%s)
    timeout 180 "$B" score "${common[@]}" --n-gpu-layers $ngl --input /tmp/illmrec-gpu-check-users.jsonl \
      --output "$out/score-$side.jsonl" --top-k 50 2>&1 | tail -2
    echo "score $side: $(( $(date +%s) - t )) s"
    timeout 180 "$B" embed "${common[@]}" --n-gpu-layers $ngl --input /tmp/illmrec-gpu-check-users.jsonl \
      --output "$out/states-$side.npy" 2>&1 | tail -1
  done
  p1=$("$python" tools/cuda/compare.py scores "$out/score-cpu.jsonl" "$out/score-gpu.jsonl" --tol "$tol" 2>&1)
  p2=$("$python" tools/cuda/compare.py states "$out/states-cpu.npy" "$out/states-gpu.npy" --tol "$tol" 2>&1)
  echo "$p1"; echo "$p2"
  echo "$p1" > "$out/parity.json"; echo "$p2" >> "$out/parity.json"
  note "- parity, scores: $p1"
  note "- parity, [REC] states: $p2"
  rm -f "$out/states-cpu.npy" "$out/states-gpu.npy"
fi

if [[ "$skip" != *" bench "* ]]; then
  step "6. speed"
  for side in gpu cpu; do
    ngl=0; [ $side = gpu ] && ngl=$GPU_LAYERS
    n=$users; [ $side = cpu ] && n=$(( users / 2 ))
    timeout 240 "$B" bench --bundle "$bundle" --model "$model" --dataset "$carry/bench" --users "$n" \
      --warmup "${WARMUP:-4}" --images 0 --n-gpu-layers $ngl --batch-users 1,4,16 --json > "$out/bench-$side.json" 2> "$out/bench-$side.err"
    echo "bench $side: rc $?"; tail -3 "$out/bench-$side.err"
    [ -s "$out/bench-$side.json" ] && "$python" - "$out/bench-$side.json" "$side" <<'EOF' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1])); side = sys.argv[2]
print(f"- bench {side}: {r.get('threads')} threads, open {r.get('open_seconds', 0):.2f} s, peak RSS {r.get('peak_rss_mib', 0):.0f} MiB")
for row in r.get("rows", []):
    print(f"  - {row['config']}: {row['users']} users, p50 {row['p50_ms']:.1f} ms, mean {row['mean_ms']:.1f} ms/user, {row['users_per_second']:.1f} users/s")
for b in r.get("batched", []):
    print("  - batched: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in b.items()))
EOF
  done
  timeout 60 "$B" bench --bundle "$bundle" --model "$model" --dataset "$carry/bench" --users 4 --warmup 1 \
    --images 0 --n-gpu-layers $GPU_LAYERS --batch-users 64 --json > /dev/null 2> "$out/bench-64.err"
  note "- --batch-users 64: $(tail -1 "$out/bench-64.err" | cut -c1-200)"
fi

if [[ "$skip" != *" load "* ]] && [ -x "$run/loadtest" ]; then
  step "7. kiosk load test"
  # The load test runs <build folder>/target/release/illmrec on <build folder>/models/demo-bundle.
  md=$(cat "$carry/manifest_dir")
  if [ -e "$md/target/release/illmrec" ] && [ ! -e "$md/target/release/.gpu-check" ]; then
    note "- load test: skipped ($md/target/release/illmrec exists and is not this check's)"
  else
    mkdir -p "$md/target/release"
    cp -a "$run/." "$md/target/release/"; touch "$md/target/release/.gpu-check"
    # The load test starts `illmrec serve` with its own options; a CPU-variants binary offloads
    # nothing by default, so a wrapper adds --n-gpu-layers to serve.
    mv "$md/target/release/illmrec" "$md/target/release/illmrec.real"
    printf '#!/bin/sh\nd=$(dirname "$0")\nif [ "$1" = serve ]; then exec "$d/illmrec.real" "$@" --n-gpu-layers %s; fi\nexec "$d/illmrec.real" "$@"\n' "$GPU_LAYERS" > "$md/target/release/illmrec"
    chmod +x "$md/target/release/illmrec"
    [ -e "$md/models/demo-bundle" ] || { mkdir -p "$md"; ln -sfn "$repo/models" "$md/models"; }
    timeout 300 "$run/loadtest" ${LOAD_ARGS:-8 40 2} 2>&1 | tee "$out/loadtest.txt"
    note "- load test (clients, requests, contexts: ${LOAD_ARGS:-8 40 2}; serve --n-gpu-layers $GPU_LAYERS):"
    sed 's/^/    /' "$out/loadtest.txt" | head -30 >> "$summary"
  fi
fi

note ""
note "total $(elapsed) s"
