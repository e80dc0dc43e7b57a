#!/usr/bin/env bash
# GPU checks for a fresh GPU machine that already has PyTorch and Triton and no network:
#   benchmarks/device_check.sh RESULTS_DIR [SECONDS]
# FASTLM_COMMIT=<hash> names the commit in the results: give it as a literal from the machine that has the
# history (a copied tree's own git metadata may name an older commit; on 2026-11-27 it named the last landed one).
# Installs fastlm without touching its dependencies, runs the GPU tests (the Triton kernels compiled for
# real, bf16 included), an attention profile, the GPU benchmarks (training ones with a step profile), the
# README's main job, a compiled-block probe of the attention and the per-rank cost of the two
# data-parallel modes, and writes logs and JSON results to
# RESULTS_DIR (8 files at most). Every step has its own time limit and the whole script a deadline
# (SECONDS, default 480), so that a slow or hung step still leaves the results of the others.
# FASTLM_CHECKS=tests,kernels,getting_started,train,profile,dp,probe (the default: all, in this order)
# picks steps and their order, e.g. the ones a first call's deadline cut, for a second call on the same
# machine, or the most needed first;
# FASTLM_TRAIN_K is the training benchmark's pytest -k expression (default: "not data_parallel").
set -uo pipefail
R=${1:?usage: benchmarks/device_check.sh RESULTS_DIR [SECONDS]}
BUDGET=${2:-480}
mkdir -p "$R"
R=$(cd "$R" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
t0=$(date +%s)
since() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
# limit CAP: CAP seconds, or what is left before the deadline if that is less
limit() { local left=$(( BUDGET - ($(date +%s) - t0) )); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }
ALL_STEPS="tests,kernels,getting_started,train,profile,dp,probe"
IFS=, read -r -a STEPS <<< "${FASTLM_CHECKS:-$ALL_STEPS}"
for check in "${STEPS[@]}"; do
  [[ ",$ALL_STEPS," == *",$check,"* ]] || { echo "FASTLM_CHECKS: unknown step '$check' (steps: $ALL_STEPS)"; exit 2; }
done

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: ${FASTLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0))"
  nproc
} > "$R/env.txt" 2>&1
cat "$R/env.txt"

since "installing fastlm (no dependencies touched)"
# (the build log comes back only when the build fails: results may hold at most 8 files)
if ! FASTLM_BUILD_JOBS=$(nproc) timeout "$(limit 180)" $PY -m pip install --no-deps --no-build-isolation -e . \
    > /tmp/fastlm-build.log 2>&1; then
  cp /tmp/fastlm-build.log "$R/build.log"; tail -n 30 "$R/build.log"; echo "build failed"; exit 1
fi

step_tests() {
  since "GPU tests: kernels compiled for real (fp32, fp16, bf16), the model, a deterministic resume"
  # First, on their own, the tests that decide open questions (a deterministic GPU run resumes bit for
  # bit; the C++ host path launches what the Python path launches): a deadline that cuts the long run
  # below still leaves their verdicts.
  local first=("tests/test_train.py::test_gpu_deterministic_run_resumes_bit_for_bit"
               "tests/test_kernel_launch.py::test_gpu_host_path_matches_the_python_path")
  TORCHINDUCTOR_COMPILE_THREADS=1 timeout -s INT -k 20 "$(limit 150)" \
    $PY -m pytest -v -p no:cacheprovider -rfEs --tb=short "${first[@]}" > "$R/tests.log" 2>&1
  echo "exit $? (the deciding tests)" >> "$R/tests.log"
  # Then the rest. Each test process compiles its own kernels (every autotune config, CPU-bound): spread
  # them over the cores (an H100 machine's 16 took 174 s with 8 processes). -v names each test as it ends:
  # a limit that interrupts pytest's final summary (as one did while xdist's workers waited on inductor's
  # compile-worker pools to exit, which TORCHINDUCTOR_COMPILE_THREADS=1 leaves out) loses no failure.
  local xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n $(( $(nproc) < 16 ? $(nproc) : 16 ))"
  TORCHINDUCTOR_COMPILE_THREADS=1 timeout -s INT -k 20 "$(limit 180)" \
    $PY -m pytest -v -p no:cacheprovider $xdist --durations=8 -rfEs \
    --tb=short -W ignore::pytest_benchmark.logger.PytestBenchmarkWarning \
    tests/test_kernel_attention.py tests/test_kernel_cross_entropy.py tests/test_kernel_launch.py \
    tests/test_model.py --deselect "${first[1]}" >> "$R/tests.log" 2>&1
  echo "exit $? (the rest)" >> "$R/tests.log"; grep -E "FAILED|ERROR" "$R/tests.log" | head -n 20
  grep -E "^exit|passed|failed" "$R/tests.log" | tail -n 6
}

