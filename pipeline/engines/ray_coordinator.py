"""What a Ray run shares, in actors of no CPU: the `Coordinator` (one per run) and the `CacheKeeper`.

The coordinator holds the rate budget (`limits.lease.SlotBudget`, leased in slots),
requests in flight (`limits.share.FlightShare`, granted by demand), the spend
ceiling (`limits.spend.Budget`, a reservation per request), the stop word after a
fatal answer, and each actor's counters for the driver's progress and summary.
The keeper holds the answer cache on the driver's node (its SQLite file is local
to that node, as for a local run).

This module imports neither Ray nor the engine: the driver makes these classes
actors, and the processes that run them import only the budgets.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.limits.lease import Lease, SlotBudget
from pipeline.limits.share import FlightShare, Settle
from pipeline.limits.spend import Budget, Verdict

# Counters summed over the actors for the driver's stats.
SUMMED = (
    "rows_done", "ok", "errors", "from_checkpoint", "from_cache", "shared", "rows_sent", "requests_sent", "retries",
    "prompt_tokens", "completion_tokens", "estimated_rows", "limited_rate", "limited_concurrency",
    "breaker_opened", "spent_tokens_in", "spent_tokens_out", "spent_usd",
)  # fmt: skip


class Coordinator:
    """One per run (a Ray actor, no CPU): the budgets every actor shares, the stop word, the counters."""

    def __init__(self, rpm: float | None, tpm: float | None, adapt: bool, concurrency: int, spend: Budget | None) -> None:
        self.budget = SlotBudget(user_rpm=rpm, user_tpm=tpm, adapt=adapt)
        self.flight = FlightShare(concurrency)
        self.spend = spend
        self._settled = asyncio.Event()  # a reservation was settled: waiters for the spend ceiling look again
        self.lock = asyncio.Lock()
        self.workers: dict[str, dict[str, Any]] = {}
        self.stopped_kind = "stopped"

    # ---- the rate ----------------------------------------------------------------------------------

    async def lease(self, want: int, tokens_each: float) -> Lease:
        received = time.monotonic()
        async with self.lock:  # first come, first served
            while True:
                now = time.monotonic()
                lease, wait = self.budget.grant(now, want, tokens_each)
                if lease is not None:
                    lease.received = received
                    return lease
                await asyncio.sleep(wait)

    async def announce(self, requests_per_s: float | None, tokens_per_min: float | None) -> None:
        self.budget.announced(requests_per_s, tokens_per_min)

    async def rate_limited(self, epoch: int, retry_after: float | None) -> None:
        self.budget.rate_limited(time.monotonic(), epoch, retry_after)

    # ---- the spend ceiling ---------------------------------------------------------------------------

    async def spend_reserve(self, held: tuple[int, int], settles: list[Settle]) -> bool:
        """Reserve a request's worst case; False once the ceiling is reached. A request that fits only
        once those in flight settle waits for them, as the local governor's reserve does."""
        assert self.spend is not None
        self._apply(settles)
        while (verdict := self.spend.check(*held)) is Verdict.WAIT:
            self._settled.clear()
            await self._settled.wait()
        if verdict is Verdict.REFUSE:
            self._settled.set()  # the other waiters hear it too
            return False
        self.spend.reserve(held)
        return True

    async def spend_settle(self, settles: list[Settle]) -> None:
        self._apply(settles)

    def _apply(self, settles: list[Settle]) -> None:
        if settles and self.spend is not None:
            for held, tokens_in, tokens_out in settles:
                self.spend.settle(tuple(held), tokens_in, tokens_out)  # type: ignore[arg-type]  # a list after pickling
            self._settled.set()

    # ---- stops and counters --------------------------------------------------------------------------

    async def stop(self, reason: str, kind: str = "stopped") -> None:
        """Every actor stops; `kind` is the fatal answer's (quota, auth...), which decides the exit code."""
        if self.budget.stopped is None:
            self.budget.stopped, self.stopped_kind = reason, kind

    async def report(self, worker: str, counters: dict[str, Any], flight: tuple[int, int, int, int | None]) -> tuple[bool, int, str | None, int]:  # fmt: skip
        """An actor's counters and requests in flight (in flight, limit applied, wanted, a limit the server
        named); answers whether leases are needed, the rate's epoch, whether the run was stopped, and how
        many requests the actor may have in flight."""
        now = time.monotonic()
        before = self.workers.get(worker, {}).get("requests_sent", 0)
        self.workers[worker] = counters
        if not self.budget.limited():
            self.budget.measured(now, counters["requests_sent"] - before)
        self.budget.tick(now)
        in_flight, applied, wants, named = flight
        if named:
            self.flight.named(named)
        grant = self.flight.report(now, worker, in_flight=in_flight, applied=applied, wants=wants)
        return self.budget.limited(), self.budget.epoch, self.budget.stopped, grant

    async def totals(self) -> dict[str, Any]:
        total: dict[str, Any] = {name: 0 for name in SUMMED}
        kinds: Counter[str] = Counter()
        latency: Counter[int] = Counter()
        for c in self.workers.values():
            for name in SUMMED:
                total[name] += c[name]
            kinds.update(c["error_kinds"])
            latency.update({int(k): v for k, v in c["latency"].items()})
        rate = self.budget.rate()
        total.update(
            error_kinds=dict(kinds),
            latency=dict(latency),
            pace_rpm=None if rate is None else rate * 60,
            pace_source=self.budget.source(),
            pace_tpm=self.budget.tpm(),
            stopped=self.budget.stopped,
            stopped_kind=self.stopped_kind,
            ceiling_reached=any(c["ceiling_reached"] for c in self.workers.values()),
            concurrency=min(self.flight.total, sum(c["concurrency"] for c in self.workers.values())),
            concurrency_ceiling=self.flight.total,
            actors_sending=sum(1 for c in self.workers.values() if c["requests_sent"]),
            first_block=min((c["first_block"] for c in self.workers.values() if c.get("first_block")), default=None),
        )
        return total


class CacheKeeper:
    """The answer cache (`--cache`) for a Ray run: opened on the driver's node, asked by the actors."""

    def __init__(self, folder: str, scope: str, max_mb: float) -> None:
        from pipeline.tables.cache import AnswerCache

        self.cache = AnswerCache(folder, scope, max_mb=max_mb).open()

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        return self.cache.get_many(keys)

    def put_many(self, items: Iterable[tuple[str, tuple[Any, ...]]]) -> int:
        for key, result in items:
            self.cache.put(key, result)
        return self.cache.flush()

    def close(self) -> int:
        stored = self.cache.stored
        self.cache.close()
        return stored
