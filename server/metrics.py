"""Prometheus text-format metrics of the server (GET /metrics)."""
import threading
import time
from collections import deque
from typing import Dict

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Dict[str, int] = {}  # by outcome
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.step_seconds, self.steps = 0.0, 0
        self.scoring_batches, self.scored_prompts = 0, 0
        self.recent = deque()  # (time, tokens) of recent iterations: the tokens/s gauge

    def request(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_buckets[i] += 1

    def step(self, seconds: float, tokens: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.step_seconds += seconds
            self.steps += 1
            self.recent.append((now, tokens))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()

    def scoring_batch(self, prompts: int) -> None:
        with self.lock:
            self.scoring_batches += 1
            self.scored_prompts += prompts

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            tokens = sum(n for t, n in self.recent if t >= now - RATE_WINDOW_S)
        return tokens / RATE_WINDOW_S

    def render(self, queue_depth: int, running: int, slots: int) -> str:
        rate = self.tokens_per_second()
        with self.lock:
            lines = _metric("glm_requests_total", "counter", "Completion requests by outcome.",
                            [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.requests.items())] or [("", 0)])
            lines += _metric("glm_prompt_tokens_total", "counter", "Prompt tokens of answered requests.",
                             [("", self.prompt_tokens)])
            lines += _metric("glm_generation_tokens_total", "counter", "Generated tokens of answered requests.",
                             [("", self.completion_tokens)])
            lines += _metric("glm_queue_depth", "gauge", "Sequences waiting for a slot.", [("", queue_depth)])
            lines += _metric("glm_running_sequences", "gauge", "Sequences holding a KV-cache slot.", [("", running)])
            lines += _metric("glm_slots", "gauge", "KV-cache slots (--max-slots).", [("", slots)])
            lines += _metric("glm_decode_tokens_per_second", "gauge",
                             f"Tokens generated per second over the last {RATE_WINDOW_S:.0f} s.", [("", round(rate, 3))])
            buckets = [(f'_bucket{{le="{b}"}}', c) for b, c in zip(TTFT_BUCKETS, self.ttft_buckets)]
            buckets += [('_bucket{le="+Inf"}', self.ttft_count), ("_sum", round(self.ttft_sum, 6)),
                        ("_count", self.ttft_count)]
            lines += _metric("glm_time_to_first_token_seconds", "histogram",
                             "From queueing a sequence to its first token.", buckets)
            lines += _metric("glm_engine_steps_total", "counter", "Engine iterations.", [("", self.steps)])
            lines += _metric("glm_scoring_batches_total", "counter", "Forwards that scored echo requests together.",
                             [("", self.scoring_batches)])
            lines += _metric("glm_scored_prompts_total", "counter", "Echo prompts scored in those forwards.",
                             [("", self.scored_prompts)])
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, samples) -> list:
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    return out + [f"{name}{suffix} {value}" for suffix, value in samples]


def parse(text: str) -> Dict[str, float]:
    """name{labels} -> value of a metrics page (the tests' and the benchmark's reader)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
