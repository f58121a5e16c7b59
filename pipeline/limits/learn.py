"""Controllers that learn a server's limits from what it says and does.

Pure: no asyncio, no I/O, no clock of their own. The governor feeds them events
stamped with the loop's time and applies what they decide to the pacers and the
gate, so every rule here is tested with scripted events and no sleeping.

- `ConcurrencyController`: how many requests may be in flight. Starts at one,
  grows while answers come back as fast as before, shrinks on overload: a
  concurrency-type 429, 503/529, a timeout, or latency that grows with the load
  (a queueing server such as vLLM or llama.cpp never says no; it only gets slow).
- `RateController`: the request pace. The lowest of the user's `--rpm` (a hard
  cap), the limit the server announces in its headers, and after rate-type 429s
  an operating rate that drops below what was being sent and grows back along a
  CUBIC curve, so two jobs sharing a key settle on a fair split.
- `Breaker`: when every recent request fails the same transient way (connection
  refused, 5xx), hold everything and probe with one request at growing
  intervals, instead of burning each row's attempts in seconds.
- `RepeatGuard`: the same permanent failure on row after row (a 501, a 400 for a
  parameter the server rejects) stops the run instead of failing every row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import median

# ---- concurrency -------------------------------------------------------------------------

BETA = 0.9  # multiplicative decrease on overload: gentle, as the gate also moves often
LATENCY_TOLERANCE = 2.0  # window latency above this many times the baseline means a queue is building
LOAD_GROWTH = 1.5  # ...but only if the load grew this much since the baseline (else the server just got slower)
OWN_SHARE = 0.5  # ...and our own event loop's lag explains less than this share of the growth:
LOOP_HOPS = 4  # an answer waits in our loop about this many times (socket, parser, future, task) per request
MIN_WINDOW = 5  # latency samples per window at least (after slow start)
SLOW_START_WINDOW = 3  # ...and in slow start, where a window is also at least a round trip's answers
FLAT = 1.25  # slow start quadruples the limit while latency stays within this of the baseline
TOKEN_OVERHEAD = 16  # output tokens worth of fixed cost per request (prefill, network), for normalising latency
PROBE_RTTS = 10  # above the last failure point, +1 per this many round trips: rare probes, few 429s
# 503/529 and timeouts count as overload only when they are a good share of recent answers
# (a moving average over about 20): a server with 10% random 5xx is flaky, not full, and
# shrinking the gate on each one would starve it (measured: 10x the wall time).
TROUBLE_ALPHA, TROUBLE_SHARE = 0.05, 0.3


@dataclass(frozen=True, slots=True)
class Ticket:
    """What the controllers need to remember about one request, taken when it was sent."""

    sent_at: float
    on_wire: int  # requests on the wire at that moment, this one included
    epoch: int  # the concurrency controller's epoch: signals from before the last decrease are ignored
    rate_epoch: int  # the same for the rate controller
    probe: bool = False  # sent while the breaker held everything else
    generation: int = 0  # the concurrency limit's generation: latency samples count only at the limit they saw


class ConcurrencyController:
    """The limit L on requests in flight, a float in [1, ceiling]; the gate uses floor(L).

    Slow start: after each window of a round trip's answers, x4 while latency is
    flat and x2 while it is within tolerance, until the first overload signal. After it, +1 per
    round trip up to just below where it failed, then one more slot every
    `PROBE_RTTS` round trips. A decrease reacts once per round trip: signals from
    requests sent before it are ignored.
    """

    def __init__(self, ceiling: int, *, start: float = 1.0) -> None:
        self.ceiling = max(1, ceiling)
        self.value = min(float(self.ceiling), max(1.0, start))
        self.epoch = 0
        self.generation = 0  # bumped whenever the limit jumps (a doubling, a decrease)
        self.slow_start = True
        self.failed_at: float | None = None  # L when the last decrease happened
        self.named: int | None = None  # an in-flight limit the server named ("Maximum 10 queued requests")
        self.signals: dict[str, int] = {}  # overload signals acted on, by kind
        self.trouble = 0.0  # moving share of answers that were 503/529 or timeouts
        self._window: list[tuple[float, int, float]] = []  # (normalised latency, on_wire at send, latency) of this generation
        self.loop_lag = 0.0  # seconds a ready callback waits in our own event loop, lately (set by the governor)
        self._baseline: tuple[float, float, float] | None = None  # (latency, mean on_wire, raw latency) of the fastest window

    @property
    def limit(self) -> int:
        return int(self.value)

    def on_success(self, t: Ticket, latency_s: float, output_tokens: int | None) -> bool:
        """An answer came back; returns True when the limit changed."""
        before = limit = int(self.value)
        self.trouble *= 1 - TROUBLE_ALPHA
        if t.generation == self.generation:
            norm = latency_s / ((output_tokens or 0) + TOKEN_OVERHEAD)
            self._window.append((norm, t.on_wire, latency_s))
            # A window is a round trip's worth of answers in slow start (L doubles per
            # window), half of one after it (L moves in small steps).
            if len(self._window) >= (max(SLOW_START_WINDOW, limit) if self.slow_start else max(MIN_WINDOW, limit // 2)):
                window, self._window = self._window, []
                if self._judge(window):
                    return True
                if self.slow_start and max(w[1] for w in window) >= max(1, limit - 1):
                    # Four times while the latency has not moved at all, twice while it is within tolerance.
                    fast = self._baseline is not None and median(w[0] for w in window) <= FLAT * self._baseline[0]
                    self.value = min(self._cap(), self.value * (4 if fast else 2))
                    self.generation += 1
        # Grow only when the gate is what holds requests back; when the pacer or
        # the input is the bottleneck, a larger limit would be a number, not capacity.
        if not self.slow_start and t.on_wire >= max(1, limit - 1):
            if self.failed_at is not None and self.value >= self.failed_at - 1:
                step = 1.0 / (PROBE_RTTS * self.value)  # above where it failed: probe rarely
            else:
                step = 1.0 / self.value  # +1 per round trip
            self.value = min(self._cap(), self.value + step)
        return self.limit != before

    def _cap(self) -> float:
        return float(min(self.ceiling, self.named or self.ceiling))

    def _judge(self, window: list[tuple[float, int, float]]) -> bool:
        """Judge a window's latency against the baseline; True when it made the limit drop."""
        lat = median(w[0] for w in window)
        load = sum(w[1] for w in window) / len(window)
        raw = median(w[2] for w in window)
        base = self._baseline
        if base is None or lat < base[0]:
            self._baseline = (lat, load, raw)
            return False
        if lat <= LATENCY_TOLERANCE * base[0]:
            return False
        if max(w[1] for w in window) < 0.8 * self.limit:
            return False  # the gate was never full: the pacer or the input set the load, not us
        if load < LOAD_GROWTH * base[1]:
            # Slower at the same load: the server changed, not our pressure on it. Re-learn.
            self._baseline = (lat, load, raw)
            return False
        if LOOP_HOPS * self.loop_lag >= OWN_SHARE * (raw - base[2]):
            # The time was spent in our own event loop (this process is busy), not in a
            # queue at the server: fewer in flight would only send fewer.
            return False
        # A queue is building: step back towards where the latency would be within tolerance.
        factor = max(0.5, min(BETA, LATENCY_TOLERANCE * 0.75 * base[0] / lat))
        return self._decrease("latency", self.value * factor, self.value)

    def on_overload(self, t: Ticket, kind: str, named_limit: int | None = None) -> bool:
        """A concurrency-type 429 ("concurrency"), 503/529 ("overloaded") or a timeout ("timeout").

        Returns True when the limit changed."""
        if named_limit is not None and named_limit >= 1:
            # The server said N: never go above it; we count our own requests until their
            # replies are read, so our count is never below the server's.
            self.named = named_limit
            if self.value > named_limit:
                self.value = float(named_limit)
                self._after_decrease(kind, named_limit + 1.0)
                return True
        if kind != "concurrency":
            self.trouble += TROUBLE_ALPHA * (1 - self.trouble)
            if self.trouble < TROUBLE_SHARE:
                return False
        if t.epoch != self.epoch:
            return False
        if kind == "concurrency":
            # Refused with on_wire in flight: on_wire - 1 is a direct estimate of the limit.
            return self._decrease(kind, min(t.on_wire - 1.0, self.value * BETA), float(t.on_wire))
        return self._decrease(kind, self.value * (0.5 if kind == "timeout" else BETA), self.value)

    def _decrease(self, kind: str, target: float, failed_at: float) -> bool:
        self.value = max(1.0, min(self.value, target))
        self._after_decrease(kind, failed_at)
        return True

    def _after_decrease(self, kind: str, failed_at: float) -> None:
        self.signals[kind] = self.signals.get(kind, 0) + 1
        self.failed_at = failed_at
        self.slow_start = False
        self.epoch += 1
        self.generation += 1
        self._window = []


