#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, reproduce every table at smoke scale (one seed)
# and write its report to reports/smoke/README.md. Safe to run again: finished runs under
# runs/smoke are kept, unfinished ones resumed, and the report rewrites only its own files.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
mefbench reproduce --scale smoke --seeds 1 --runs runs/smoke --out reports/smoke --no-progress
