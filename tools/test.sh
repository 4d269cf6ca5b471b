#!/usr/bin/env bash
# The full test suite: Rust (unit, integration, end to end on the real default model) and the
# Python tools' tests on a slice of the real data. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-prereqs.sh
models/fetch-default-model.sh
tools/setup-venv.sh
cargo test --release
# The Python bindings (maturin, pinned in tools/python/pyproject.toml): a cargo workspace member
# sharing target/, so only pyo3 and the bindings compile here (about 30 s), not llama.cpp.
tools/.venv/bin/python -m pip install --quiet ./tools/python
PYTHONPATH=tools OMP_NUM_THREADS=1 tools/.venv/bin/python -m pytest -q tools/tests tools/python/tests
