#!/bin/bash
# The OpenAI-compatible HTTP server (server.py). Extra flags go last and override the defaults:
#   bash scripts/server.sh --port 8000 --max-slots 8
# The model config is the one generate.sh uses: configs/model_glm_130b.sh (MODEL_CONFIG=... picks another); without
# a checkpoint at $CHECKPOINT_PATH the embedded demo model is used (see scripts/common.sh).

script_path=$(realpath "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script_path")
source "${script_dir}/common.sh"

ARGS=("${main_dir}/server.py"
      --seed 1234
      --mode inference
      --host 127.0.0.1
      --port 8000)

# exec (not common.sh's launch): a signal sent to this script reaches the server itself, which shuts down cleanly.
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags, split on purpose as in the original
if [ "${MP_SIZE}" -gt 1 ]; then
    exec python -m torch.distributed.run --nproc_per_node "${MP_SIZE}" --master_port "${MASTER_PORT:-29500}" \
        "${ARGS[@]}" $MODEL_ARGS "$@"
fi
exec python "${ARGS[@]}" $MODEL_ARGS "$@"
