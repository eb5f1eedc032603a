"""Prometheus metrics for ``GET /metrics`` (prometheus_client, one registry per app): requests, tokens,
latency, time to first token, router time, batch sizes, requests per expert, queue depth."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The app's metrics; updated from the event loop and the engine's threads (prometheus_client locks)."""

    def __init__(self, queued: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mixroute_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mixroute_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("mixroute_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.per_expert = Counter("mixroute_expert_requests", "Finished requests by the expert(s) that served them",
                                  ["expert"], registry=r)
        self.latency = Histogram("mixroute_request_latency_seconds", "Submit to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mixroute_time_to_first_token_seconds", "Submit to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.router = Histogram("mixroute_router_seconds", "Routing time of a request's prefill or pre-pass batch",
                                buckets=ROUTER_BUCKETS, registry=r)
        self.batch = Histogram("mixroute_batch_size", "Requests in a batch when one is (re)formed",
                               buckets=BATCH_BUCKETS, registry=r)
        self.cancelled = Counter("mixroute_cancelled_requests", "Requests stopped because their client went away",
                                 registry=r)
        self.queue = Gauge("mixroute_queued_requests", "Requests waiting for the engine", registry=r)
        self.queue.set_function(queued)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def finished(self, prompt: int, completion: int, seconds: float, ttft: float, experts: list[str],
                 router_seconds: float = 0.0) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        self.latency.observe(seconds)
        self.ttft.observe(ttft)
        self.router.observe(router_seconds)
        for e in experts:
            self.per_expert.labels(e).inc()

    def batched(self, size: int) -> None:
        self.batch.observe(size)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
