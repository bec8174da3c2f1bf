"""The original's report lines and the per-group statistics (max, median, sample-weighted average over files)."""
from typing import Any, Dict, List, Tuple

import numpy as np

from evaluation.utils import print_rank_0


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def group_statistics(values: List[Any], weights: List[int]) -> Any:
    """max, median and sample-weighted average over files; dict/list metric values are summarised per key."""
    if values and all(_is_number(v) for v in values):
        return {"max": float(np.max(values)), "median": float(np.median(values)),
                "average": float(np.average(values, weights=weights)) if sum(weights) else float("nan")}
    if values and all(isinstance(v, dict) for v in values):
        keys = [k for k in values[0] if all(k in v for v in values)]
        return {k: group_statistics([v[k] for v in values], weights) for k in keys}
    if values and all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) == 1:
        return [group_statistics([v[i] for v in values], weights) for i in range(len(values[0]))]
    return None


def group_metrics(result_dict_group: Dict[str, Tuple[Dict[str, Any], int]]) -> Dict[str, Any]:
    """{metric: statistics} over the files of a group ({file: (metric values, samples)})."""
    weights = [n for _, n in result_dict_group.values()]
    names = list(next(iter(result_dict_group.values()))[0])
    stats = {}
    for name in names:
        s = group_statistics([r[name] for r, _ in result_dict_group.values()], weights)
        if s is not None:
            stats[name] = s
    return stats


def is_stats(value) -> bool:
    return isinstance(value, dict) and set(value) == {"max", "median", "average"}


def print_file_metrics(file: str, result_dict: Dict[str, Any]) -> None:
    line = f"        Finish {file}"
    for key, value in result_dict.items():
        line += f", {key} = {value:.3f}"
    print_rank_0(line)


def print_group_metrics(group_name: str, stats: Dict[str, Any], level: int = 1) -> None:
    stats = {k: v for k, v in stats.items() if is_stats(v)}
    if len(stats) == 1:
        name, s = next(iter(stats.items()))
        print_rank_0("    " * level + f"Group {group_name} {name}: max = {s['max']:.3f}, "
                     f"median = {s['median']:.3f}, average = {s['average']:.3f}")
    else:
        print_rank_0("    " * level + f"  Group {group_name}: ")
        for name, s in stats.items():
            print_rank_0("    " * (level + 1) + f"Metric {name}: max = {s['max']:.3f}, "
                         f"median = {s['median']:.3f}, average = {s['average']:.3f}")