# ---- rate ----------------------------------------------------------------------------------

HEADROOM = 0.987  # of a known limit: see buckets.py for why this pace has no 429s under a per-second window
CUBIC_C = 0.4  # growth constant of CUBIC (requests/s per s^3), as in the AWS SDKs' adaptive mode
BETA_BLIND = 0.7  # decrease without headers: we do not know the limit, so step well below
BETA_KNOWN = 0.9  # decrease under an announced limit: someone else shares the key, give way a little
MAX_OVER_MEASURED = 2.0  # never pace above twice what is actually being sent
METER_SLOTS, METER_SLOT_S = 10, 0.1  # the send rate over the last second, in 100 ms slots
METER_MIN_EVENTS = 10  # fewer in the last ten seconds say nothing about a rate


class RateMeter:
    """Events per second over the last ten slots (100 ms slots: the last second), O(1) per event."""

    __slots__ = ("_counts", "_min_span", "_slot", "_slot_s", "_start")

    def __init__(self, slot_s: float = METER_SLOT_S, *, min_span: float | None = None) -> None:
        self._counts = [0] * METER_SLOTS
        self._slot = 0  # absolute index of the newest slot
        self._slot_s = slot_s
        self._min_span = min_span  # early on, divide by the time elapsed, but by no less than this
        self._start: float | None = None

    def add(self, now: float) -> None:
        # Called per request: the common case (same slot as the last call) without a call.
        start = self._start
        if start is None or int((now - start) / self._slot_s) != self._slot:
            self._advance(now)
        self._counts[self._slot % METER_SLOTS] += 1

    def count(self, now: float) -> int:
        self._advance(now)
        return sum(self._counts)

    def rate(self, now: float) -> float:
        self._advance(now)
        if self._start is None:
            return 0.0
        # Nine whole slots and the part of the newest one that has passed; the full span
        # even at the start, so that a start-up burst is not taken for a rate.
        elapsed = now - self._start
        span = (METER_SLOTS - 1) * self._slot_s + (elapsed - self._slot * self._slot_s)
        if self._min_span is not None:
            span = min(span, max(elapsed, self._min_span))
        return sum(self._counts) / max(span, self._slot_s)

    def _advance(self, now: float) -> None:
        if self._start is None:
            self._start = now
        slot = int((now - self._start) / self._slot_s)
        if slot - self._slot >= METER_SLOTS:
            self._counts = [0] * METER_SLOTS
        else:
            for s in range(self._slot + 1, slot + 1):
                self._counts[s % METER_SLOTS] = 0
        self._slot = max(self._slot, slot)


