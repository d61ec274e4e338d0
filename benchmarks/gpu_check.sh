#!/usr/bin/env bash
# The device check, for a machine with a GPU. From the repository root:
#
#   bash benchmarks/gpu_check.sh                        # writes gpu_check.json and gpu_check.log to $OUT, else reports/gpu/
#   bash benchmarks/gpu_check.sh --tiny --device cpu    # the same code on tiny sizes, on the CPU (what the tests run)
#   bash benchmarks/gpu_check.sh --help                 # parts, caps, budget
#
# Needs only a python3 with torch, numpy, scipy, pandas, scikit-image and tqdm: mefbench itself is
# not installed, it is imported from this checkout (PYTHONPATH=.). Every part runs in its own
# process under its own time cap, and the whole check stops by itself within 420 s (about 3 to 4
# minutes of work on one H200). Set GIT_COMMIT to record the commit where .git did not travel.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m mefbench.gpu_check "$@"
