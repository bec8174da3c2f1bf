#!/bin/bash
# lm-evaluation-harness with the model in-process, scoring as GLM-130B's evaluation does (lm_eval_harness.py,
# `--model glm130b`). Every argument goes to lm_eval (the model flags come from the config):
#   bash scripts/lm_eval.sh --tasks hellaswag,wikitext --limit 100 --output_path results
#   bash scripts/lm_eval.sh --tasks glm_choices --include_path tests/data/lm_eval/tasks   # the tests' local tasks
# The model config is configs/model_glm_130b.sh (MODEL_CONFIG=... picks another); without a checkpoint at
# $CHECKPOINT_PATH the embedded demo model is used (see scripts/common.sh). MP_SIZE processes start with torchrun.
# Datasets and tokenizers are read offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE default to 1): give tasks over
# local files or a dataset cache filled beforehand (set them to 0 to let lm_eval download).

script_path=$(realpath "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
source "${script_dir}/common.sh"

export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags, split on purpose as in the original
launch "$MP_SIZE" "${main_dir}/lm_eval_harness.py" --mode inference $MODEL_ARGS "$@"
