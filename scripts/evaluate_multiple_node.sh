#!/bin/bash
# Evaluation on several nodes with the DeepSpeed launcher (the original's scripts/evaluate_multiple_node.sh):
#   DATA_PATH=/data/eval HOST_FILE_PATH=hostfile bash scripts/evaluate_multiple_node.sh tasks/mmlu tasks/lambada
# The hostfile lists one node per line as `hostname slots=N`. NUM_WORKERS nodes x NUM_GPUS_PER_WORKER processes
# run; with MP_SIZE from the model config that is NUM_WORKERS * NUM_GPUS_PER_WORKER / MP_SIZE data-parallel replicas.
# DEEPSPEED_ARGS adds launcher flags, e.g. "--no_ssh --node_rank 0 --master_addr 10.0.0.1" to start each node by hand.
# The output is also written to logs/<YYYY.MM.DD-HH:MM:SS>.log.

script_path=$(realpath "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
source "${script_dir}/common.sh"

NUM_WORKERS="${NUM_WORKERS:-16}"
NUM_GPUS_PER_WORKER="${NUM_GPUS_PER_WORKER:-8}"
HOST_FILE_PATH="${HOST_FILE_PATH:-<your hostfile>}"
OPTIONS_NCCL="${OPTIONS_NCCL:-NCCL_IB_DISABLE=0 NCCL_NET_GDR_LEVEL=2 CUDA_LAUNCH_BLOCKING=0}"
DATA_PATH="${DATA_PATH:-<your evaluation dataset base directory>}"

if [ ! -f "${HOST_FILE_PATH}" ]; then
    echo "error: hostfile '${HOST_FILE_PATH}' not found: set HOST_FILE_PATH (lines of 'hostname slots=N')" >&2
    exit 2
fi

ARGS=("${main_dir}/evaluate.py" --mode inference --data-path "$DATA_PATH" --task "$@")

TIMESTAMP=$(date +'%Y.%m.%d-%H:%M:%S')
mkdir -p logs
# shellcheck disable=SC2086  # OPTIONS_NCCL, DEEPSPEED_ARGS and MODEL_ARGS are split on purpose
env ${OPTIONS_NCCL} deepspeed --num_nodes "${NUM_WORKERS}" --num_gpus "${NUM_GPUS_PER_WORKER}" \
    --hostfile "${HOST_FILE_PATH}" ${DEEPSPEED_ARGS} "${ARGS[@]}" $MODEL_ARGS 2>&1 | tee "logs/${TIMESTAMP}.log"
exit "${PIPESTATUS[0]}"
