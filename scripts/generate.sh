#!/bin/bash
# Blank filling / generation (the original's scripts/generate.sh). Extra flags go last and override the defaults:
#   bash scripts/generate.sh --input-source input.txt --batch-size 8
#   bash scripts/generate.sh --sampling-strategy BeamSearchStrategy --num-beams 4
# The model config is configs/model_glm_130b.sh (MODEL_CONFIG=... picks another); without a checkpoint at
# $CHECKPOINT_PATH the embedded demo model is used (see scripts/common.sh).

script_path=$(realpath "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
source "${script_dir}/common.sh"

SEED=1234
MAX_OUTPUT_LENGTH=256
MIN_GEN_LENGTH=0
# BeamSearchStrategy args
NUM_BEAMS=4
LENGTH_PENALTY=1.0
NO_REPEAT_NGRAM=3
# BaseStrategy args
TEMP=1.0
TOPK=0
TOPP=0.7

ARGS=("${main_dir}/generate.py"
      --seed "$SEED"
      --mode inference
      --sampling-strategy BaseStrategy
      --out-seq-length "$MAX_OUTPUT_LENGTH"
      --min-gen-length "$MIN_GEN_LENGTH"
      --num-beams "$NUM_BEAMS"
      --length-penalty "$LENGTH_PENALTY"
      --no-repeat-ngram-size "$NO_REPEAT_NGRAM"
      --temperature "$TEMP"
      --top_k "$TOPK"
      --top_p "$TOPP"
      --output-path samples)

# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags, split on purpose as in the original
launch "$MP_SIZE" "${ARGS[@]}" $MODEL_ARGS "$@"
