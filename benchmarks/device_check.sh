#!/usr/bin/env bash
# GPU checks for a fresh GPU machine that already has PyTorch and Triton and no network:
#   benchmarks/device_check.sh RESULTS_DIR
# Installs fastlm without touching its dependencies, runs the GPU tests (the Triton kernels compiled
# for real, bf16 included) and the GPU benchmarks, and writes logs and JSON results to RESULTS_DIR
# (at most 8 files). Sized to finish within about 8 minutes on an H100.
set -uo pipefail
R=${1:?usage: benchmarks/device_check.sh RESULTS_DIR}
mkdir -p "$R"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
t0=$(date +%s)
since() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0))"
} > "$R/env.txt" 2>&1
cat "$R/env.txt"

since "installing fastlm (no dependencies touched)"
if ! FASTLM_BUILD_JOBS=16 $PY -m pip install --no-deps --no-build-isolation -e . > "$R/build.log" 2>&1; then
  tail -n 30 "$R/build.log"; echo "build failed"; exit 1
fi

since "GPU tests"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_kernel_attention.py tests/test_kernel_cross_entropy.py \
  tests/test_model.py 2>&1 | tee "$R/tests.log" | tail -n 15

since "GPU benchmarks"
FASTLM_BENCH_OUT="$R" timeout 330 $PY -m pytest -q -s -p no:cacheprovider benchmarks/test_attention_speed.py \
  benchmarks/test_cross_entropy_speed.py benchmarks/test_train_speed.py "benchmarks/test_generate_speed.py::test_gpu_decoding_gpt60m" 2>&1 | tee "$R/bench.log" | grep -E "fastlm|bar|passed|failed|error" | tail -n 40

since "done"
ls -l "$R"
