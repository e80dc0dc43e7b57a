#!/usr/bin/env bash
# The test command: set up (idempotent), then the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest tests -q "$@"
