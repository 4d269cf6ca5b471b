#!/usr/bin/env bash
# The full test suite: Rust (unit, integration, end to end on the real default model) and the
# Python tools' tests on a slice of the real data. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-prereqs.sh
models/fetch-default-model.sh
tools/setup-venv.sh
cargo test --release
PYTHONPATH=tools OMP_NUM_THREADS=1 tools/.venv/bin/python -m pytest -q tools/tests
