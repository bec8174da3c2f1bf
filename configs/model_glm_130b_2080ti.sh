# GLM-130B in INT4 on 8 × RTX 2080 Ti 11 GB with weight offload (the original's briefly published config, commit 28e449b):
# MP 8, INT4, the layers beyond 6 GB of weights per GPU streamed from pinned host memory. CHECKPOINT_PATH: the 16-bit
# checkpoint (quantized while loading) or an 8-way INT4 one from tools/convert_tp.py with --from-quantized-checkpoint added.
MODEL_TYPE="glm-130b"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-<your checkpoint path>}"
MP_SIZE=8
MODEL_ARGS="--model-parallel-size ${MP_SIZE} \
            --num-layers 70 \
            --hidden-size 12288 \
            --inner-hidden-size 32768 \
            --vocab-size 150528 \
            --num-attention-heads 96 \
            --max-sequence-length 2048 \
            --tokenizer-type icetk-glm-130B \
            --layernorm-order post \
            --quantization-bit-width 4 \
            --load ${CHECKPOINT_PATH} \
            --skip-init \
            --fp16 \
            --bminf \
            --bminf-memory-limit 6"
