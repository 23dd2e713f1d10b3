#!/usr/bin/env bash
# Set up, then TIES-merge three generated sample experts on embedded Ray into out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/mergefleet demo --output out/demo "$@"
