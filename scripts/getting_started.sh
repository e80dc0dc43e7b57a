#!/usr/bin/env bash
# The main job: the getting-started tutorial on the shipped RedPajama sample, end to end, from a fresh
# machine (it installs what it needs): raw indexes, packed token files, training with evaluation on the
# test split (the 60M model on GPUs; a tiny model on a CPU-only machine, about a minute on 2 cores), the
# loss plot, and a continuation of a sample prompt from the trained checkpoint.
# A second run reuses what is already there (existing files are skipped, a finished run is not retrained).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
step() { printf '\n== %s\n' "$*"; }
timed() {  # timed LABEL CMD...: run, then report the step's wall time
  local label=$1; shift
  local t0=$EPOCHREALTIME
  "$@"
  awk -v l="$label" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "-- %s: %.2f s\n", l, b - a }' 
}

if [ "${FASTLM_SKIP_SETUP:-0}" = 1 ]; then  # a machine that has fastlm and its dependencies (the GPU check)
  step "set-up skipped (FASTLM_SKIP_SETUP=1)"
  PY=${PYTHON:-python3}
  # the `fastlm` command sits where this interpreter's pip puts scripts, which need not be on PATH
  PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
else
  step "set-up (.venv, fastlm with its C++ extension)"
  timed "set-up" bash scripts/setup.sh
  source .venv/bin/activate
  PY=python
fi
cd examples/getting_started

for split in train test; do
  step "create_raw_index: $split"
  timed "index $split" fastlm data create_raw_index --file_existence_policy skip \
    --index_path data/mem_map/redpajama_v2_samples_512_$split.idx data/raw/redpajama_v2_samples_512_$split.jsonl
done
for split in train test; do
  step "pack_encoded_data: $split"
  timed "pack $split" fastlm data pack_encoded_data example_dataset_config_$split.yaml --file_existence_policy skip
done
step "inspect the packed training data"
fastlm data inspect data/mem_map/redpajama_v2_samples_512_train.pbin --tokenizer tokenizer | head -n 8

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
  config=example_config.yaml run=gpt60m_redpajama
  launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m fastlm.train)  # torchrun
else
  config=example_config_cpu.yaml run=tiny_redpajama
  launch=("$PY" -m fastlm.train)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
fi
overrides=(run.resume=auto)
if ! "$PY" -c "import wandb" 2>/dev/null; then  # the configs log to wandb offline; it is optional
  echo "wandb is not installed: this run logs to metrics.jsonl only (pip install wandb for its offline log)"
  overrides+=(logging.wandb_mode=disabled)
fi
step "train: ${launch[*]} $config ${overrides[*]}"
if [ -f "checkpoints/$run/model.safetensors" ]; then
  echo "checkpoints/$run is trained already (delete it to train again)"
else
  timed "train" "${launch[@]}" "$config" "${overrides[@]}"
fi

step "loss plot"
if "$PY" -c "import matplotlib" 2>/dev/null; then
  timed "plot" fastlm plot "checkpoints/$run"
else
  echo "skipped: matplotlib is not installed (pip install matplotlib, then: fastlm plot checkpoints/$run)"
fi

step "generate from the checkpoint"
timed "generate" "$PY" -m fastlm.generate --config_file_path example_text_generation_config.yaml \
  --checkpoint "checkpoints/$run" --prompt "The best way to learn a new language is" --max-new-tokens 40

step "outputs"
echo "packed data:    $ROOT/examples/getting_started/data/mem_map/"
echo "run folder:     $ROOT/examples/getting_started/checkpoints/$run/ (metrics.jsonl, checkpoints/, model.safetensors)"
echo "loss plot:      $ROOT/examples/getting_started/checkpoints/$run/loss.png"
echo "chat with it:   cd examples/getting_started && fastlm generate_text --config_file_path example_text_generation_config.yaml \\"
echo "                    --checkpoint checkpoints/$run"
