#!/bin/bash
# Benchmark (the original's scripts/benchmark.sh, extended): encode latency at 512/1024/2048 tokens as the original
# prints it, plus decode tokens/s per weight format, evaluation throughput, peak RSS, and this machine's measured
# memory bandwidth and matmul peak with the ratios against them. Extra flags go to benchmark.py:
#   bash scripts/benchmark.sh --json bench.json     # the benchmark model (configs/model_glm_bench.sh, made on first use)
#   bash scripts/benchmark.sh --quick --json q.json # the tiny demo model, small sizes: a smoke test (CI)
#   MODEL_CONFIG=configs/model_glm_130b.sh bash scripts/benchmark.sh   # another config (e.g. the real model)
# The output is also written to logs/<YYYY.MM.DD-HH:MM:SS>.log.

script_path=$(realpath "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
main_dir=$(dirname "$script_dir")
if [[ " $* " == *" --quick "* ]]; then
    export MODEL_CONFIG="${MODEL_CONFIG:-${main_dir}/configs/model_glm_demo.sh}"
else
    export MODEL_CONFIG="${MODEL_CONFIG:-${main_dir}/configs/model_glm_bench.sh}"
fi
source "${script_dir}/common.sh"

ARGS=("${main_dir}/benchmark.py" --mode inference)

TIMESTAMP=$(date +'%Y.%m.%d-%H:%M:%S')
mkdir -p logs
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags, split on purpose as in the original
echo "launch $MP_SIZE ${ARGS[*]} $MODEL_ARGS $*"
launch "$MP_SIZE" "${ARGS[@]}" $MODEL_ARGS "$@" 2>&1 | tee "logs/${TIMESTAMP}.log"
exit "${PIPESTATUS[0]}"
