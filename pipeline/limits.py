"""Pacing: requests per minute, tokens per minute, and a shared cool-down after 429s.

Providers often enforce a per-minute quota per second, so a bucket that starts
full and spends a minute's quota in the first second earns a storm of 429s.
The buckets here hold one second's worth at most and the request bucket holds
a single request, so requests leave evenly spaced at 99% of the limit: no
1-second window (and so no minute) ever sees more than the limit.
Concurrency is not here: the engine runs exactly `concurrency` workers.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

HEADROOM = 0.99  # clocks drift; 1% under the limit keeps every window inside it


class Limits:
    def __init__(self, *, rpm: float | None, tpm: float | None) -> None:
        self._requests = AsyncLimiter(1, 60.0 / (rpm * HEADROOM)) if rpm else None
        self._token_cap = 0.0
        self._tokens: AsyncLimiter | None = None
        if tpm:
            per_second = tpm * HEADROOM / 60.0
            # One request must always fit in the bucket (aiolimiter refuses
            # larger amounts), so it holds a second's worth or 4k tokens.
            self._token_cap = max(per_second, min(4096.0, tpm * HEADROOM))
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
            await self._tokens.acquire(min(float(tokens), self._token_cap))

    def pause(self, seconds: float) -> None:
        """Hold every new request for `seconds` (the server said it is over its limit)."""
        loop = asyncio.get_running_loop()
        resume_at = loop.time() + seconds
        if resume_at <= self._resume_at:
            return
        self._resume_at = resume_at
        self._open.clear()
        if self._reopen is not None:
            self._reopen.cancel()
        self._reopen = loop.call_at(resume_at, self._open.set)
