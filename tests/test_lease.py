"""The shared rate budget's pure parts: send times handed out in leases, and the engine's side of it."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.limits.learn import HEADROOM
from pipeline.limits.lease import GRACE, HORIZON, Lease, LeaseClient, SlotBudget


def drain(budget: SlotBudget, seconds: float, want: int, actors: int = 4, tokens: float = 1.0) -> list[float]:
    """Every slot handed out over `seconds` to `actors` asking in turn, each as soon as it may."""
    now, slots = 0.0, []
    waits = [0.0] * actors
    while now < seconds:
        who = min(range(actors), key=lambda i: waits[i])
        now = max(now, waits[who])
        lease, wait = budget.grant(now, want, tokens)
        if lease is None:
            waits[who] = now + wait
            continue
        slots += [now + offset for offset in lease.slots]  # offsets from the grant
        waits[who] = now + 0.001  # the actor comes back at once for more
    return sorted(s for s in slots if s < seconds)


def test_no_limit_known_means_no_leasing() -> None:
    lease, wait = SlotBudget().grant(0.0, 64, 10)
    assert lease is not None and not lease.limited and wait == 0


def test_slots_are_one_even_pace_for_every_actor() -> None:
    budget = SlotBudget(user_rpm=6000)
    slots = drain(budget, 10.0, want=64)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) == pytest.approx(1 / (100 * HEADROOM))
    per_second = [sum(1 for s in slots if k <= s < k + 1) for k in range(10)]
    assert max(per_second) <= 100 and min(per_second[1:]) >= 98


def test_a_lease_reaches_at_most_the_horizon_ahead() -> None:
    budget = SlotBudget(user_rpm=60_000)  # 1,000 a second
    lease, _ = budget.grant(5.0, 1000, 1)
    assert lease is not None and lease.slots[0] == 0 and lease.slots[-1] <= HORIZON  # seconds after the grant
    assert len(lease.slots) <= 1 + HORIZON * 1000
    again, wait = budget.grant(5.0, 1000, 1)
    assert again is None and wait == pytest.approx(lease.slots[-1] + 1 / (1000 * HEADROOM) - HORIZON)


def test_a_request_larger_than_a_seconds_tokens_still_goes_at_the_average_pace() -> None:
    """--tpm 10,000 with requests of 300 tokens (more than the 164 a second allows): each waits for a full
    bank instead of waiting forever."""
    budget = SlotBudget(user_tpm=10_000)
    slots = drain(budget, 30.0, want=64, tokens=300)
    per_minute = len(slots) * 300 * 2  # 30 s
    assert 0.9 * 10_000 * HEADROOM <= per_minute <= 10_000


def test_tokens_per_minute_bound_the_slots() -> None:
    budget = SlotBudget(user_tpm=60_000)  # 1,000 tokens a second, 100 per request
    slots = drain(budget, 10.0, want=64, tokens=100)
    per_second = [sum(1 for s in slots if k <= s < k + 1) for k in range(1, 10)]
    assert all(n <= 10 for n in per_second) and sum(per_second) >= 9 * 10 * HEADROOM - 2


def test_a_429_drops_the_pace_below_what_was_sent_and_quiet_raises_it() -> None:
    budget = SlotBudget()
    budget.measured(0.0, 0)
    for t in range(20):
        budget.measured(t / 10, 20)  # 200 a second, unpaced
    budget.rate_limited(2.0, None)
    assert budget.rate() == pytest.approx(200 * 0.7, rel=0.05)
    first = budget.rate()
    budget.rate_limited(2.5, None)  # the same episode: no second cut
    assert budget.rate() == first
    budget.tick(5.0)
    assert budget.rate() is not None and budget.rate() > first  # type: ignore[operator]


def test_retry_after_holds_every_actor() -> None:
    budget = SlotBudget(user_rpm=600)
    budget.rate_limited(10.0, 3.0)
    lease, wait = budget.grant(10.5, 5, 1)
    assert lease is None and wait == pytest.approx(2.5)
    lease, _ = budget.grant(13.0, 5, 1)
    assert lease is not None and lease.slots[0] == 0


def test_header_limits_are_learned_and_the_user_cap_still_holds() -> None:
    budget = SlotBudget(user_rpm=3000)
    budget.announced(100.0, None)  # the server allows 6,000/min: the user's 3,000 is lower
    assert budget.rate() == pytest.approx(50 * HEADROOM)
    budget.announced(20.0, None)
    assert budget.rate() == pytest.approx(20 * HEADROOM) and budget.source() == "header"
    fixed = SlotBudget(user_rpm=3000, adapt=False)
    fixed.announced(20.0, None)
    assert fixed.rate() == pytest.approx(50 * HEADROOM) and fixed.source() == "user"


def test_a_stop_reaches_whoever_asks_next() -> None:
    budget = SlotBudget(user_rpm=600)
    budget.stopped = "the server answered 401"
    lease, _ = budget.grant(0.0, 5, 1)
    assert lease is not None and lease.stopped == "the server answered 401" and lease.slots == []


@settings(max_examples=50, deadline=None)
@given(per_second=st.integers(1, 1000), actors=st.integers(1, 8), want=st.integers(1, 128))
def test_no_second_ever_gets_more_than_the_limit(per_second: int, actors: int, want: int) -> None:
    """Whatever the limit (a whole number a second, as a server counting per second enforces it), the
    actors and the lease sizes: sent at their slot times, no wall-clock second sees more than the limit."""
    slots = drain(SlotBudget(user_rpm=per_second * 60), 5.0, want=want, actors=actors)
    limit = per_second
    for k in range(5):
        assert sum(1 for s in slots if k <= s < k + 1) <= limit


def test_the_client_waits_for_each_slot_and_asks_once_at_a_time() -> None:
    calls = []

    async def call(want: int, tokens_each: float) -> Lease:
        calls.append(want)
        await asyncio.sleep(0.01)
        return Lease([i * 0.005 for i in range(5)], tokens=tokens_each * 5)

    async def main() -> list[float]:
        client = LeaseClient(call, want=5)
        sent: list[float] = []

        async def one() -> None:
            assert await client.take(10)
            sent.append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(20)))
        return sent

    sent = sorted(asyncio.run(main()))
    assert len(calls) == 4  # 20 requests, 5 slots a lease, one call at a time
    assert sent[-1] - sent[0] >= 3 * 0.01  # each lease waited for; nobody went early


def test_slots_too_old_to_use_are_dropped() -> None:
    async def main() -> int:
        leases = []

        async def call(want: int, tokens_each: float) -> Lease:
            lease = Lease([-2 * GRACE, -2 * GRACE, 0.0], tokens=tokens_each * 3)
            leases.append(lease)
            return lease

        client = LeaseClient(call)
        assert await client.take(1)
        assert await client.take(1)  # the two stale slots were dropped: a second lease
        return len(leases)

    assert asyncio.run(main()) == 2


def test_the_client_stops_when_the_coordinator_says_so() -> None:
    async def call(want: int, tokens_each: float) -> Lease:
        return Lease([], stopped="bad key")

    async def main() -> tuple[bool, str | None]:
        client = LeaseClient(call)
        return await client.take(1), client.stopped

    assert asyncio.run(main()) == (False, "bad key")
