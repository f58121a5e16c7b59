"""Counters of one run, cheap to update per row and read by the progress bar and summary."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

_BUCKET = math.log(1.02)  # latency histogram resolution: 2%, constant memory at any row count
TIMELINE_MAX = 3600  # samples kept: an hour at one a second, then thinned


@dataclass
class RunStats:
    total_rows: int = 0
    rows_done: int = 0
    ok: int = 0
    errors: int = 0
    from_checkpoint: int = 0
    from_cache: int = 0  # answered by the shared answer cache (--cache), not sent
    shared: int = 0  # rows answered by an identical request of this run
    rows_sent: int = 0  # distinct requests that got a final answer or gave up this run
    requests_sent: int = 0  # attempts, retries included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_rows: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    retryable_errors: int = 0  # rows that failed for a reason that may pass (5xx, timeouts, 429s): a re-run may answer them
    # The breaker, while the server fails every request: failures in a row, and when the next probe goes (monotonic).
    failing_streak: int = 0
    failing_kind: str = ""
    next_probe_at: float | None = None
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
    in_flight: int = 0  # requests admitted whose answer has not been read yet, for the timeline
    concurrency_ceiling: int = 0
    concurrency_named: int | None = None  # an in-flight limit the server named
    # Spend: what the server billed this run (usage of every billed attempt, an answer that failed its checks
    # included; with a ceiling, the worst case of an attempt that may have been billed without a usage), and
    # what the checkpoint's answers cost in earlier runs.
    spent_tokens_in: int = 0
    spent_tokens_out: int = 0
    spent_usd: float = 0.0  # the same at the run's prices, summed request by request (batch and online prices may mix)
    spent_cost: float | None = None  # spent_usd once the run is over; None: no price configured
    earlier_tokens_in: int = 0
    earlier_tokens_out: int = 0
    earlier_cost: float | None = None
    ceiling_what: str | None = None  # "--max-cost $0.0200", when a ceiling is set
    ceiling_reached: bool = False
    # With several models: each one's counters (rows, requests, tokens, cost, latencies, and the limits its
    # governor learned), by the model's name in the order given; the run's own are the sums (`roll_up`).
    models: dict[str, RunStats] = field(default_factory=dict)
    _latency: Counter[int] = field(default_factory=Counter)
    # The metrics file's timeline: cumulative counters sampled by a timer (never per row), bounded in length.
    timeline: list[dict[str, float | int]] = field(default_factory=list)
    sample_every: float = 1.0  # seconds between samples; doubles each time the timeline is thinned

    @property
    def images_not_sent(self) -> int:
        """Rows held back by their images: missing, unreadable, of a type or size the provider does not
        take, or changed between being read and being sent (error kinds image_*)."""
        return sum(n for kind, n in self.error_kinds.items() if kind.startswith("image_"))

    def sample(self, t: float) -> None:
        """Record the counters at `t` seconds into the run. Past TIMELINE_MAX samples every other one is
        dropped and the interval doubles, so a week-long run keeps a timeline of the same size as an hour's."""
        self.roll_up()
        sample: dict[str, float | int] = {
            "t": round(t, 3),
            "rows": self.rows_done,
            "ok": self.ok,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "requests": self.requests_sent,
            "retries": self.retries,
            "limited_rate": self.limited_rate,
            "limited_concurrency": self.limited_concurrency,
            "concurrency": self.concurrency,
            "in_flight": self.in_flight,
        }
        if self.pace_rpm is not None:  # a pace in force (learned or given); absent while there is none
            sample["pace_rpm"] = round(self.pace_rpm, 3)
        self.timeline.append(sample)
        if len(self.timeline) > TIMELINE_MAX:
            del self.timeline[1::2]
            self.sample_every *= 2

    def roll_up(self) -> None:
        """With several models, what their governors learned, as the run's: 429s and holds summed, the
        pace and the requests in flight added up (each model's server has its own), a ceiling reached by any.
        Each governor keeps its model's own counters; this runs once a second and at the end, never per row."""
        if not self.models:
            return
        each = list(self.models.values())
        self.limited_rate = sum(s.limited_rate for s in each)
        self.limited_concurrency = sum(s.limited_concurrency for s in each)
        self.breaker_opened = sum(s.breaker_opened for s in each)
        self.concurrency = sum(s.concurrency for s in each)
        self.concurrency_ceiling = sum(s.concurrency_ceiling for s in each)
        self.in_flight = sum(s.in_flight for s in each)
        paces = [s.pace_rpm for s in each]
        if all(p is not None for p in paces):
            self.pace_rpm = sum(p for p in paces if p is not None)
            self.pace_source, self.pace_detail = "per model", ", ".join(f"{n}: {s.pace_source}" for n, s in self.models.items())
        failing = max(each, key=lambda s: s.failing_streak)
        self.failing_streak, self.failing_kind, self.next_probe_at = (
            failing.failing_streak,
            failing.failing_kind,
            failing.next_probe_at,
        )
        # Under a ceiling the governors share one budget and each holds its totals as of its last settle.
        self.spent_tokens_in = max(self.spent_tokens_in, *(s.spent_tokens_in for s in each))
        self.spent_tokens_out = max(self.spent_tokens_out, *(s.spent_tokens_out for s in each))
        self.ceiling_reached = self.ceiling_reached or any(s.ceiling_reached for s in each)
        self.ceiling_what = self.ceiling_what or next((s.ceiling_what for s in each if s.ceiling_what), None)

    def latency_histogram(self) -> list[tuple[float, int]]:
        """(milliseconds at the bucket's middle, answers) per non-empty bucket, fastest first."""
        return [(math.exp((b + 0.5) * _BUCKET), self._latency[b]) for b in sorted(self._latency)]

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
