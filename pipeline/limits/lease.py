"""One rate budget for many processes: a central pacer that hands out send times in short leases.

The Ray engine runs one engine per actor; a user's --rpm/--tpm and what the server
teaches (rate-limit headers, 429s) hold for all of them together. A static split
(rpm / actors) overshoots while some actors start and wastes the budget of those
that finish early, so the budget is central and handed out as it is used:

- `SlotBudget` (pure, clock passed in) lives in one coordinator actor. A lease is
  a list of send times ("slots") spaced 1/rate apart on one shared timeline,
  never more than HORIZON seconds ahead. Requests sent at their slot times make
  the cluster's sends one even pace, as the local engine's pacer does, so a
  server counting per second sees at most the pace plus one request.
- `LeaseClient` lives in each engine: it keeps the slots leased and waits for
  each request's slot, on its own clock from the moment the lease arrives; a
  slot not used within GRACE of its time is dropped (a lost slot wastes
  budget, a late one would bunch up with the next).

With no limit known (no --rpm/--tpm, no header, no 429 yet) nothing is leased and
each engine sends as fast as its concurrency allows. The first 429 reported
sets a pace below the cluster's measured send rate (multiplicative decrease);
quiet periods raise it again (additive increase) up to the ceiling.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.limits.learn import HEADROOM

HORIZON = 0.05  # seconds of budget a lease may reach ahead: bounds what one actor holds
GRACE = 0.02  # seconds a slot stays usable after its time
DECREASE = 0.7  # the pace after a 429, against the send rate measured before it
INCREASE_EVERY = 2.0  # seconds without a 429 between additive steps up
INCREASE_STEP = 0.05  # of the pace, per step
RATE_WINDOW = 2.0  # seconds over which the cluster's send rate is measured
MIN_RATE = 1 / 60  # requests per second: the pace never goes to zero
ELSEWHERE = "stopped on another worker: "  # how an engine's stop says the cause was another engine's answer
MIN_WAIT = 1e-4  # seconds: a wait of float dust would find the same dust again, forever, on a clock that has not moved


@dataclass
class Lease:
    """What a lease call gets: send times, tokens, and whether leasing is needed at all.

    `slots` are seconds after the grant, not clock readings: each engine adds them to its own
    clock when the lease arrives, so nodes whose clocks disagree still keep one pace."""

    slots: list[float]
    tokens: float = 0.0
    limited: bool = True
    stopped: str | None = None  # the run was stopped (a fatal answer elsewhere): send nothing more


@dataclass
class SlotBudget:
    """The cluster's request pace and token budget, as send times handed out in order."""

    user_rpm: float | None = None
    user_tpm: float | None = None
    adapt: bool = True
    header_rps: float | None = None  # learned from rate-limit headers (the account's limit)
    header_tpm: float | None = None
    operating: float | None = None  # after 429s, per second
    next_slot: float = 0.0
    hold_until: float = 0.0
    stopped: str | None = None
    _tokens: float = 0.0
    _tokens_at: float = 0.0
    _granted: deque[float] = field(default_factory=deque)  # slot times of the last RATE_WINDOW seconds
    _last_decrease: float = -math.inf
    _last_change: float = 0.0

    # ---- what the pace is ------------------------------------------------------------

    def ceiling(self) -> float | None:
        caps = [c * HEADROOM for c in (self.user_rpm / 60 if self.user_rpm else None, self.header_rps) if c]
        return min(caps) if caps else None

    def rate(self) -> float | None:
        """Requests per second in force, or None: no pace (send as fast as the engines can)."""
        ceiling = self.ceiling()
        if self.operating is not None and (ceiling is None or self.operating < ceiling):
            return self.operating
        return ceiling

    def tpm(self) -> float | None:
        caps = [c for c in (self.user_tpm, self.header_tpm) if c]
        return min(caps) * HEADROOM if caps else None

    def limited(self) -> bool:
        return self.rate() is not None or self.tpm() is not None or self.hold_until > 0

    def source(self) -> str | None:
        rate, ceiling = self.rate(), self.ceiling()
        if rate is None:
            return None
        if self.operating is not None and rate == self.operating and (ceiling is None or rate < ceiling):
            return "adaptive"
        return "user" if self.user_rpm and rate == self.user_rpm / 60 * HEADROOM else "header"

    # ---- leases -------------------------------------------------------------------------

    def grant(self, now: float, want: int, tokens_each: float) -> tuple[Lease | None, float]:
        """A lease of up to `want` slots, or (None, seconds to wait before asking again)."""
        if self.stopped is not None:
            return Lease([], stopped=self.stopped), 0.0
        if now < self.hold_until:
            return None, max(MIN_WAIT, self.hold_until - now)
        rate, tpm = self.rate(), self.tpm()
        if rate is None and tpm is None:
            return Lease([0.0] * want, tokens=tokens_each * want, limited=False), 0.0
        start = max(now, self.next_slot)
        if start > now + HORIZON:
            return None, max(MIN_WAIT, start - now - HORIZON)
        n = want if rate is None else min(want, 1 + int((now + HORIZON - start) * rate))
        tokens = 0.0
        if tpm is not None:
            per_second = tpm / 60
            # A second's worth banked, or one request's when a request is larger (it then waits for a full bank).
            bank = max(per_second, tokens_each)
            self._tokens = min(bank, self._tokens + (now - self._tokens_at) * per_second)
            self._tokens_at = now
            n = min(n, int(self._tokens // max(tokens_each, 1.0)))
            if n == 0:
                return None, max(MIN_WAIT, (max(tokens_each, 1.0) - self._tokens) / per_second)
            tokens = n * tokens_each
            self._tokens -= tokens
        step = 0.0 if rate is None else 1 / rate
        slots = [start + i * step for i in range(n)]
        self.next_slot = start + n * step
        self._granted.extend(slots)
        return Lease([t - now for t in slots], tokens=tokens), 0.0

    # ---- what the engines learn -----------------------------------------------------------

    def announced(self, requests_per_s: float | None, tokens_per_min: float | None) -> None:
        """Limits named by the server's headers: the account's, so the cluster's (newest wins)."""
        if not self.adapt:
            return
        if requests_per_s:
            self.header_rps = requests_per_s
        if tokens_per_min:
            self.header_tpm = tokens_per_min

    def rate_limited(self, now: float, retry_after: float | None) -> None:
        """A 429 about the rate seen by some engine: one decrease per second, below what was sent."""
        if retry_after:
            self.hold_until = max(self.hold_until, now + min(retry_after, 60.0))
            self.next_slot = max(self.next_slot, self.hold_until)
        if not self.adapt or now - self._last_decrease < 1.0:
            return
        sent = self._send_rate(now)
        current = self.rate()
        base = min(x for x in (sent, current) if x) if (sent or current) else None
        if base is None:
            return
        self.operating = max(MIN_RATE, base * DECREASE)
        self._last_decrease = self._last_change = now

    def measured(self, now: float, requests: int) -> None:
        """Requests sent without leases (no pace yet), so that a first 429 knows the rate it came at."""
        self._granted.extend([now] * requests)
        self._send_rate(now)

    def tick(self, now: float) -> None:
        """Additive increase while quiet; the operating pace is dropped once it reaches the ceiling."""
        if self.operating is None or now - self._last_change < INCREASE_EVERY:
            return
        self._last_change = now
        self.operating += max(INCREASE_STEP * self.operating, MIN_RATE)
        ceiling = self.ceiling()
        if ceiling is not None and self.operating >= ceiling:
            self.operating = None

    def _send_rate(self, now: float) -> float | None:
        granted = self._granted
        while granted and granted[0] < now - RATE_WINDOW:
            granted.popleft()
        return len(granted) / RATE_WINDOW if granted else None


class SharedPace(Protocol):
    """What an engine's governor needs of a shared budget (see governor.Governor's `shared`)."""

    @property
    def limited(self) -> bool: ...
    @property
    def stopped(self) -> str | None: ...

    async def take(self, tokens: int) -> bool: ...
    def announce(self, requests_per_s: float | None, tokens_per_min: float | None) -> None: ...
    def rate_limited(self, retry_after: float | None) -> None: ...


class LeaseClient:
    """One engine's side of the shared budget: waits for each request's slot, leasing more as needed.

    `call(want, tokens_each)` asks the coordinator for a lease. One call is in flight at a
    time; the other requests wait for it."""

    def __init__(self, call: Callable[[int, float], Awaitable[Lease]], *, want: int = 64) -> None:
        self._call = call
        self._want = want
        self._slots: deque[float] = deque()
        self._tokens = 0.0
        self._lock = asyncio.Lock()
        self.limited = True  # until a lease says otherwise
        self.stopped: str | None = None

    async def take(self, tokens: int) -> bool:
        """Wait for this request's turn; False when the run was stopped elsewhere."""
        while True:
            if self.stopped is not None:
                return False
            if not self.limited:
                return True
            now = time.monotonic()
            slots = self._slots
            while slots and slots[0] < now - GRACE:
                slots.popleft()  # too late to use without bunching with the next ones
            if slots and self._tokens >= tokens:
                at = slots.popleft()
                self._tokens -= tokens
                if at > now:
                    await asyncio.sleep(at - now)
                return True
            async with self._lock:
                if self._slots and self._tokens >= tokens:
                    continue  # another request's lease covered this one
                lease = await self._call(self._want, float(tokens))
                arrived = time.monotonic()  # slot times are offsets from the grant: on this engine's own clock from now
                lease.slots = [arrived + offset for offset in lease.slots]
                self.stopped, self.limited = lease.stopped, lease.limited
                if lease.tokens < tokens * len(lease.slots):  # no token budget: only slots count
                    lease.tokens = float(tokens * len(lease.slots))
                self._slots.extend(lease.slots)
                self._tokens += lease.tokens

    def relimit(self, limited: bool) -> None:
        """The coordinator's word on whether leases are needed (a 429 elsewhere, a header learned)."""
        if limited and not self.limited:
            self._slots.clear()
            self._tokens = 0.0
        self.limited = limited
