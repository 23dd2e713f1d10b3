#!/usr/bin/env bash
# Set up, then TIES-merge three generated sample experts on embedded Ray into out/demo.
# The sample models (seed 0, built once, then reused) and merge.yaml go to out/demo-work/, so a rerun is a
# no-op that prints the same manifest summary (an interrupted one resumes). An out/demo holding
# another run (e.g. from an older demo) is refused: pass --overwrite to replace it
# (bash scripts/demo.sh --overwrite). Other arguments go to `mergefleet demo` too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/mergefleet demo --output out/demo "$@"
