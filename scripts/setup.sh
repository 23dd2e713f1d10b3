#!/usr/bin/env bash
# Create .venv and install mergefleet into it (editable). `--test` adds the test extras.
# torch is pinned in the same pip command so pip takes the local CPU wheel, not a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e ".${extras}"
