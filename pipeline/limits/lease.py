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
  each request's slot. Slot times are the coordinator's clock, read on the
  engine's through an offset measured on every lease call (`ClockSync`, the
  NTP estimate from the quickest round trip): a lease that arrives late does
  not shift its slots onto the next lease's. A slot not used within GRACE of
  its time is dropped (a lost slot wastes budget, a late one would bunch up).

With no limit known (no --rpm/--tpm, no header, no 429 yet) nothing is leased and
each engine sends as fast as its concurrency allows. After a 429 the budget
recovers as the local engine's `RateController` does: one decrease per
congestion event (a 429 of a request sent under an earlier epoch, or within
the server's stated wait after the cut, is the same event seen again), then
CUBIC growth back to the rate before the cut within seconds, and on to the
ceiling (the user's cap, or the limit the headers name), where the adaptive
pace is dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.limits.learn import BETA_BLIND, BETA_KNOWN, CUBIC_C, HEADROOM, MAX_OVER_MEASURED

HORIZON = 0.05  # seconds of budget a lease may reach ahead: bounds what one actor holds
# Seconds a slot stays usable after its time: the local pacer's bank (buckets.BANK, 10 ms of a second's
# quota). A window of one second then sees at most the pace x 1.01 + 1 requests: under the limit at HEADROOM.
GRACE = 0.01
RATE_WINDOW = 2.0  # seconds over which the cluster's send rate is measured
RATE_MIN_SPAN = 0.25  # ...and the least it is divided by at the start (a few sends in 10 ms are no rate)
MIN_RATE = 1 / 60  # requests per second: the pace never goes to zero
QUIET_MAX = 1.0  # seconds after a cut in which 429s are the same event (the server's stated wait, up to this)
HOLD_ALL_FROM = 2.0  # a stale 429's Retry-After still holds everyone when it asks this long (as governor's)
ELSEWHERE = "stopped on another worker: "  # how an engine's stop says the cause was another engine's answer
MIN_WAIT = 1e-4  # seconds: a wait of float dust would find the same dust again, forever, on a clock that has not moved
CLOCK_SAMPLES = 32  # lease round trips the clock offset is estimated from (the quickest wins)


@dataclass
class Lease:
    """What a lease call gets: send times, tokens, and whether leasing is needed at all.

    `slots` are times on the coordinator's clock; `received` and `granted` are its clock when
    the call arrived and when it was answered, for the engine's `ClockSync`. `epoch` counts the
    budget's decreases: a 429 reported with an older epoch was sent before the last cut."""

    slots: list[float]
    tokens: float = 0.0
    limited: bool = True
    stopped: str | None = None  # the run was stopped (a fatal answer elsewhere): send nothing more
    epoch: int = 0
    received: float = 0.0
    granted: float = 0.0


@dataclass
class SlotBudget:
    """The cluster's request pace and token budget, as send times handed out in order."""

    user_rpm: float | None = None
    user_tpm: float | None = None
    adapt: bool = True
    header_rps: float | None = None  # learned from rate-limit headers (the account's limit)
    header_tpm: float | None = None
    operating: float | None = None  # after 429s, per second; None at the ceiling (or with none known)
    epoch: int = 0
    next_slot: float = 0.0
    hold_until: float = 0.0
    stopped: str | None = None
    _tokens: float = 0.0
    _tokens_at: float = 0.0
    _granted: deque[float] = field(default_factory=deque)  # slot times of the last RATE_WINDOW seconds
    _w_max: float = 0.0  # CUBIC: the rate before the last cut
    _k: float = 0.0  # CUBIC: seconds from the cut back to _w_max
    _since: float = 0.0  # when the last cut happened
    _quiet_until: float = -math.inf
    _first_send: float | None = None

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
            return Lease([], stopped=self.stopped, epoch=self.epoch), 0.0
        if now < self.hold_until:
            return None, max(MIN_WAIT, self.hold_until - now)
        self.grow(now)
        rate, tpm = self.rate(), self.tpm()
        if rate is None and tpm is None:
            return Lease([], limited=False, epoch=self.epoch, received=now, granted=now), 0.0
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
        return Lease(slots, tokens=tokens, epoch=self.epoch, received=now, granted=now), 0.0

    # ---- what the engines learn -----------------------------------------------------------

    def announced(self, requests_per_s: float | None, tokens_per_min: float | None) -> None:
        """Limits named by the server's headers: the account's, so the cluster's (newest wins)."""
        if not self.adapt:
            return
        if requests_per_s:
            self.header_rps = requests_per_s
        if tokens_per_min:
            self.header_tpm = tokens_per_min

    def rate_limited(self, now: float, epoch: int, retry_after: float | None) -> bool:
        """A 429 about the rate, of a request sent under `epoch`; True when the pace was cut.

        One cut per congestion event: a 429 of a request leased before the last cut, or
        arriving within the wait the server named (up to QUIET_MAX) after it, is the
        same event seen again. The cut is from the lower of the pace and the cluster's
        measured send rate, by the local engine's factors."""
        fresh = epoch == self.epoch and now >= self._quiet_until
        if retry_after and (not self.adapt or retry_after >= HOLD_ALL_FROM):
            self._hold(now, retry_after)  # the account is over its limit, not a row: everyone waits, as asked
        elif fresh and not self.limited():
            self._hold(now, min(retry_after or 1.0, 1.0))  # nothing paced us yet: the window is spent, a storm
        if not self.adapt or not fresh:
            return False
        known = [r for r in (self.rate(), self._send_rate(now)) if r]
        if not known:
            return False  # nothing sent that says what rate this was: the hold alone
        base = min(known)
        beta = BETA_KNOWN if self.header_rps else BETA_BLIND
        self._w_max, self._since = base, now
        self._k = (base * (1 - beta) / CUBIC_C) ** (1 / 3)
        self._quiet_until = now + min(retry_after or 0.0, QUIET_MAX)
        self.operating = max(MIN_RATE, base * beta)
        self.epoch += 1
        return True

    def _hold(self, now: float, seconds: float) -> None:
        self.hold_until = max(self.hold_until, now + min(seconds, 60.0))
        self.next_slot = max(self.next_slot, self.hold_until)

    def grow(self, now: float) -> None:
        """CUBIC growth since the last cut: back to the rate before it in about K seconds, gently
        past it, then faster; capped at twice what the cluster actually sends, so an idle run does
        not bank a rate it never tested. At the ceiling the adaptive pace is dropped."""
        if self.operating is None:
            return
        t = now - self._since
        target = CUBIC_C * (t - self._k) ** 3 + self._w_max
        measured = self._send_rate(now) or 0.0  # nothing sent lately: nothing learned about more
        target = min(target, max(MAX_OVER_MEASURED * measured, self._w_max * BETA_BLIND))
        ceiling = self.ceiling()
        if ceiling is not None and target >= ceiling:
            self.operating = None
            return
        self.operating = max(MIN_RATE, target)

    def measured(self, now: float, requests: int) -> None:
        """Requests sent without leases (no pace yet), so that a first 429 knows the rate it came at."""
        self._granted.extend([now] * requests)
        self._send_rate(now)

    def tick(self, now: float) -> None:
        """Time passes (an engine reported): the adaptive pace grows."""
        self.grow(now)

    def _send_rate(self, now: float) -> float | None:
        """Slots granted (or sends reported) a second over the last RATE_WINDOW; early on, over the time
        since the first (but at least RATE_MIN_SPAN): a window not yet full would understate the rate."""
        granted = self._granted
        if granted and self._first_send is None:
            self._first_send = granted[0]
        while granted and granted[0] < now - RATE_WINDOW:
            granted.popleft()
        if not granted or self._first_send is None:
            return None
        return len(granted) / min(RATE_WINDOW, max(now - self._first_send, RATE_MIN_SPAN))


class ClockSync:
    """The coordinator's clock read on ours: its offset, from the quickest recent round trip.

    Per call, `sent`/`back` are our clock when the call left and its answer came; `received`/
    `answered` the coordinator's when it arrived and was answered (a lease may wait there).
    The NTP estimate: offset = ((received - sent) + (answered - back)) / 2, with an error of at
    most half the round trip's time on the wire, so the quickest of the last few is kept."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=CLOCK_SAMPLES)  # (time on the wire, offset)
        self.offset = 0.0

    def sample(self, sent: float, received: float, answered: float, back: float) -> None:
        wire = (back - sent) - (answered - received)
        self._samples.append((wire, ((received - sent) + (answered - back)) / 2))
        self.offset = min(self._samples)[1]

    def local(self, remote: float) -> float:
        return remote - self.offset


class SharedPace(Protocol):
    """What an engine's governor needs of a shared budget (see governor.Governor's `shared`)."""

    @property
    def limited(self) -> bool: ...
    @property
    def stopped(self) -> str | None: ...
    @property
    def shares_spend(self) -> bool: ...

    async def take(self, tokens: int) -> int | None: ...
    def announce(self, requests_per_s: float | None, tokens_per_min: float | None) -> None: ...
    def rate_limited(self, retry_after: float | None, epoch: int) -> None: ...
    async def reserve(self, held: tuple[int, int]) -> bool: ...
    def settle(self, held: tuple[int, int], tokens_in: int, tokens_out: int) -> None: ...


class LeaseClient:
    """One engine's side of the shared budget: waits for each request's slot, leasing more as needed.

    `call(want, tokens_each)` asks the coordinator for a lease. One call is in flight at a
    time; the other requests wait for it."""

    def __init__(self, call: Callable[[int, float], Awaitable[Lease]], *, want: int = 64) -> None:
        self._call = call
        self._want = want
        self._slots: deque[tuple[float, int]] = deque()  # (time on our clock, epoch)
        self._tokens = 0.0
        self._lock = asyncio.Lock()
        self.clock = ClockSync()
        self.limited = True  # until a lease says otherwise
        self.stopped: str | None = None
        self.epoch = 0  # the budget's epoch as last heard

    async def take(self, tokens: int) -> int | None:
        """Wait for this request's turn; returns the epoch it goes under, or None when the run was stopped."""
        while True:
            if self.stopped is not None:
                return None
            if not self.limited:
                return self.epoch
            now = time.monotonic()
            slots = self._slots
            while slots and slots[0][0] < now - GRACE:
                slots.popleft()  # too late to use without bunching with the next ones
            if slots and self._tokens >= tokens:
                at, epoch = slots.popleft()
                self._tokens -= tokens
                if at > now:
                    await asyncio.sleep(at - now)
                return epoch
            async with self._lock:
                if self._slots and self._tokens >= tokens:
                    continue  # another request's lease covered this one
                sent = time.monotonic()
                lease = await self._call(self._want, float(tokens))
                self.clock.sample(sent, lease.received, lease.granted, time.monotonic())
                self.stopped, self.limited, self.epoch = lease.stopped, lease.limited, lease.epoch
                if not lease.limited:
                    continue
                tokens_leased = max(lease.tokens, float(tokens * len(lease.slots)))  # no token budget: only slots count
                self._slots.extend((self.clock.local(t), lease.epoch) for t in lease.slots)
                self._tokens += tokens_leased

    def relimit(self, limited: bool, epoch: int | None = None) -> None:
        """The coordinator's word on whether leases are needed (a 429 elsewhere, a header learned)."""
        if limited and not self.limited:
            self._slots.clear()
            self._tokens = 0.0
        self.limited = limited
        if epoch is not None:
            self.epoch = max(self.epoch, epoch)
