#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: set up .venv, then pytest (all markers).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
scripts/setup.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest "$@"