class Meter:
    """A rate over the last second when there is enough in it to tell, else over the last ten:
    at 12 requests a minute (or answers taking seconds) the last second is usually empty."""

    __slots__ = ("_long", "_short")

    def __init__(self) -> None:
        # The long one divides by the time elapsed in the first ten seconds (at least one): ten
        # seconds for five requests sent in the first 0.2 s would make a pace of one in two seconds.
        self._short, self._long = RateMeter(METER_SLOT_S), RateMeter(10 * METER_SLOT_S, min_span=1.0)

    def add(self, now: float) -> None:
        self._short.add(now)
        self._long.add(now)

    def rate(self, now: float) -> float | None:
        """Per second; None while there are too few events to call it a rate."""
        if self._short.count(now) >= METER_MIN_EVENTS:
            return self._short.rate(now)
        if self._long.count(now) >= METER_MIN_EVENTS:
            return self._long.rate(now)
        return None


@dataclass(frozen=True, slots=True)
class Pace:
    """The request pace in force and where it comes from ("user", "header", "adaptive")."""

    per_second: float | None
    source: str | None
    detail: str = ""


class RateController:
    """The pace of requests: min(user cap, announced limit, operating rate after 429s)."""

    def __init__(self, *, user_per_second: float | None) -> None:
        self.user = user_per_second  # a hard ceiling, never exceeded
        self.header: float | None = None  # the announced limit, per second
        self.header_name = ""
        self.operating: float | None = None  # set after a rate-type 429, else None (no AIMD in force)
        self.epoch = 0
        self._w_max = 0.0
        self._k = 0.0
        self._since = 0.0
        self._quiet_until = 0.0  # 429s of requests sent before this belong to the last decrease
        self.meter = Meter()  # requests sent
        self.accepted = Meter()  # requests answered (not refused): what the server lets through for us

    def ceiling(self) -> float | None:
        caps = [c * HEADROOM for c in (self.user, self.header) if c]
        return min(caps) if caps else None

    def pace(self) -> Pace:
        ceiling = self.ceiling()
        if self.operating is not None and (ceiling is None or self.operating < ceiling):
            return Pace(self.operating, "adaptive", "after 429s")
        if ceiling is None:
            return Pace(None, None)
        if self.user and ceiling == self.user * HEADROOM:
            return Pace(ceiling, "user", "--rpm")
        return Pace(ceiling, "header", self.header_name)

    def sent(self, now: float) -> None:
        self.meter.add(now)

    def answered(self, now: float) -> None:
        self.accepted.add(now)

    def announced(self, per_second: float, header: str) -> None:
        """The server's headers name its request limit (newest wins: limits move both ways)."""
        self.header, self.header_name = per_second, header

    def rate_limited(self, now: float, t: Ticket, retry_after: float | None = None) -> bool:
        """A rate-type (or unknown) 429; True when the pace dropped.

        One decrease per episode: a 429 of a request sent before the last decrease,
        or while the window the server said was full (its Retry-After, up to 1 s)
        had not yet passed, is the same overload seen again, not a new one."""
        if t.rate_epoch != self.epoch or t.sent_at < self._quiet_until:
            return False
        # Step down from what the server let through for us, not from what we sent: when
        # another job shares the key, that is our share, and one step gets near it.
        # Too few sends to call it a rate (a 429 on the second request): the row waits its
        # Retry-After, and the next 429, with more to go on, sets a pace.
        known = [r for r in (self.pace().per_second, self.meter.rate(now), self.accepted.rate(now)) if r]
        if not known:
            return False
        base = min(known)
        beta = BETA_KNOWN if self.header else BETA_BLIND
        self._w_max = base
        self._k = (base * (1 - beta) / CUBIC_C) ** (1 / 3)
        self._since = now
        self._quiet_until = now + min(retry_after or 0.0, 1.0)
        self.operating = max(base * beta, 1 / 60)
        self.epoch += 1
        return True

    def grow(self, now: float) -> bool:
        """CUBIC growth since the last decrease: back to where it failed in about K seconds,
        gently past it, then faster; capped at twice the measured send rate so an idle
        job does not bank a rate it never tested. True when the pace moved by > 1%."""
        if self.operating is None:
            return False
        t = now - self._since
        target = CUBIC_C * (t - self._k) ** 3 + self._w_max
        measured = self.meter.rate(now)
        if measured:
            target = min(target, max(MAX_OVER_MEASURED * measured, self._w_max * BETA_BLIND))
        ceiling = self.ceiling()
        if ceiling is not None and target >= ceiling:
            self.operating = None  # back at the ceiling: nothing left to learn until the next 429
            return True
        if abs(target - self.operating) <= 0.01 * self.operating:
            return False
        self.operating = max(target, 1 / 60)
        return True


