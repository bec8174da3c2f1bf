"""What benchmark.py measures, in pieces: timing helpers (timing.py), this machine's limits (probes.py), the model's
FLOP and byte arithmetic (arithmetic.py), the timed phases (phases.py), the derived ratios and the report
(report.py), and the kernel-level table of the weight-only matmul paths (matmul_table.py)."""