bench() {  # bench CAP FILES...: one pytest session per group, so each group writes its own JSON
  local cap=$1; shift
  since "benchmarks: $*"
  FASTLM_BENCH_OUT="$R" timeout "$(limit "$cap")" $PY -m pytest -q -s -p no:cacheprovider -rfE "$@" \
    >> "$R/bench.log" 2>&1
  echo "exit $? ($*)" >> "$R/bench.log"
  grep -E "fastlm .* vs |MFU|passed|failed|error|Error|exit " "$R/bench.log" | tail -n 12
}

step_kernels() {  # (the dq modes last: the bulk one has never run on a GPU before 2026-11-27)
  bench 170 benchmarks/test_attention_speed.py benchmarks/test_cross_entropy_speed.py \
    benchmarks/test_attention_host_path.py benchmarks/test_attention_dq_modes.py
}

step_getting_started() {
  since "the getting-started pipeline on the GPU (the README's main job, set-up skipped)"
  FASTLM_SKIP_SETUP=1 timeout "$(limit 200)" bash scripts/getting_started.sh > "$R/getting_started.log" 2>&1
  echo "exit $?" >> "$R/getting_started.log"; grep -E "^-- |^== |exit " "$R/getting_started.log" | tail -n 20
}

step_train() {
  bench 300 benchmarks/test_train_speed.py -k "${FASTLM_TRAIN_K:-not data_parallel}"
}

step_profile() {
  since "attention profile (autotuner choices, GPU time per kernel: both dq modes, both program orders; host cost)"
  { echo; echo "=== attention kernels ==="; } >> "$R/profile.txt"
  timeout "$(limit 120)" $PY benchmarks/attention_profile.py >> "$R/profile.txt" 2>&1
  echo "exit $?" >> "$R/profile.txt"; tail -n 40 "$R/profile.txt"
}

# The index benchmark is CPU work: a GPU machine's many cores show how the whole command scales; then
# FSDP2 and DDP over a one-rank process group against the single-device path: what each data-parallel mode
# costs a rank's step. One pytest session: one JSON file, as results may hold 8 files at most.
step_dp() {
  bench 240 "benchmarks/test_data_speed.py::test_create_raw_index" \
    "benchmarks/test_generate_speed.py::test_gpu_decoding_gpt60m" \
    "benchmarks/test_train_speed.py::test_gpt124m_data_parallel_cost_per_rank"
}

step_probe() {
  since "attention inside a compiled block: the packed op (the model's) vs split views vs SDPA vs eager vs traced"
  { echo; echo "=== compiled gpt124m block ==="; } >> "$R/profile.txt"
  timeout "$(limit 200)" $PY benchmarks/attention_profile.py --compiled-block >> "$R/profile.txt" 2>&1
  echo "exit $?" >> "$R/profile.txt"; tail -n 12 "$R/profile.txt"
}

: > "$R/profile.txt"  # the training benchmark and the attention diagnostics append to it
for check in "${STEPS[@]}"; do
  "step_$check"
done

since "done"
ls -l "$R"
