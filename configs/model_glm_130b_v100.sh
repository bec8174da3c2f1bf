# GLM-130B in FP16 on 8 × V100 32 GB with weight offload (the original's BMInf config): the layers beyond 25 GB of
# weights per GPU are streamed from pinned host memory in every forward (README: "Fewer or smaller GPUs, or less memory").
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
            --load ${CHECKPOINT_PATH} \
            --skip-init \
            --fp16 \
            --bminf \
            --bminf-memory-limit 25"
