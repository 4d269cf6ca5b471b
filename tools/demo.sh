#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian/Ubuntu machine with Rust and Python 3: installs the
# build prerequisites, builds illmrec (release), fetches the default model, and recommends movies
# for a sample history from the shipped demo bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-prereqs.sh
models/fetch-default-model.sh
echo "building illmrec (release; the first build compiles llama.cpp, about 4-6 minutes on 2 cores) ..."
cargo build --release --quiet
bin=target/release/illmrec
history=${DEMO_HISTORY:-$(cat models/demo-bundle/sample-history.txt)}
echo
echo "\$ $bin recommend --bundle models/demo-bundle --history $history --top-k 10"
"$bin" recommend --bundle models/demo-bundle --history "$history" --top-k 10
