"""Tensor ops only: kernels know tensors, never the model, quantization, generation or evaluation.

- kernels/cpu.py: this project's compiled CPU kernels (GEMV for bf16 / INT8 / INT4 weights in GLM-130B's stored
  layout, the fused all-layers decode step, a read-bandwidth probe), built on first use from kernels/csrc/.
"""
