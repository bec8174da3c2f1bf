# Sourced by the scripts: picks the model config and the launcher.
#   MODEL_CONFIG   config to source (default configs/model_glm_130b.sh; e.g. configs/model_glm_130b_int4.sh)
#   CHECKPOINT_PATH  the real checkpoint folder; when it does not exist the embedded DEMO model is used instead.
main_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${MODEL_CONFIG:-${main_dir}/configs/model_glm_130b.sh}"
if [ ! -d "${CHECKPOINT_PATH}" ]; then
    echo "> No checkpoint at '${CHECKPOINT_PATH}' (set CHECKPOINT_PATH or edit the config): using the DEMO model (random weights, not GLM-130B)" >&2
    source "${main_dir}/configs/model_glm_demo.sh"
fi

# launch N_PROCS SCRIPT ARGS...: torchrun for several processes, plain python for one.
launch() {
    local nprocs="$1"; shift
    if [ "${nprocs}" -gt 1 ]; then
        python -m torch.distributed.run --nproc_per_node "${nprocs}" --master_port "${MASTER_PORT:-29500}" "$@"
    else
        python "$@"
    fi
}
