# Embedded DEMO model: a tiny GLM with RANDOM weights and a locally built test tokenizer, created on first use.
# It is NOT GLM-130B (its output is gibberish); it lets every script run on a fresh machine.
_demo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_DIR="${GLM_DEMO_DIR:-${_demo_root}/demo_cache}"
python "${_demo_root}/tools/create_demo.py" --out "${DEMO_DIR}" || exit 1

MODEL_TYPE="glm-demo"
CHECKPOINT_PATH="${DEMO_DIR}/checkpoint"
MP_SIZE=1
MODEL_ARGS="--model-parallel-size ${MP_SIZE} \
            --num-layers 4 \
            --hidden-size 256 \
            --inner-hidden-size 512 \
            --vocab-size 150528 \
            --num-attention-heads 4 \
            --max-sequence-length 512 \
            --tokenizer-type icetk-glm-130B \
            --tokenizer-path ${DEMO_DIR}/ice_text.model \
            --layernorm-order post \
            --load ${CHECKPOINT_PATH} \
            --skip-init \
            --fp32"
