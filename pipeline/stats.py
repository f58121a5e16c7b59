"""Counters of one run, cheap to update per row and read by the progress bar and summary."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

_BUCKET = math.log(1.02)  # latency histogram resolution: 2%, constant memory at any row count


@dataclass
class RunStats:
    total_rows: int = 0
    rows_done: int = 0
    ok: int = 0
    errors: int = 0
    from_checkpoint: int = 0
    shared: int = 0  # rows answered by an identical request of this run
    rows_sent: int = 0  # distinct requests that got a final answer or gave up this run
    requests_sent: int = 0  # attempts, retries included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_rows: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    # What the governor has learned and done, for the progress line and the summary.
    limited_rate: int = 0  # 429s about requests or tokens per unit of time (or that did not say)
    limited_concurrency: int = 0  # 429s about requests in flight
    breaker_opened: int = 0
    pace_rpm: float | None = None  # the request pace in force, per minute
    pace_source: str | None = None  # "user", "header", "adaptive"
    pace_detail: str = ""  # the header name, "--rpm", ...
    pace_tpm: float | None = None
    pace_tpm_source: str | None = None
    concurrency: int = 0  # the gate's current limit
    concurrency_ceiling: int = 0
    concurrency_named: int | None = None  # an in-flight limit the server named
    _latency: Counter[int] = field(default_factory=Counter)

    def record_latency(self, ms: float) -> None:
        self._latency[int(math.log(max(ms, 0.01)) / _BUCKET)] += 1

    def latency_quantile(self, q: float) -> float | None:
        n = sum(self._latency.values())
        if n == 0:
            return None
        rank = q * (n - 1)
        seen = 0
        for bucket in sorted(self._latency):
            seen += self._latency[bucket]
            if seen > rank:
                return math.exp((bucket + 0.5) * _BUCKET)
        return None
