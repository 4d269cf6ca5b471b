#!/usr/bin/env bash
# Creates tools/.venv from tools/requirements.txt. Idempotent: a stamp file holds the
# sha256 of requirements.txt, and nothing is done while it matches.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    echo "setup-venv: $venv is up to date (requirements sha256 $want)"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup-venv: creating $venv with $("$python" --version)"
    "$python" -m venv "$venv"
fi
rm -f "$stamp"

echo "setup-venv: installing $req (torch is a ~3 GB download the first time)"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install -r "$req"

# triton is a torch dependency only needed for GPU kernels; dropping it saves ~1 GB.
echo "setup-venv: removing triton (not needed on CPU)"
"$venv/bin/python" -m pip uninstall -y triton || true

echo "$want" > "$stamp"
echo "setup-venv: done; use $venv/bin/python"
