#!/usr/bin/env bash
# The main job: the getting-started tutorial on the shipped RedPajama sample, end to end, from a fresh
# machine (it installs what it needs). Today this is the data part: raw indexes, packed token files and
# a look inside them; training and generation join as they land.
# A second run reuses what is already there (file_existence_policy skip).
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

step "set-up (.venv, fastlm with its C++ extension)"
timed "set-up" bash scripts/setup.sh
source .venv/bin/activate
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
fastlm data inspect data/mem_map/redpajama_v2_samples_512_train.pbin --tokenizer tokenizer | head -n 11

step "outputs"
ls -l data/mem_map/ | sed "s|^|  |"
echo "in $ROOT/examples/getting_started/data/mem_map"
