#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: set up .venv, then pytest (all markers).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
scripts/setup.sh
# nnSSL builds ResEnc-L with dynamic-network-architectures; one test compares our model with it.
# It imports without its heavy dependencies (timm, torchvision), so --no-deps.
.venv/bin/python -m pip install -q --no-deps dynamic-network-architectures==0.4.4
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest "$@"
