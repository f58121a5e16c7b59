"""Pacing: requests per minute, tokens per minute, and a shared cool-down after 429s.

Providers often enforce a per-minute quota per second, so a bucket that starts
full and spends a minute's quota in the first second earns a storm of 429s.
Here the request bucket holds 1 + 1% of a second's quota (10 ms of requests)
and drains at 98.7% of the limit. A leaky bucket lets at most
capacity + rate x T requests through in any T seconds, so any 1-second window
sees at most floor(1 + 0.997 x limit) <= limit requests, and any minute less.
The small bank is what keeps the rate up: a worker that wakes a millisecond
late (the event loop was busy) spends banked capacity instead of losing its
slot for good, which a one-request bucket would (measured: 88% of 6,000/min).
Concurrency is not here: the engine runs exactly `concurrency` workers.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

BANK = 0.01  # of a second's quota: late wake-ups up to 10 ms are made up
HEADROOM = 0.987  # drain rate as a share of the limit; 1 - BANK - HEADROOM > 0 keeps windows inside it


class Limits:
    def __init__(self, *, rpm: float | None, tpm: float | None) -> None:
        self._requests: AsyncLimiter | None = None
        if rpm:
            per_second = rpm / 60.0
            capacity = 1.0 + BANK * per_second
            self._requests = AsyncLimiter(capacity, capacity / (per_second * HEADROOM))
        self._token_cap = 0.0
        self._tokens: AsyncLimiter | None = None
        if tpm:
            per_second = tpm * HEADROOM / 60.0
            # A second's worth at most, as for requests; a request costing
            # more than that is charged in chunks (aiolimiter refuses amounts
            # above its capacity), so it waits its full share, never less.
            self._token_cap = per_second
            self._tokens = AsyncLimiter(self._token_cap, self._token_cap / per_second)
        # Open unless a 429 closed it; a timer (not a poll) reopens it.
        self._open = asyncio.Event()
        self._open.set()
        self._reopen: asyncio.TimerHandle | None = None
        self._resume_at = 0.0

    async def acquire(self, tokens: int) -> None:
        await self._open.wait()
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            owed = float(tokens)
            while owed > 0:
                chunk = min(owed, self._token_cap)
                await self._tokens.acquire(chunk)
                owed -= chunk

    def pause(self, seconds: float) -> bool:
        """Hold every new request for `seconds` (the server said it is over its limit).

        Returns whether this moved the resume time later (a new or longer pause)."""
        loop = asyncio.get_running_loop()
        resume_at = loop.time() + seconds
        if resume_at <= self._resume_at:
            return False
        self._resume_at = resume_at
        self._open.clear()
        if self._reopen is not None:
            self._reopen.cancel()
        self._reopen = loop.call_at(resume_at, self._open.set)
        return True
