"""The pure controllers, fed scripted events with an explicit clock: no sleeping, exact assertions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.limits.learn import (
    BREAKER_TRIP,
    PROBE_FIRST,
    PROBE_MAX,
    REPEAT_AFTER_SOME,
    REPEAT_BEFORE_ANY,
    SLOW_START_WINDOW,
    Breaker,
    ConcurrencyController,
    RateController,
    RateMeter,
    RepeatGuard,
    Ticket,
    outage_kind,
)


def ticket(c: ConcurrencyController | None = None, *, on_wire: int | None = None, rate: RateController | None = None) -> Ticket:
    return Ticket(
        sent_at=0.0,
        on_wire=on_wire if on_wire is not None else (c.limit if c else 1),
        epoch=c.epoch if c else 0,
        rate_epoch=rate.epoch if rate else 0,
        generation=c.generation if c else 0,
    )


# ---- concurrency ---------------------------------------------------------------------------


def test_slow_start_quadruples_while_latency_is_flat_and_doubles_while_it_is_within_tolerance() -> None:
    c = ConcurrencyController(64)
    assert c.limit == 1
    for expected in (4, 16, 64, 64):
        for _ in range(max(SLOW_START_WINDOW, c.limit)):  # a window: at least a round trip's answers
            c.on_success(ticket(c), 0.1, 10)
        assert c.limit == expected
    assert c.slow_start
    c = ConcurrencyController(64)
    for _ in range(SLOW_START_WINDOW):
        c.on_success(ticket(c), 0.1, 10)
    for expected in (8, 16):  # 1.5x the baseline latency: a queue may be forming, go gently
        for _ in range(max(SLOW_START_WINDOW, c.limit)):
            c.on_success(ticket(c), 0.15, 10)
        assert c.limit == expected


def test_no_growth_while_the_gate_is_not_full() -> None:
    """The pacer or the input holds requests back: a bigger limit would be a number, not capacity."""
    c = ConcurrencyController(64, start=10)
    for _ in range(100):
        c.on_success(ticket(c, on_wire=3), 0.1, 10)
    assert c.limit == 10


def test_named_limit_caps_at_once_and_for_good() -> None:
    c = ConcurrencyController(64, start=16)
    assert c.on_overload(ticket(c, on_wire=16), "concurrency", named_limit=10)
    assert c.limit == 10 and c.named == 10
    for _ in range(1000):
        c.on_success(ticket(c), 0.1, 10)
    assert c.limit == 10


def test_concurrency_429_without_a_number_uses_the_in_flight_count_then_probes_rarely() -> None:
    c = ConcurrencyController(64, start=16)
    # The first refused request went out with 11 in flight: the server's limit is about 10.
    assert c.on_overload(ticket(c, on_wire=11), "concurrency")
    assert c.limit == 10
    # The rest of that burst was sent before the decrease: one reaction per round trip.
    assert not c.on_overload(Ticket(0.0, 16, epoch=0, rate_epoch=0), "concurrency")
    assert c.limit == 10
    # Above the failure point the limit creeps: about PROBE_RTTS round trips per extra slot.
    answers = 0
    while c.limit == 10:
        c.on_success(ticket(c), 0.2, 10)
        answers += 1
    assert c.limit == 11
    assert 80 <= answers <= 120


def test_timeouts_halve_and_overloaded_steps_back_once_they_are_a_good_share() -> None:
    c = ConcurrencyController(64, start=40)
    c.slow_start = False
    stale = ticket(c)  # sent before any decrease
    for _ in range(8):  # a run of timeouts: the server is swamped
        c.on_overload(stale, "timeout")
    assert c.limit == 20 and c.signals == {"timeout": 1}
    t = ticket(c)
    for _ in range(8):
        c.on_overload(t, "overloaded")
    assert c.limit == 18
    assert c.signals == {"timeout": 1, "overloaded": 1}


def test_scattered_5xx_do_not_shrink_the_gate() -> None:
    """10% random 503s: a flaky server, not a full one. Shrinking on each starved it."""
    c = ConcurrencyController(64, start=64)
    c.slow_start = False
    for i in range(2000):
        if i % 10 == 0:
            c.on_overload(ticket(c), "overloaded")
        else:
            c.on_success(ticket(c), 0.02, 10)
    assert c.limit == 64 and not c.signals


def test_never_below_one() -> None:
    c = ConcurrencyController(8, start=1)
    for _ in range(10):
        c.on_overload(ticket(c), "timeout")
    assert c.limit == 1 and c.value == 1.0


def test_latency_that_grows_with_load_shrinks_the_limit() -> None:
    """A queueing server (one slot): latency = on_wire x service time. The limit settles low."""
    c = ConcurrencyController(16)
    service = 1.0
    for _ in range(200):
        n = c.limit
        c.on_success(ticket(c, on_wire=n), service * n, 20)
    assert c.limit <= 3
    assert c.signals.get("latency", 0) >= 1


def test_latency_that_grows_without_load_relearns_the_baseline() -> None:
    """The server got slower for everyone (no more load from us): not a reason to send less."""
    c = ConcurrencyController(8, start=8)
    c.slow_start = False
    for _ in range(10):
        c.on_success(ticket(c), 0.1, 10)
    for _ in range(40):
        c.on_success(ticket(c), 0.5, 10)  # five times slower at the same load
    assert c.limit == 8
    assert "latency" not in c.signals


def test_long_answers_are_not_mistaken_for_queueing() -> None:
    c = ConcurrencyController(64)
    for i in range(400):
        tokens = 10 if i % 2 else 200  # short and long answers; latency proportional to the work
        c.on_success(ticket(c), 0.01 * (tokens + 16), tokens)
    assert c.limit == 64 and "latency" not in c.signals


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ok", "concurrency", "timeout", "overloaded", "named"]),
            st.integers(1, 300),
            st.floats(0.001, 10),
        ),
        max_size=300,
    ),
    st.integers(1, 256),
)
def test_limit_stays_within_bounds_and_reacts_once_per_epoch(events: list[tuple[str, int, float]], ceiling: int) -> None:
    c = ConcurrencyController(ceiling)
    for kind, n, latency in events:
        t = ticket(c, on_wire=min(n, c.limit))
        epoch = c.epoch
        if kind == "ok":
            c.on_success(t, latency, n)
        elif kind == "named":
            c.on_overload(t, "concurrency", named_limit=n)
        else:
            c.on_overload(t, kind)
            c.on_overload(t, kind)  # the same round trip again: no second decrease
            assert c.epoch <= epoch + 1
        assert 1 <= c.limit <= ceiling
        if c.named is not None:
            assert c.limit <= c.named


# ---- rate ------------------------------------------------------------------------------------


def test_meter_counts_the_last_second() -> None:
    m = RateMeter()
    for i in range(100):
        m.add(i * 0.01)  # 100 per second for one second
    assert m.rate(0.99) == pytest.approx(100, rel=0.05)
    assert m.rate(5.0) == 0


def test_pace_is_the_lowest_of_user_and_header() -> None:
    r = RateController(user_per_second=50)
    assert r.pace().source == "user" and r.pace().per_second == pytest.approx(50 * 0.987)
    r.announced(100, "x-ratelimit-limit-requests")
    assert r.pace().source == "user"
    r.announced(20, "x-ratelimit-limit-requests")
    assert r.pace().source == "header" and r.pace().per_second == pytest.approx(20 * 0.987)
    assert r.pace().detail == "x-ratelimit-limit-requests"


def _send(r: RateController, start: float, seconds: float, rate: float) -> float:
    t = start
    while t < start + seconds:
        r.sent(t)
        t += 1 / rate
    return t


def test_a_429_without_headers_steps_below_what_was_sent_then_climbs_back() -> None:
    r = RateController(user_per_second=None)
    assert r.pace().per_second is None
    now = _send(r, 0.0, 2.0, 100)
    assert r.rate_limited(now, Ticket(now, 1, 0, 0))
    assert r.pace().source == "adaptive"
    assert r.pace().per_second == pytest.approx(70, rel=0.05)
    # A 429 of a request sent before the decrease changes nothing.
    assert not r.rate_limited(now, Ticket(now, 1, 0, 0))
    # CUBIC: concave back towards 100/s in about K seconds, while sending at the pace.
    t = now
    for _ in range(60):
        t = _send(r, t, 0.1, r.pace().per_second or 1)
        r.grow(t)
    assert 95 <= (r.pace().per_second or 0) <= 140


def test_growth_never_passes_twice_the_measured_rate() -> None:
    r = RateController(user_per_second=None)
    now = _send(r, 0.0, 1.0, 100)
    r.rate_limited(now, Ticket(now, 1, 0, 0))
    t = now
    for _ in range(300):  # 30 s with almost nothing sent: the job is idle, not limited
        t += 0.1
        r.sent(t)
        r.grow(t)
        assert (r.pace().per_second or 0) <= max(2 * (r.meter.rate(t) or 0), 70) + 1e-9


def test_after_a_429_under_a_known_limit_the_pace_returns_to_the_ceiling_and_lets_go() -> None:
    r = RateController(user_per_second=None)
    r.announced(100, "x-ratelimit-limit-requests")
    now = _send(r, 0.0, 2.0, 98.7)
    r.rate_limited(now, Ticket(now, 1, 0, 0))
    assert r.pace().per_second == pytest.approx(0.9 * 98.7, rel=0.05)
    t = now
    for _ in range(200):
        t = _send(r, t, 0.1, r.pace().per_second or 1)
        r.grow(t)
    assert r.operating is None and r.pace().source == "header"


def test_a_user_cap_is_never_exceeded() -> None:
    r = RateController(user_per_second=10)
    r.announced(1000, "x")
    now = _send(r, 0.0, 1.0, 10)
    r.rate_limited(now, Ticket(now, 1, 0, 0))
    t = now
    for _ in range(300):
        t = _send(r, t, 0.1, 10)
        r.grow(t)
        assert (r.pace().per_second or 0) <= 10 * 0.987 + 1e-9


def test_two_jobs_sharing_a_limit_converge_to_a_fair_split() -> None:
    """Two controllers, one server at 100/s: whenever together they send more, both see 429s."""
    a, b = RateController(user_per_second=None), RateController(user_per_second=None)
    a.announced(100, "x")
    b.announced(100, "x")
    shares_a: list[float] = []
    t = 0.0
    for step in range(2000):  # 200 s in 0.1 s steps
        ra, rb = a.pace().per_second or 0, b.pace().per_second or 0
        for r, rate in ((a, ra), (b, rb)):
            for i in range(round(rate * 0.1)):
                r.sent(t + i / max(rate, 1))
        t += 0.1
        if ra + rb > 100:
            a.rate_limited(t, Ticket(t, 1, 0, a.epoch))
            b.rate_limited(t, Ticket(t, 1, 0, b.epoch))
        a.grow(t)
        b.grow(t)
        if step >= 1000:
            shares_a.append(ra / (ra + rb))
    mean = sum(shares_a) / len(shares_a)
    assert 0.4 <= mean <= 0.6


# ---- breaker and repeat guard ------------------------------------------------------------


def test_breaker_opens_after_a_streak_and_probes_at_growing_intervals() -> None:
    b = Breaker()
    for i in range(BREAKER_TRIP - 1):
        assert b.failure(0.1 * i, "connect") is None
    assert b.failure(10.0, "connect") == PROBE_FIRST
    assert b.is_open and b.opened == 1
    waits = [b.probe_failed() for _ in range(10)]
    assert waits[0] == PROBE_FIRST * 2 and waits[-1] == PROBE_MAX
    assert waits == sorted(waits)
    assert b.open_for(70.0) == 60.0
    assert b.success() and not b.is_open


def test_with_many_in_flight_the_breaker_wants_a_round_trip_of_failures() -> None:
    """Fast errors arrive in clusters ahead of the answers sent beside them: ten 503s in a row
    among 64 in flight is a flaky server; 64 in a row is one that is down."""
    b = Breaker()
    for _ in range(10):
        assert b.failure(0, "http_503", in_flight=64) is None
    b.success()
    for _ in range(63):
        assert b.failure(0, "http_503", in_flight=64) is None
    assert b.failure(0, "http_503", in_flight=64) == PROBE_FIRST


def test_breaker_streak_is_broken_by_successes_and_other_failures() -> None:
    b = Breaker()
    for _ in range(3):
        b.failure(0, "http_500")
    b.success()
    for _ in range(3):
        b.failure(0, "http_503")
    b.failure(0, "http_400")  # a row's own problem: not an outage
    for _ in range(BREAKER_TRIP - 1):
        assert b.failure(0, "timeout") is None
    assert not b.is_open


@pytest.mark.parametrize(
    ("kind", "outage"),
    [("connect", True), ("http_500", True), ("http_503", True), ("http_529", True), ("timeout", True),
     ("http_501", False), ("http_400", False), ("http_429", False), ("invalid_output", False)],
)  # fmt: skip
def test_outage_kinds(kind: str, outage: bool) -> None:
    assert outage_kind(kind) is outage


def test_repeat_guard_stops_the_same_refusal_early_only_before_any_answer() -> None:
    g = RepeatGuard()
    for i in range(REPEAT_BEFORE_ANY - 1):
        assert not g.failure("http_400", f"HTTP 400: row {i} has a bad parameter")
    assert g.failure("http_400", "HTTP 400: row 99 has a bad parameter")  # numbers do not make it different
    g = RepeatGuard()
    g.success()
    results = [g.failure("http_501", "HTTP 501: Not Implemented") for _ in range(REPEAT_AFTER_SOME)]
    assert results[-1] and not any(results[:-1])
    g = RepeatGuard()
    for i in range(20):
        assert not g.failure("http_400", "HTTP 400: a" if i % 2 else "HTTP 400: b")
