#!/usr/bin/env bash
# Build the folder of wheels that benchmarks/gpu_suite.py needs on a GPU machine that has its own torch
# but none of our other dependencies and no registry (the lent H200: torch 2.11 on Python 3.12).
#
#   scripts/device_wheels.sh [OUT]          # default OUT: .whl (ignored by git; see the device notes)
#   # there, with OUT carried along:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --find-links OUT \
#       -r OUT/requirements.txt
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu_suite.py
#
# What goes in (versions: those of this checkout's .venv, i.e. what the tests ran with):
# - deepspeed built here as a pure-Python wheel with --no-build-isolation and DS_BUILD_OPS=0, so no
#   CUDA torch is pulled and nothing is compiled (its ops JIT-compile on first use, and the suite
#   uses none: AdamW is torch's);
# - binary wheels for CPython 3.11 and 3.12 on manylinux x86_64 of pydantic-core, PyYAML, numpy and
#   msgpack; pure-Python (or abi3) wheels of the rest of what deepspeed and ds_simclr import;
# - ds_simclr itself (installed --no-deps there: it pins torch 2.13, the GPU keeps its own torch).
# torch is never included. About 43 MB, two thirds of it numpy.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
OUT=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
PYTHONS=(3.11 3.12)
BINARY=(pydantic-core PyYAML numpy msgpack)
PURE=(pydantic annotated-types typing-inspection typing-extensions hjson einops ninja packaging psutil py-cpuinfo tqdm)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

pinned() {  # NAME==VERSION for each NAME, as installed in $PY's environment
    "$PY" -c "import importlib.metadata as m, sys; print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" "$@"
}

rm -rf "$OUT"
mkdir -p "$OUT"
pip=("$PY" -m pip --disable-pip-version-check -q)
download=(download --no-deps --only-binary=:all: --implementation cp "${PLATFORMS[@]/#/--platform=}" -d "$OUT")
for version in "${PYTHONS[@]}"; do
    # shellcheck disable=SC2046  # one word per requirement
    "${pip[@]}" "${download[@]}" --python-version "$version" $(pinned "${BINARY[@]}")
done
# shellcheck disable=SC2046
"${pip[@]}" "${download[@]}" --python-version "${PYTHONS[-1]}" $(pinned "${PURE[@]}")
DS_BUILD_OPS=0 "${pip[@]}" wheel --no-deps --no-build-isolation -w "$OUT" "$(pinned deepspeed)"

# ds_simclr from a copy of the sources, so the build leaves nothing in the checkout
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md ds_simclr "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"${pip[@]}" wheel --no-deps --no-build-isolation -w "$OUT" "$src"

# one NAME==VERSION per distribution: pip picks the wheel that fits the interpreter (cp311 or cp312)
find "$OUT" -name '*.whl' -printf '%f\n' | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' | sort -u >"$OUT/requirements.txt"
echo "$(wc -l <"$OUT/requirements.txt") packages, $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
