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

# One process: exec, so a signal sent to this script reaches the server itself, which shuts down cleanly.
# Several (torchrun): SIGTERM/SIGINT sent to this script go to the server's processes (rank 0 drains the requests
# and stops every rank; the others ignore the signal), never to torchrun, whose own handler would kill the ranks and
# exit non-zero with a traceback; torchrun leaves SIGINT alone (a terminal's Ctrl-C reaches this script). The
# script exits with torchrun's status: 0 after a clean stop, non-zero when a rank failed (docs/failures.md).
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags, split on purpose as in the original
if [ "${MP_SIZE}" -gt 1 ]; then
    TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGHUP,SIGQUIT" python -m torch.distributed.run \
        --nproc_per_node "${MP_SIZE}" --master_port "${MASTER_PORT:-29500}" "${ARGS[@]}" $MODEL_ARGS "$@" &
    launcher=$!
    trap 'kill -TERM $(ps -o pid= --ppid "${launcher}") 2>/dev/null' TERM INT
    while true; do
        wait "${launcher}"
        status=$?
        kill -0 "${launcher}" 2>/dev/null || exit "${status}"  # still running: a trapped signal ended the wait
    done
fi
exec python "${ARGS[@]}" $MODEL_ARGS "$@"
