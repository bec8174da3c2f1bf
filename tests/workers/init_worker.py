"""Run by tests: initialize + load the model through initialize.py, exactly as the entry scripts do.

Prints the peak RSS (VmHWM) and the RSS before loading, so tests can check host memory.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from initialize import initialize, initialize_model_and_tokenizer  # noqa: E402
from model.errors import main_entry  # noqa: E402


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@main_entry
def main():
    args = initialize()
    import torch
    _ = torch.ones(1) + 1  # warm the allocator before the baseline
    baseline = rss_kib("VmRSS")
    model, tokenizer = initialize_model_and_tokenizer(args)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    touched = sum(float(p.float().sum()) if p.numel() < 1 << 20 else float(p.sum()) for p in model.parameters())
    line = f"baseline_kib={baseline} peak_kib={rss_kib('VmHWM')} param_bytes={param_bytes} checksum={touched:.3f}\n"
    sys.stdout.write(line)  # one write: ranks share the pipe, and print() writes the newline separately when unbuffered
    sys.stdout.flush()


if __name__ == "__main__":
    main()
