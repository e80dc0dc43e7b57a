#!/usr/bin/env bash
# Creates .venv (once) and installs fastlm (building its C++ extension) with what the tests need.
# Safe to re-run: requirements are re-checked only when requirements-dev.txt changes, the extension is
# rebuilt only when csrc/ or setup.py is newer than it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  "${PIP[@]}" --upgrade pip
fi
stamp=.venv/.requirements-dev.sha256
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch: the CPU wheel on local disk where the machine has one (PyPI's torch 2.13.0 is a CUDA build)
  cpu_torch=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$cpu_torch" ]; then
    "${PIP[@]}" "$cpu_torch"
  fi
  "${PIP[@]}" -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
so=$(ls fastlm/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc kernels/attention_host.cpp setup.py pyproject.toml -newer "$so" 2>/dev/null | head -n 1)" ] \
   || ! .venv/bin/python -c "import fastlm._C, torch, fastlm._attention_host" 2>/dev/null; then
  echo "building fastlm (C++ extension, about a minute on 2 cores)..."
  if ! "${PIP[@]}" --no-build-isolation --no-deps -e . > .venv/build.log 2>&1; then
    cat .venv/build.log
    exit 1
  fi
fi
# Bytecode for the package, as a regular (non-editable) install would have: a command's start-up then does
# not recompile fastlm's modules where PYTHONDONTWRITEBYTECODE is set (up-to-date files are skipped).
.venv/bin/python -m compileall -q fastlm kernels > /dev/null
