#!/usr/bin/env bash
# The test command: set up (idempotent), then the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
export PATH="$PWD/.venv/bin:$PATH"  # the `fastlm` entry point itself is under test
exec .venv/bin/python -m pytest tests -q "$@"
