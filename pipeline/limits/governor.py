"""The governor: what may be sent, and when. The engine asks it before each request
(`admit`) and tells it what came back (`answered`, `succeeded`, `failed`).

It joins the pure controllers (learn.py) to the pacing primitives (buckets.py):
headers set the pace, 429s and latency move it and the gate, outages close the
hold. It also decides what the engine cannot: that a wait is too long to sit out,
that the server is down for good, or that every row gets the same refusal.
With `adapt` off it behaves as before learning existed: the pace is the user's
`--rpm`/`--tpm`, the gate stays at `--concurrency`, and a 429's wait holds all.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pipeline import errors
from pipeline.limits.buckets import Gate, Hold, Pacer, request_pacer, token_pacer
from pipeline.limits.learn import (
    HEADROOM,
    PROBE_FIRST,
    Breaker,
    ConcurrencyController,
    RateController,
    RepeatGuard,
    Ticket,
    outage_kind,
)
from pipeline.limits.lease import ELSEWHERE
from pipeline.limits.spend import Budget as SpendBudget
from pipeline.limits.spend import Verdict, describe_ceiling
from pipeline.observe.stats import RunStats
from pipeline.providers.ratelimit import Budget, Dialect, RateHeaders, parse_rate_headers

if TYPE_CHECKING:
    from pipeline.limits.lease import SharedPace

HOLD_ALL_FROM = 2.0  # a 429 asking for at least this long holds every request; shorter waits hold only the row
NOTICE_WAIT = 5.0  # holds shorter than this pass without a word
TOKEN_DIMS = ("tokens", "input_tokens", "output_tokens")
LAG_EVERY = 0.05  # seconds between samples of our own event loop's lag


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _at(seconds: float) -> str:
    if not seconds < 366 * 86400:
        return "more than a year from now"
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%d %H:%M UTC")


class Governor:
    def __init__(
        self,
        *,
        stats: RunStats,
        concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        adapt: bool = True,
        max_wait: float = 900.0,
        dialect: Dialect = "auto",
        max_tokens: int = 0,
        notice: Callable[[str], None] = lambda message: None,
        spend: SpendBudget | None = None,
        shared: SharedPace | None = None,
        settled: asyncio.Event | None = None,
    ) -> None:
        self._stats = stats
        self._shared = shared
        self.spend = spend
        # A reservation was settled or released: waiters for the budget look again. Governors that share
        # one budget (a run of several models) share this too, so a settle on one wakes the others' waiters.
        self._settled = settled or asyncio.Event()
        if spend is not None:
            stats.ceiling_what = describe_ceiling(spend)
        self._adapt = adapt
        self._max_wait = max_wait
        self._dialect = dialect
        self._max_tokens = max_tokens
        self._notice = notice
        self.concurrency = ConcurrencyController(concurrency) if adapt else None
        self.gate = Gate(self.concurrency.limit if self.concurrency else concurrency)
        self.rate = RateController(user_per_second=rpm / 60 if rpm else None)
        self.hold = Hold()
        self.breaker = Breaker()
        self.repeat = RepeatGuard()
        self._any_reply = False  # an HTTP answer of any status came: the address is right, so refusals are an outage
        self._requests: Pacer | None = None
        self._user_tpm = tpm
        self._token_ceiling: dict[str, float] = {}  # per minute, from headers
        self._tokens: dict[str, Pacer] = {}
        self._on_wire = 0
        self._stopping = False
        self._blocked: errors.FatalError | None = None
        self._drained = asyncio.Event()  # set when stopping and the last request in flight came back
        stats.concurrency_ceiling = concurrency
        self._apply_pace(started=False)
        self._show_concurrency()

    # ---- before a request --------------------------------------------------------------

    async def admit(self, tokens: int) -> Ticket:
        """Wait for a slot, the hold and the pacers; the ticket goes back with the answer.

        The hold is checked again after the pacers: a request that waited through a
        429's hold goes out at the pace, not in a burst when the hold lifts."""
        hold, gate = self.hold, self.gate
        epoch: int | None = None
        while True:
            if not hold.is_open:
                await hold.wait()
            if self._blocked is not None:
                raise self._blocked
            if not gate.try_acquire():  # the common case costs no coroutine
                await gate.acquire()
            try:
                if self._requests is not None:
                    await self._requests.acquire()
                if self._tokens:
                    await self._take_tokens(tokens)
                if self._shared is not None:
                    epoch = await self._shared.take(tokens)
                    if epoch is None:
                        self._block(errors.FatalError(ELSEWHERE + str(self._shared.stopped), kind="stopped"))
            except BaseException:
                gate.release()
                raise
            if hold.is_open and self._blocked is None:
                break
            gate.release()
        self._on_wire += 1
        self._stats.in_flight = self._on_wire
        now = asyncio.get_running_loop().time()
        self.rate.sent(now)
        return Ticket(
            sent_at=now,
            on_wire=self._on_wire,
            epoch=self.concurrency.epoch if self.concurrency else 0,
            rate_epoch=self.rate.epoch if epoch is None else epoch,
            probe=self.breaker.is_open,
            generation=self.concurrency.generation if self.concurrency else 0,
        )

    async def reserve(self, held: tuple[int, int]) -> bool:
        """Reserve a request's worst case against the spend ceiling; False once the ceiling is reached.

        A request that fits only once those in flight settle waits for them (they were
        reserved at their worst case and are usually billed far less), woken by each settle."""
        spend = self.spend
        assert spend is not None
        if self._shared is not None and self._shared.shares_spend:  # the cluster's ceiling, held by the coordinator
            if not await self._shared.reserve(held):
                self._stats.ceiling_reached = True
                return False
            spend.reserve(held)  # this engine's own tally, for its counters
            return True
        while (verdict := spend.check(*held)) is Verdict.WAIT:
            if self._blocked is not None:  # the run stopped: nothing more settles, so stop waiting
                raise self._blocked
            self._settled.clear()
            await self._settled.wait()
        if verdict is Verdict.REFUSE:
            self._stats.ceiling_reached = True
            self._settled.set()  # the other waiters hear it too
            return False
        spend.reserve(held)
        return True

    def settle(self, held: tuple[int, int], tokens_in: int, tokens_out: int) -> None:
        """What the server billed for a reserved request: its usage, or (0, 0) when nothing was billed."""
        spend = self.spend
        assert spend is not None
        spend.settle(held, tokens_in, tokens_out)
        if self._shared is not None and self._shared.shares_spend:
            self._shared.settle(held, tokens_in, tokens_out)
        self._stats.spent_tokens_in, self._stats.spent_tokens_out = spend.spent_in, spend.spent_out
        self._settled.set()

    async def _take_tokens(self, tokens: int) -> None:
        out = min(self._max_tokens, tokens)
        cost = {"tokens": tokens, "input_tokens": tokens - out, "output_tokens": out}
        for dim, pacer in list(self._tokens.items()):
            await pacer.take(cost[dim])

    @property
    def in_flight(self) -> int:
        """Requests admitted whose answer has not been read yet."""
        return self._on_wire

    def share(self, n: int | None) -> None:
        """This engine's part of requests in flight shared with other engines (a Ray actor's grant)."""
        self.gate.share(n)

    @property
    def own_limit(self) -> int:
        """How many this engine would have in flight on its own: its learned limit, the breaker's cap."""
        return self.gate.own_limit

    def block(self, err: errors.FatalError) -> None:
        """Refuse every further request with `err` (a stop decided elsewhere: another Ray actor's fatal answer)."""
        self._block(err)

    def release(self) -> None:
        """The answer (or failure) of an admitted request has been read."""
        self._on_wire -= 1
        self._stats.in_flight = self._on_wire
        self.gate.release()
        if self._on_wire == 0 and self._stopping:
            self._drained.set()

    def _block(self, err: errors.FatalError) -> None:
        """Refuse every further request with `err` (waiters are woken to hear it)."""
        if self._blocked is None:
            self._blocked = err
        # Every waiter wakes to hear it (once the run is stopping, the hold is shut: opened all the same),
        # and so do those waiting for room under the spend ceiling.
        self.hold.open_now(even_if_shut=self._stopping)
        self._settled.set()

    def stop(self) -> None:
        """Admit nothing more (the run is ending early); requests in flight may finish."""
        self._stopping = True
        self.hold.shut()
        if self._on_wire == 0:
            self._drained.set()

    async def watch_loop(self) -> None:
        """Measure how late our own event loop runs a timer, for the latency rule: when this
        process is the busy one, answers wait in our loop, not in the server's queue."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_EVERY)
            lag = max(0.0, loop.time() - t0 - LAG_EVERY)
            if self.concurrency is not None:
                self.concurrency.loop_lag = 0.7 * self.concurrency.loop_lag + 0.3 * lag

    async def drained(self) -> None:
        """Returns once stop() was called and every request in flight has come back."""
        await self._drained.wait()

    # ---- after a request ---------------------------------------------------------------

    def answered(self, headers: Mapping[str, str]) -> None:
        """Read the rate-limit headers of any answer."""
        self._any_reply = True
        if self._adapt and (seen := parse_rate_headers(headers, self._dialect)) is not None:
            self._learn(seen)

    def _learn(self, seen: RateHeaders) -> None:
        changed = False
        r = seen.requests
        if r is not None and r.limit and r.window_s <= 60:
            per_second = r.limit / r.window_s
            if self.rate.header is None or abs(per_second - self.rate.header) > 0.005 * self.rate.header:
                self.rate.announced(per_second, r.header)
                changed = True
        for dim in TOKEN_DIMS:
            b: Budget | None = getattr(seen, dim)
            if b is not None and b.limit and b.window_s <= 60:
                per_minute = b.limit * 60 / b.window_s
                old = self._token_ceiling.get(dim)
                if old is None or abs(per_minute - old) > 0.005 * old:
                    self._token_ceiling[dim] = per_minute
                    changed = True
        if changed:
            self._apply_pace()
        for daily in (seen.requests_day, seen.tokens_day):
            if daily is not None and daily.remaining is not None and daily.remaining <= 0 and daily.reset_s:
                if daily.reset_s > self._max_wait:
                    # Nothing more may be sent, but the run may be done already: the next
                    # request that asks to go out stops the run instead.
                    self._block(
                        errors.WaitTooLong(
                            f"the daily limit ({daily.header}: {daily.limit or 0:,.0f}) is used up and resets in "
                            f"{_span(daily.reset_s)}, at about {_at(daily.reset_s)}, later than --max-wait {_span(self._max_wait)}. "
                            "Run the same command again after that",
                            kind="daily_limit",
                        )
                    )
                    return
                self._hold_all(daily.reset_s, f"daily limit {daily.header} used up")

    def succeeded(self, ticket: Ticket, latency_s: float, output_tokens: int | None) -> None:
        if self.breaker.success():
            self.gate.cap(None)
            self._notice("pipeline: the server answers again; resuming at the pace learned before")
        self._stats.failing_streak, self._stats.next_probe_at = 0, None
        self.repeat.success()
        self.rate.answered(ticket.sent_at + latency_s)
        if self.concurrency is not None and self.concurrency.on_success(ticket, latency_s, output_tokens):
            self._show_concurrency()
        if self.rate.operating is not None and self.rate.grow(ticket.sent_at + latency_s):
            self._apply_pace()

    def failed(self, ticket: Ticket, err: errors.RequestError) -> bool:
        """Learn from a failed attempt; returns whether it counts against the row's attempts
        (not while the breaker holds everything: the server is down, the row is fine).
        Raises a FatalError when the run cannot go on."""
        now = asyncio.get_running_loop().time()
        if isinstance(err, errors.RateLimited):
            self._rate_limited(ticket, err, now)
        elif self.concurrency is not None and (
            isinstance(err, errors.RequestTimeout) or (isinstance(err, errors.ServerError) and err.overloaded)
        ):
            kind = "timeout" if isinstance(err, errors.RequestTimeout) else "overloaded"
            if self.concurrency.on_overload(ticket, kind):
                self._show_concurrency()
        # The same refusal on every request, or the same thing that is no answer at all (a web page, another
        # API: a malformed reply is retried, but one on every request is the address, not the row).
        permanent = not err.transient or err.kind == "malformed_reply"
        if permanent and not err.fatal and self.repeat.failure(err.kind, err.message):
            raise errors.FatalError(
                f"the last {self.repeat.count} requests all got the same answer ({err.message}); every row would fail "
                "the same way. Check the model, the parameters (--param/params) and --base-url",
                kind="repeated",
            )
        return self._outage(ticket, err, now)

    def _rate_limited(self, ticket: Ticket, err: errors.RateLimited, now: float) -> None:
        wait = err.retry_after
        if wait is not None and wait > self._max_wait:
            raise errors.WaitTooLong(
                f"the server asks to wait {_span(wait)} ({err.message}), longer than --max-wait {_span(self._max_wait)}. "
                f"Run the same command again after about {_at(wait)}, or raise --max-wait",
                kind="wait_too_long",
            )
        if err.scope == "concurrency":
            self._stats.limited_concurrency += 1
            if self.concurrency is not None:
                # Only this row waits (its retry timer); fewer go out at once.
                if self.concurrency.on_overload(ticket, "concurrency", err.limit):
                    self._show_concurrency()
                return
        else:
            self._stats.limited_rate += 1
        first = self._requests is None  # nothing paced us yet: this is a storm, not a nudge
        if self._shared is not None:  # the pace is the cluster's: the coordinator decreases it for every engine
            first = not self._shared.limited
            self._shared.rate_limited(wait, ticket.rate_epoch)
        elif self._adapt and self.rate.rate_limited(now, ticket, wait):
            self._apply_pace()
        if wait is not None and (not self._adapt or wait >= HOLD_ALL_FROM):
            # The account is over its limit, not this row: everyone waits, as asked.
            self._hold_all(wait, f"rate limited ({err.message})")
        elif self._adapt and first:
            # The window is spent; sending into it at any pace only earns more 429s.
            self._hold_all(min(wait or 1.0, 1.0), "rate limited")

    def _outage(self, ticket: Ticket, err: errors.RequestError, now: float) -> bool:
        # Armed from the first request: a server that answers 5xx to everything, takes requests and
        # never answers them (timeouts), or stops answering after it did, is an outage, and --max-wait
        # bounds it. A server never connected to is a wrong address, which the engine reports after
        # the row's attempts; connections dropped before any answer fail their rows as they come.
        if not outage_kind(err.kind):
            self.breaker.failure(now, err.kind)  # breaks the streak
            self._stats.failing_streak = 0
            return True
        if not self._any_reply and err.kind != "timeout":
            return True
        self._stats.failing_streak += 1
        self._stats.failing_kind = err.kind
        if self.breaker.is_open:
            if ticket.probe:
                down = self.breaker.open_for(now)
                if down >= self._max_wait:
                    raise errors.WaitTooLong(
                        f"the server has failed every request for {_span(down)} ({err.message}), "
                        f"longer than --max-wait {_span(self._max_wait)}. Run the same command again when it is back",
                        kind="outage",
                    )
                # The last probe goes when --max-wait is up, not up to PROBE_MAX after it.
                self._probe_in(min(self.breaker.probe_failed(), max(PROBE_FIRST, self._max_wait - down)), now)
            return False
        hold = self.breaker.failure(now, err.kind, self.gate.limit)
        if hold is None:
            return True
        self._stats.breaker_opened = self.breaker.opened
        self.gate.cap(1)
        self._probe_in(hold, now)
        self._notice(
            f"pipeline: the last {self.breaker.streak} requests failed alike ({err.message}); holding all requests and "
            f"trying one at growing intervals for up to --max-wait {_span(self._max_wait)}. Rows keep their attempts"
        )
        return False

    def _probe_in(self, seconds: float, now: float) -> None:
        self.hold.close_for(seconds)
        self._stats.next_probe_at = now + seconds

    def _hold_all(self, seconds: float, why: str) -> None:
        if self.hold.close_for(seconds) and seconds >= NOTICE_WAIT:
            self._notice(f"pipeline: {why}; holding all requests for {_span(seconds)}")

    def tell(self, message: str) -> None:
        """A one-off line for the user from the engine, through the same reporter as the governor's own."""
        self._notice(message)

    # ---- applying decisions ------------------------------------------------------------

    def _apply_pace(self, *, started: bool = True) -> None:
        """Set the pacers to the pace in force. A pacer that appears mid-run (a limit just
        learned) starts full: what was sent before it existed already counts at the server."""
        if self._shared is not None:  # learned limits are the account's: they go to the cluster's budget
            tpm = [c for c in (self._user_tpm, self._token_ceiling.get("tokens")) if c]
            self._shared.announce(self.rate.header, min(tpm) if tpm else None)
            return
        pace = self.rate.pace()
        if pace.per_second is None:
            self._requests = None
        elif self._requests is None:
            self._requests = request_pacer(pace.per_second, full=started)
        elif abs(self._requests.per_second - pace.per_second) > 1e-9:
            slower = pace.per_second < self._requests.per_second
            self._requests.set_rate(pace.per_second)
            if slower and started:
                # What was sent at the old pace counts against the new one: no burst on top.
                self._requests.fill()
        s = self._stats
        s.pace_rpm = None if pace.per_second is None else pace.per_second * 60
        s.pace_source = pace.source
        s.pace_detail = pace.detail
        for dim in TOKEN_DIMS:
            caps = [c for c in (self._user_tpm if dim == "tokens" else None, self._token_ceiling.get(dim)) if c]
            if not caps:
                self._tokens.pop(dim, None)
                continue
            per_second = min(caps) * HEADROOM / 60
            if dim in self._tokens:
                slower = per_second < self._tokens[dim].per_second
                self._tokens[dim].set_rate(per_second)
                if slower and started:
                    self._tokens[dim].fill()
            else:
                self._tokens[dim] = token_pacer(per_second, full=started)
        tpm = [c for c in (self._user_tpm, self._token_ceiling.get("tokens")) if c]
        s.pace_tpm = min(tpm) if tpm else None
        s.pace_tpm_source = None if not tpm else ("user" if self._user_tpm and min(tpm) == self._user_tpm else "header")

    def _show_concurrency(self) -> None:
        if self.concurrency is not None:
            self.gate.set_limit(self.concurrency.limit)
            self._stats.concurrency = self.concurrency.limit
            self._stats.concurrency_named = self.concurrency.named
        else:
            self._stats.concurrency = self.gate.limit
