# BENCHMARK model: a ~1.1 B-parameter GLM with RANDOM weights, created locally on first use (about 2.3 GB, fp16).
# Shaped like GLM-130B scaled down: 32 layers, hidden 1536, 12 heads of dim 128, GeGLU inner 4096, vocab 150528,
# so ~80 % of the parameters sit in the transformer layers. It is NOT GLM-130B; it exists to time the inference
# paths on the machine at hand (scripts/benchmark.sh). The folder is $GLM_BENCH_DIR (default bench_cache/).
_bench_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${GLM_BENCH_DIR:-${_bench_root}/bench_cache}"
python "${_bench_root}/tools/create_bench_checkpoint.py" --out "${BENCH_DIR}" || exit 1

MODEL_TYPE="glm-bench"
CHECKPOINT_PATH="${BENCH_DIR}/checkpoint"
MP_SIZE=1
MODEL_ARGS="--model-parallel-size ${MP_SIZE} \
            --num-layers 32 \
            --hidden-size 1536 \
            --inner-hidden-size 4096 \
            --vocab-size 150528 \
            --num-attention-heads 12 \
            --max-sequence-length 2048 \
            --tokenizer-type icetk-glm-130B \
            --layernorm-order post \
            --load ${CHECKPOINT_PATH} \
            --skip-init \
            --bf16"
