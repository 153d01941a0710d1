#!/usr/bin/env bash
# Create .venv and install recengine, its first-party plugins and the test tools.
# Needs only Python >= 3.11 with pip; re-running skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "recengine needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.recengine-installed
want=$(cat pyproject.toml plugins/*/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "Installing recengine into .venv (first run takes a few minutes)..."
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# Pin torch only when none is installed: 2.13.0 satisfies the plugin's range, and on a machine with a
# local CPU wheel it avoids pulling the newest CUDA build. A GPU machine keeps the torch it has.
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
# The ray extra too, so the Ray engine's tests (tests/test_ray.py) run in CI.
.venv/bin/python -m pip install -q -e ".[test,ray]" -e plugins/recengine-transformers -e plugins/recengine-images
echo "$want" > "$stamp"
