"""Pacing primitives: leaky buckets whose rate can change, a gate on requests in flight, a hold.

They decide nothing: the governor sets their rates and limits from what the
controllers learn. Nothing here polls; waiters are woken by the loop's timers.

Why the request bucket is small: providers often enforce a per-minute quota per
second, so a bucket that starts full and spends a minute's quota in the first
second earns a storm of 429s. The request bucket holds 1 + 1% of a second's
quota (10 ms of requests) and drains at the pace it is given (98.7% of a known
limit, see control.HEADROOM). A leaky bucket lets at most capacity + rate x T
requests through in any T seconds, so any 1-second window sees at most
floor(1 + 0.997 x limit) <= limit requests, and any minute less. The small bank
is what keeps the rate up: a worker that wakes a millisecond late (the event
loop was busy) spends banked capacity instead of losing its slot for good,
which a one-request bucket would (measured: 88% of 6,000/min).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

BANK = 0.01  # of a second's quota: late wake-ups up to 10 ms are made up
MIN_WAKE = 1e-6  # seconds: the shortest wait a pacer arms a timer for


class Pacer(AsyncLimiter):
    """aiolimiter's leaky bucket, with a rate that can change while requests wait.

    Changing the rate settles the level at the old rate up to now, then drains at
    the new one, so a change neither forgets what was just sent (a burst) nor
    double-counts it. `capacity_s` is the bank in seconds of the rate, with a
    floor of `min_capacity` (one request, or a second's worth of tokens).
    """

    __slots__ = ("_capacity_s", "_min_capacity")
    _waker_handle: asyncio.TimerHandle | None
    _waiters: list[tuple[float, int, asyncio.Future[None]]]

    def __init__(self, per_second: float, *, capacity_s: float, min_capacity: float) -> None:
        self._capacity_s, self._min_capacity = capacity_s, min_capacity
        capacity = self._capacity(per_second)
        super().__init__(capacity, capacity / per_second)

    def _capacity(self, per_second: float) -> float:
        return max(self._min_capacity, self._min_capacity + self._capacity_s * per_second)

    @property
    def per_second(self) -> float:
        return float(self._rate_per_sec)

    def set_rate(self, per_second: float) -> None:
        self._leak()  # the level as of now, drained at the old rate
        # Never below what a waiter already asked for (a chunk sized to the old capacity):
        # aiolimiter would leave it waiting for room that can never exist.
        waiting = max((amount for amount, _, fut in self._waiters if not fut.done()), default=0.0)
        capacity = max(self._capacity(per_second), waiting)
        self.max_rate, self.time_period = capacity, capacity / per_second
        self._rate_per_sec = per_second
        self._level = min(self._level, capacity)
        self._wake_next()  # re-arm the waiters' timer for the new rate

    def fill(self) -> Pacer:
        """Start with the bucket full (inside the event loop): the next request waits its turn."""
        self._level, self._last_check = self.max_rate, self._loop.time()
        return self

    def has_capacity(self, amount: float = 1) -> bool:
        # aiolimiter tests capacity as `level + amount <= max_rate` here but as
        # `amount - max_rate + level <= 0` when waking a waiter; one ulp apart, a
        # waiter is woken, finds no room and waits again, forever, if the clock does
        # not move between the two (seen under a virtual clock). One expression for both.
        self._leak()
        return amount - self.max_rate + self._level <= 0

    def _wake_next(self, *args: object) -> None:
        # A wait of float dust (level above the mark by 1e-15) arms a timer for "now":
        # on a clock that has not moved it finds the same dust and re-arms, forever (seen
        # under a virtual clock). A microsecond's wait drains the dust on any clock.
        super()._wake_next(*args)
        handle = self._waker_handle
        if handle is not None:
            loop = self._loop
            if handle.when() < loop.time() + MIN_WAKE:
                handle.cancel()
                self._waker_handle = loop.call_at(loop.time() + MIN_WAKE, self._wake_next)

    async def take(self, amount: float) -> None:
        """Acquire `amount`; more than the bucket holds is taken in bucket-sized chunks,
        so a big request waits its full share, never less."""
        while amount > 0:
            chunk = min(amount, self.max_rate)
            await self.acquire(chunk)
            amount -= chunk


def request_pacer(per_second: float, *, full: bool = False) -> Pacer:
    pacer = Pacer(per_second, capacity_s=BANK, min_capacity=1.0)
    return pacer.fill() if full else pacer


def token_pacer(per_second: float, *, full: bool = False) -> Pacer:
    # A second's worth at most, as for requests; bigger requests are charged in chunks.
    pacer = Pacer(per_second, capacity_s=1.0, min_capacity=0.0)
    return pacer.fill() if full else pacer


class Gate:
    """At most `limit` requests hold a slot; the limit may move at any time. FIFO, no polling."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._cap: int | None = None  # a temporary override (one probe at a time while the breaker is open)
        self._share: int | None = None  # this engine's part of a budget shared with others (Ray actors); may be 0
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        limit = self._limit if self._cap is None else min(self._limit, self._cap)
        return limit if self._share is None else min(limit, self._share)

    @property
    def own_limit(self) -> int:
        """The limit without the shared budget's part: what this engine would use on its own."""
        return self._limit if self._cap is None else min(self._limit, self._cap)

    def share(self, share: int | None) -> None:
        self._share = share
        self._wake()

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._wake()

    def cap(self, cap: int | None) -> None:
        self._cap = cap
        self._wake()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued for it."""
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted and cancelled in the same tick: hand the slot on
            raise

    def release(self) -> None:
        self.held -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.held += 1
                fut.set_result(None)


class Hold:
    """Open unless something closed it until a time; a timer (not a poll) reopens it."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._reopen: asyncio.TimerHandle | None = None
        self.until = 0.0

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> None:
        await self._open.wait()

    def open_now(self, *, even_if_shut: bool = False) -> None:
        """Reopen at once (unless shut for good: then only `even_if_shut`, to let waiters hear the run ended)."""
        if self.until != math.inf or even_if_shut:
            self.until = 0.0
            if self._reopen is not None:
                self._reopen.cancel()
            self._open.set()

    def shut(self) -> None:
        """Closed for good (the run is stopping)."""
        self.until = math.inf
        self._open.clear()
        if self._reopen is not None:
            self._reopen.cancel()

    def close_for(self, seconds: float) -> bool:
        """Hold until now + seconds; returns whether this moved the reopening later."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if until <= self.until:
            return False
        self.until = until
        self._open.clear()
        if self._reopen is not None:
            self._reopen.cancel()
        self._reopen = loop.call_at(until, self._open.set)
        return True
