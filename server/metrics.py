"""`GET /metrics`: what the server did, in Prometheus' text format (prometheus_client, a registry of the app's own),
for an operator's scraper and for benchmarks/serve.py, which reads it before and after each measurement to say where
the time went.

Requests: how many, by status; their prompt, cached and completion tokens; time to first token and to the end.
The batch scheduler (server/batching.py, with --batch-decode): its thread's seconds by work (decode steps, engine
jobs such as a prompt's chunks, CUDA graph captures, idle), its steps and the tokens they decoded. The prefix-state
writer (server/prefix.py): states kept, by what became of them, and its seconds by phase (the copy off the device,
the snapshot, the store's write).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# seconds: from a cached turn's first token to a long prompt's on a CPU
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("deltamem_requests", "Completion requests ended, by HTTP status", ["status"],
                                registry=r)  # fmt: skip
        self.tokens = Counter("deltamem_tokens", "Tokens of the requests: prompt, cached (of the prompt, restored "
                              "from a kept state, not read) and completion", ["kind"], registry=r)  # fmt: skip
        self.ttft = Histogram("deltamem_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("deltamem_request_seconds", "From a request's arrival to its end", buckets=BUCKETS,
                                 registry=r)  # fmt: skip
        self.scheduler = Counter("deltamem_scheduler_seconds", "The batch scheduler thread's time, by work: decode "
                                 "(steps), job (engine work between steps: prompts), capture (CUDA graphs), idle",
                                 ["work"], registry=r)  # fmt: skip
        self.steps = Counter("deltamem_decode_steps", "Batched decode steps", registry=r)
        self.decoded = Counter("deltamem_decode_tokens", "Tokens decoded in batched steps (one a reply a step)",
                               registry=r)  # fmt: skip
        self.states = Counter("deltamem_prefix_states", "Prefix states kept for the store, by what became of them: "
                              "stored, unstored (the store was behind), failed", ["result"], registry=r)  # fmt: skip
        self.writer = Counter("deltamem_prefix_writer_seconds", "The prefix-state writer's time, by phase: copy (off "
                              "the device), snapshot, store", ["phase"], registry=r)  # fmt: skip

    def request(self, status: int, prompt: int, cached: int, completion: int, ttft: float | None,
                total: float) -> None:  # fmt: skip
        self.requests.labels(str(status)).inc()
        for kind, n in (("prompt", prompt), ("cached", cached), ("completion", completion)):
            self.tokens.labels(kind).inc(n)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.latency.observe(total)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def lap(counter: Counter, label: str, since: float) -> float:
    """Add the seconds since `since` (a time.perf_counter()) to counter{label}; returns now, the next lap's start."""
    now = time.perf_counter()
    counter.labels(label).inc(now - since)
    return now
