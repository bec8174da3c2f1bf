#!/bin/bash
# Evaluation on one node (the original's scripts/evaluate.sh). Every argument is a task YAML file or a folder of
# them; flags may follow the tasks (--limit N, --output-path DIR, --seed S):
#   DATA_PATH=/path/to/evaluation/data bash scripts/evaluate.sh tasks/bloom/glue_cola.yaml tasks/mmlu
# MP_SIZE processes are started with torchrun (the model config decides MP_SIZE; MODEL_CONFIG=... picks another
# config). Without a checkpoint at $CHECKPOINT_PATH the embedded demo model is used (see scripts/common.sh).
# The output is also written to logs/<YYYY.MM.DD-HH:MM:SS>.log; results go to outputs/<task name>/.

script_path=$(realpath "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
source "${script_dir}/common.sh"

DATA_PATH="${DATA_PATH:-<your evaluation dataset base directory>}"

ARGS=("${main_dir}/evaluate.py" --mode inference --data-path "$DATA_PATH" --task "$@")

TIMESTAMP=$(date +'%Y.%m.%d-%H:%M:%S')
mkdir -p logs
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags, split on purpose as in the original
launch "$MP_SIZE" "${ARGS[@]}" $MODEL_ARGS 2>&1 | tee "logs/${TIMESTAMP}.log"
exit "${PIPESTATUS[0]}"