# ---- outages and repeated failures -------------------------------------------------------

OUTAGE_KINDS = frozenset({"connect", "disconnected", "connection_reset", "timeout"})
# Outage-like failures in a row, with no success between, that open the breaker: at least
# BREAKER_TRIP, and at least as many as are in flight (up to BREAKER_SPAN). Errors come back
# faster than answers, so at high concurrency a few random 5xx arrive in a row while the
# successes sent beside them are still on the way; a whole round trip of failures is an outage.
BREAKER_TRIP, BREAKER_SPAN = 5, 64
PROBE_FIRST, PROBE_MAX = 0.5, 30.0  # seconds between probes: doubling from the first to the most


def outage_kind(kind: str) -> bool:
    """Failures that say "the server is not there / not well", not "this row is bad"."""
    if kind.startswith("http_5"):
        return kind not in ("http_501", "http_505")
    return kind in OUTAGE_KINDS or kind == "server_error"


class Breaker:
    """Closed (normal) or open (holding every request; one probe at a time at growing intervals).

    Failures while open are not charged to the rows: the server is down, not the row bad.
    """

    def __init__(self, *, trip: int = BREAKER_TRIP) -> None:
        self.trip = trip
        self.open_since: float | None = None
        self.interval = PROBE_FIRST
        self.streak = 0
        self.opened = 0  # times the breaker opened, for the summary

    @property
    def is_open(self) -> bool:
        return self.open_since is not None

    def success(self) -> bool:
        """Returns True when this closes an open breaker."""
        self.streak = 0
        if self.open_since is None:
            return False
        self.open_since, self.interval = None, PROBE_FIRST
        return True

    def failure(self, now: float, kind: str, in_flight: int = 1) -> float | None:
        """Record a failure; returns the seconds to hold everything when the breaker opens.

        `in_flight` is how many may be in flight (the gate's limit)."""
        if not outage_kind(kind):
            self.streak = 0
            return None
        self.streak += 1
        if self.open_since is None:
            if self.streak < max(self.trip, min(in_flight, BREAKER_SPAN)):
                return None
            self.open_since = now
            self.opened += 1
            self.interval = PROBE_FIRST
            return self.interval
        return None

    def probe_failed(self) -> float:
        """The probe failed: wait longer before the next."""
        self.interval = min(PROBE_MAX, self.interval * 2)
        return self.interval

    def open_for(self, now: float) -> float:
        return 0.0 if self.open_since is None else now - self.open_since


_DIGITS = re.compile(r"\d+")
REPEAT_BEFORE_ANY = 5  # identical permanent failures in a row that stop a run with nothing answered yet
REPEAT_AFTER_SOME = 50  # ...and once answers have come: a server that started refusing everything


class RepeatGuard:
    """Counts the same permanent failure on consecutive answers (numbers in the message ignored)."""

    def __init__(self) -> None:
        self.signature = ""
        self.count = 0
        self.any_success = False

    def success(self) -> None:
        self.any_success = True
        self.count = 0

    def failure(self, kind: str, message: str) -> bool:
        """Returns True when the run should stop: every request gets the same answer."""
        signature = kind + ":" + _DIGITS.sub("#", message)
        if signature == self.signature:
            self.count += 1
        else:
            self.signature, self.count = signature, 1
        return self.count >= (REPEAT_AFTER_SOME if self.any_success else REPEAT_BEFORE_ANY)
