"""Derived ratios, the summary lines and the JSON file (flat, dotted keys; see benchmark.py for their meaning)."""
import json
import os
from typing import Dict, List, Optional

from model import mpu


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else num / den


def derive(results: dict, decode: Dict[tuple, dict], formats: List[str], lengths: List[int],
           bandwidth: float, peak: Optional[float]) -> None:
    """Add the ratios against the machine's limits to `results` (None where a figure was not measured)."""
    for n in lengths:
        results[f"prefill.{n}.mfu"] = _ratio(results.get(f"prefill.{n}.flop_per_s"), peak)
    for (name, b), r in decode.items():
        nbytes = results[f"decode.{name}.weight_bytes_per_step"]
        prefix = f"decode.{name}" if b == 1 else f"decode.{name}.batch{b}"
        for key, value in r.items():
            results[f"{prefix}.{key}"] = value
        # roofline_fraction (from run_decode): each stretch of steps against the probes taken around it;
        # _vs_best_probe: the median step against the best bandwidth seen in the whole run (the stricter figure).
        results[f"{prefix}.roofline_fraction_vs_best_probe"] = nbytes * (r["tokens_per_s"] / b) / bandwidth
        results[f"{prefix}.roofline_tokens_per_s"] = b * bandwidth / nbytes
    if ("16bit", 1) in decode:
        base = decode[("16bit", 1)]["tokens_per_s"]
        for name in formats:
            if name != "16bit" and (name, 1) in decode:
                results[f"decode.{name}.speedup_vs_16bit"] = decode[(name, 1)]["tokens_per_s"] / base
    ref_n = 512 if 512 in lengths else lengths[0]
    results["eval.flop_fraction"] = _ratio(results.get("eval.flop_per_s"), results.get(f"prefill.{ref_n}.flop_per_s"))
    results["eval.flop_fraction_reference_length"] = ref_n


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(results: dict, formats: List[str], lengths: List[int], dtype_name: str,
                  other_cpu_share: Optional[float]) -> List[str]:
    peak = results.get(f"machine.matmul_peak_{dtype_name}_flop_per_s")
    fp32 = results.get("machine.matmul_peak_fp32_flop_per_s")
    lines = [f"Read bandwidth {results['machine.read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; {dtype_name} matmul peak "
             f"{_fmt(peak and peak / 1e12, '.3f')} TFLOP/s; fp32 {_fmt(fp32 and fp32 / 1e12, '.3f')} TFLOP/s"]
    for name in formats:
        if f"decode.{name}.roofline_fraction" in results:
            speedup = results.get(f"decode.{name}.speedup_vs_16bit")
            extra = f", {speedup:.2f}x 16-bit" if speedup is not None else ""
            lines.append(f"Decode {name}: {results[f'decode.{name}.tokens_per_s']:.2f} tokens/s = "
                         f"{results[f'decode.{name}.roofline_fraction']:.2f} of its bandwidth roofline "
                         f"({results[f'decode.{name}.roofline_fraction_vs_best_probe']:.2f} of the run's best "
                         f"probe){extra}")
    of = "" if results.get("prefill.compute_dtype", dtype_name) == dtype_name else \
        f" (of the {results['prefill.compute_dtype']} peak: {dtype_name} GEMMs run in fp32 on this CPU)"
    for n in lengths:
        lines.append(f"Prefill {n}: MFU {_fmt(results[f'prefill.{n}.mfu'])}{of}")
    lines.append(f"Evaluation: {_fmt(results['eval.flop_fraction'])} of the prefill FLOP rate")
    lines.append(f"Peak RSS {results['run.peak_rss_bytes'] / 2**30:.2f} GiB; {results['run.seconds']:.0f} s"
                 + (f"; other processes used {other_cpu_share:.0%} of the CPUs meanwhile"
                    if other_cpu_share is not None else ""))
    return lines


def print_summary(lines: List[str]) -> None:
    for line in lines:
        mpu.print_rank_0(line)


def write_json(path: Optional[str], results: dict) -> None:
    """The flat JSON (keys sorted; unmeasured figures as null), on the first rank only, written atomically."""
    if not path or mpu.get_rank() != 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({k: results[k] for k in sorted(results)}, f, indent=1)
    os.replace(tmp, path)
    mpu.print_rank_0(f"> wrote {path}")
