#!/usr/bin/env bash
# Set up .venv with the pinned torch and mefbench (editable) plus the extras named in $1
# (default "test"). Safe to run again: an existing .venv is reused and nothing is reinstalled
# that is already there.
#
# torch: `pip install torch==2.13.0` takes the CPU build on this project's machines (their pip has
# a local wheel folder). On an ordinary Linux machine with internet access the same line takes the
# CUDA build from PyPI, with several GB of NVIDIA packages: right for a GPU machine. For the CPU
# build elsewhere, point pip at PyTorch's CPU index:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
    python -m pip install torch==2.13.0
fi
python -m pip install -e ".[${extras}]"
