#!/usr/bin/env bash
# Fetch, on this machine, the wheels the GPU machines lack (Python 3.12, x86-64) into .whl/,
# for `bench/gpu_check.sh` to install there (its first step) when the device call carries them:
#
#   bash bench/gpu_wheels.sh            # here, once (needs the package index)
#   run(command="bash bench/gpu_check.sh", carry=[".whl"])   # on the device machine
#
# Their image has pandas, pyarrow, fsspec, xxhash, huggingface-hub, pyyaml and aiohttp
# (../.library/device/KINDS.md) but not `datasets` (the prepared corpus: the online bench's
# corpus, the teacher pass), its `dill` and `multiprocess`, `rapidfuzz` (the soft vocabulary
# map) or `editdistance` (the reference alignment). The versions are this machine's, so both
# sides run the same code. About 5 MB; .whl/ is git-ignored and travels only when carried.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in datasets dill multiprocess rapidfuzz editdistance; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$(version "$pkg")"
done
ls -la .whl
