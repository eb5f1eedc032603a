"""Prometheus text for ``GET /metrics``: requests, tokens, latency, batch sizes, requests per expert.
Plain counters (no client library): the exposition format is a few lines of text."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets: tuple) -> None:
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum, self.n = self.sum + v, self.n + 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


class Metrics:
    """Thread-safe counters updated by the app (requests) and the engine (batches)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()          # (endpoint, status) -> n
        self.per_expert: Counter = Counter()
        self.prompt_tokens = self.completion_tokens = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.ttft = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, prompt: int, completion: int, seconds: float, ttft: float, experts: list[str]) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.latency.observe(seconds)
            self.ttft.observe(ttft)
            for e in experts:
                self.per_expert[e] += 1

    def batched(self, size: int) -> None:
        with self._lock:
            self.batch.observe(size)

    def render(self) -> str:
        with self._lock:
            out = ["# TYPE mixroute_requests_total counter"]
            out += [f'mixroute_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# TYPE mixroute_prompt_tokens_total counter", f"mixroute_prompt_tokens_total {self.prompt_tokens}",
                    "# TYPE mixroute_completion_tokens_total counter",
                    f"mixroute_completion_tokens_total {self.completion_tokens}",
                    "# TYPE mixroute_expert_requests_total counter"]
            out += [f'mixroute_expert_requests_total{{expert="{e}"}} {n}' for e, n in sorted(self.per_expert.items())]
            out += self.latency.lines("mixroute_request_latency_seconds")
            out += self.ttft.lines("mixroute_time_to_first_token_seconds")
            out += self.batch.lines("mixroute_batch_size")
            return "\n".join(out) + "\n"
