# GLM-130B with INT8 weight-only quantization on 8 GPUs. Either point CHECKPOINT_PATH at the 16-bit checkpoint
# converted to 8-way (the weights are quantized while loading), or at one made by
#   python tools/convert_tp.py --input-folder <16-bit ckpt> --output-folder <out> --target-tp 8 --quantization-bit-width 8
# and add --from-quantized-checkpoint to MODEL_ARGS.
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
            --quantization-bit-width 8 \
            --load ${CHECKPOINT_PATH} \
            --skip-init \
            --fp16"
