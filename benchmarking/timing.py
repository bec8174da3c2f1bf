"""Wall-clock timing on a shared machine: synchronised device timing, best-of-N, other tenants' CPU share."""
import os
import time


def sync(device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_time(fn, device, repeats: int) -> float:
    return min(timed(fn, device) for _ in range(repeats))


def best_time_within(fn, device, max_calls: int, max_s: float) -> float:
    """The best of up to `max_calls` calls, stopping once `max_s` seconds have gone (at least one call)."""
    start, best = time.perf_counter(), float("inf")
    for _ in range(max_calls):
        best = min(best, timed(fn, device))
        if time.perf_counter() - start > max_s:
            break
    return best


class CpuLoad:
    """Share of this machine's CPU time used by OTHER processes between start() and stop() (Linux; else None)."""

    def __init__(self):
        self.start_total = self.start_self = self.start_wall = None

    @staticmethod
    def _busy_jiffies():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        except (OSError, ValueError, IndexError):
            return None

    def start(self):
        self.start_total, self.start_self, self.start_wall = self._busy_jiffies(), time.process_time(), time.time()
        return self

    def stop(self):
        total = self._busy_jiffies()
        if total is None or self.start_total is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.time() - self.start_wall
        others = (total - self.start_total) / hz - (time.process_time() - self.start_self)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))
