#!/bin/bash
# The GPU check (tools/gpu_check.py, docs/gpu.md): correctness first (fused INT8/INT4 kernels vs the dequantize
# reference, CUDA-graph decoding vs eager, greedy ids on the SAT fixture), then benchmark.py on the benchmark config,
# an 8-layer GLM-130B slice per format, the kernels' timings and the full-size INT4 GLM-130B (random weights made on
# the GPU). One JSON (flat dotted keys, goals as fractions of the bandwidth and matmul peak measured in the same run)
# and a log, named after the GPU: $OUT/gpu-h100.json (docs/results/ when $OUT is unset); a rerun of some sections
# merges into it. Every section is time-boxed and fails soft. Runs on the torch + triton on the machine.
#   bash scripts/gpu_check.sh                         # every section, at most 300 s
#   bash scripts/gpu_check.sh --sections slice full   # some sections again
#   bash scripts/gpu_check.sh --dry-run               # CPU, tiny shapes, TRITON_INTERPRET=1: gpu-dry-run.json
set -u
main_dir=$(dirname "$(dirname "$(realpath "${BASH_SOURCE[0]}")")")
cd "$main_dir" || exit 1
# 300 s in all: the sections' own limits sum to 295 s; this is the backstop
exec timeout --signal=TERM --kill-after=10 300 python3 tools/gpu_check.py "$@"
