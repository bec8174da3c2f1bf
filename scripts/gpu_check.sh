#!/bin/bash
# The GPU check of issue 12 (tools/gpu_check.py): fused INT8/INT4 kernels vs the dequantize reference, CUDA-graph
# decoding vs eager (greedy ids), benchmark.py on the benchmark config, an 8-layer GLM-130B slice per format, and
# the full-size INT4 GLM-130B (random weights made on the GPU). One JSON (flat dotted keys) + a log; every section
# is time-boxed and fails soft. Runs on the torch + triton installed on the machine (nothing is fetched).
#   bash scripts/gpu_check.sh                       # writes docs/results/gpu-h200.json and .log
#   bash scripts/gpu_check.sh --out /tmp/x.json     # elsewhere
#   bash scripts/gpu_check.sh --dry-run --out /tmp/dry.json   # CPU, tiny shapes, TRITON_INTERPRET=1
set -u
main_dir=$(dirname "$(dirname "$(realpath "${BASH_SOURCE[0]}")")")
cd "$main_dir" || exit 1
# 8 minutes in all: the sections' own limits sum to less; this is the backstop
exec timeout --signal=TERM --kill-after=10 480 python tools/gpu_check.py "$@"
