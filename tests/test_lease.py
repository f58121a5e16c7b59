"""The shared budgets' pure parts, on an explicit clock: send times handed out in leases, how the
rate recovers after 429s, the clock offset, requests in flight shared by demand, and the engine's side."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.limits.learn import HEADROOM
from pipeline.limits.lease import GRACE, HORIZON, ClockSync, Lease, LeaseClient, SlotBudget
from pipeline.limits.share import FlightShare, SpendClient


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
        slots += lease.slots
        waits[who] = now + 0.001  # the actor comes back at once for more
    return sorted(s for s in slots if s < seconds)


def per_second(times: list[float], seconds: int) -> list[int]:
    return [sum(1 for s in times if k <= s < k + 1) for k in range(seconds)]


def test_no_limit_known_means_no_leasing() -> None:
    lease, wait = SlotBudget().grant(0.0, 64, 10)
    assert lease is not None and not lease.limited and wait == 0


def test_slots_are_one_even_pace_for_every_actor() -> None:
    budget = SlotBudget(user_rpm=6000)
    slots = drain(budget, 10.0, want=64)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) == pytest.approx(1 / (100 * HEADROOM))
    counts = per_second(slots, 10)
    assert max(counts) <= 100 and min(counts[1:]) >= 98


def test_the_first_second_never_gets_more_than_the_per_second_share() -> None:
    """A start burst: however many actors ask at once at the start, the first second is paced too."""
    for actors in (1, 4, 16):
        slots = drain(SlotBudget(user_rpm=6000), 1.0, want=1000, actors=actors)
        assert len(slots) <= 100


def test_a_lease_reaches_at_most_the_horizon_ahead() -> None:
    budget = SlotBudget(user_rpm=60_000)  # 1,000 a second
    lease, _ = budget.grant(5.0, 1000, 1)
    assert lease is not None and lease.slots[0] == 5.0 and lease.slots[-1] <= 5.0 + HORIZON
    assert len(lease.slots) <= 1 + HORIZON * 1000
    again, wait = budget.grant(5.0, 1000, 1)
    assert again is None and wait == pytest.approx(lease.slots[-1] - 5.0 + 1 / (1000 * HEADROOM) - HORIZON)


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
    counts = per_second(slots, 10)[1:]
    assert all(n <= 10 for n in counts) and sum(counts) >= 9 * 10 * HEADROOM - 2


def test_a_429_cuts_the_pace_below_what_was_sent_once_per_event() -> None:
    budget = SlotBudget()
    for t in range(20):
        budget.measured(t / 10, 20)  # 200 a second, unpaced
    assert budget.rate_limited(2.0, budget.epoch, None)
    assert budget.rate() == pytest.approx(200 * 0.7, rel=0.05)
    first = budget.rate()
    # A burst of 429s of requests sent before the cut (the old epoch): the same event, no second cut.
    for _ in range(50):
        assert not budget.rate_limited(2.1, 0, None)
    assert budget.rate() == first and budget.epoch == 1


def test_429s_within_the_servers_stated_wait_after_a_cut_are_the_same_event() -> None:
    budget = SlotBudget(user_rpm=6000)
    assert budget.rate_limited(10.0, 0, 0.5)
    assert not budget.rate_limited(10.3, 1, 0.5)  # leased after the cut, but the window the server named is still full
    assert budget.rate_limited(10.6, 1, 0.5)  # a new event: cut again
    assert budget.epoch == 2


def test_the_pace_climbs_back_to_the_ceiling_within_seconds() -> None:
    """After one cut under --rpm 6000 the pace is back at the ceiling in under 5 s (CUBIC, as the local
    engine's), not 5% every 2 s (which took 40 s)."""
    budget = SlotBudget(user_rpm=6000)
    ceiling = 100 * HEADROOM
    drain(budget, 2.0, want=64)  # sending at the ceiling: the measured rate is known
    budget.rate_limited(2.0, budget.epoch, None)
    assert budget.rate() == pytest.approx(0.7 * ceiling, rel=0.02)
    now, rates = 2.0, []
    while now < 12.0:  # the actors keep using every slot, so the measured rate follows the pace
        lease, wait = budget.grant(now, 64, 1)
        now += wait if lease is None else 0.001
        rates.append((now, budget.rate()))
    back = next(t for t, r in rates if r is not None and r >= ceiling * 0.999)
    assert back - 2.0 < 5.0, back
    assert budget.operating is None and budget.source() == "user"  # at the ceiling the adaptive pace is dropped
    assert all(r is not None and r <= ceiling + 1e-9 for _, r in rates)


def test_an_idle_cluster_does_not_bank_a_rate_it_never_sent() -> None:
    budget = SlotBudget()
    for t in range(20):
        budget.measured(t / 10, 2)  # 20 a second
    budget.rate_limited(2.0, 0, None)
    budget.measured(3.0, 5)
    budget.tick(60.0)  # a minute later, having sent almost nothing
    assert budget.rate() is not None and budget.rate() <= 20  # type: ignore[operator]


def test_retry_after_holds_every_actor() -> None:
    budget = SlotBudget(user_rpm=600)
    budget.rate_limited(10.0, 0, 3.0)
    lease, wait = budget.grant(10.5, 5, 1)
    assert lease is None and wait == pytest.approx(2.5)
    lease, _ = budget.grant(13.0, 5, 1)
    assert lease is not None and lease.slots[0] == 13.0


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
@given(per_sec=st.integers(1, 1000), actors=st.integers(1, 8), want=st.integers(1, 128))
def test_no_second_ever_gets_more_than_the_limit(per_sec: int, actors: int, want: int) -> None:
    """Whatever the limit (a whole number a second, as a server counting per second enforces it), the
    actors and the lease sizes: sent at their slot times, no wall-clock second sees more than the limit."""
    slots = drain(SlotBudget(user_rpm=per_sec * 60), 5.0, want=want, actors=actors)
    assert max(per_second(slots, 5)) <= per_sec


class PerSecondServer:
    """A server that admits `limit` requests a wall-clock second and answers 30 ms after each arrives;
    a refusal says Retry-After: 1, as tests/fakeserver.py does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arrivals: list[tuple[float, int]] = []  # (time, epoch), a heap
        self.counts: dict[int, int] = {}
        self.ok: list[float] = []
        self.refused: list[float] = []

    def send(self, at: float, epoch: int) -> None:
        heapq.heappush(self.arrivals, (at, epoch))

    def answer_until(self, now: float, budget: SlotBudget) -> None:
        """Answer, in arrival order, what has arrived 30 ms before `now`; refusals go to the budget."""
        while self.arrivals and self.arrivals[0][0] + 0.03 <= now:
            at, epoch = heapq.heappop(self.arrivals)
            self.counts[int(at)] = self.counts.get(int(at), 0) + 1
            if self.counts[int(at)] > self.limit:
                self.refused.append(at)
                budget.rate_limited(at + 0.03, epoch, 1.0)
            else:
                self.ok.append(at)


def test_a_server_counting_per_second_gets_its_limit_and_no_429s_after_an_early_burst() -> None:
    """The whole loop on one clock: 4 actors lease and send each slot up to GRACE late to a server
    admitting 100 a wall-clock second. A burst of 60 unpaced requests at the start earns 429s; they
    and those of requests leased before the cut make one cut, and from 5 s on the server gets at
    least 97% of its limit, with no 429 at all."""
    rng = random.Random(7)
    budget, server = SlotBudget(user_rpm=6000), PerSecondServer(100)
    for i in range(60):
        server.send(0.2 + i * 0.002, 0)
    now, waits = 0.0, [0.0] * 4
    while now < 20.0:
        who = min(range(4), key=lambda i: waits[i])
        now = max(now, waits[who])
        server.answer_until(now, budget)
        lease, wait = budget.grant(now, 64, 1)
        if lease is None:
            waits[who] = now + wait
            continue
        for t in lease.slots:
            server.send(t + rng.uniform(0, GRACE), lease.epoch)
        waits[who] = now + 0.001
    assert budget.epoch == 1, "the early 429s cut the pace more than once"
    assert not [t for t in server.refused if t >= 1.0]
    span = per_second(server.ok, 19)[5:]
    assert sum(span) / len(span) >= 97, span


def test_the_clock_offset_comes_from_the_quickest_round_trip() -> None:
    sync = ClockSync()
    # The coordinator's clock runs 100 s ahead; calls take 1-20 ms each way, and some wait there.
    rng = random.Random(1)
    t = 0.0
    for _ in range(40):
        out, back, waited = rng.uniform(0.001, 0.02), rng.uniform(0.001, 0.02), rng.uniform(0, 0.05)
        received = t + out + 100.0
        sync.sample(t, received, received + waited, t + out + waited + back)
        t += 0.1
    assert sync.offset == pytest.approx(100.0, abs=0.005)
    assert sync.local(150.0) == pytest.approx(50.0, abs=0.005)


def test_the_client_waits_for_each_slot_and_asks_once_at_a_time() -> None:
    calls = []

    async def call(want: int, tokens_each: float) -> Lease:
        calls.append(want)
        await asyncio.sleep(0.01)
        now = time.monotonic()
        return Lease([now + i * 0.005 for i in range(5)], tokens=tokens_each * 5, received=now, granted=now)

    async def main() -> list[float]:
        client = LeaseClient(call, want=5)
        sent: list[float] = []

        async def one() -> None:
            assert await client.take(10) is not None
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
            now = time.monotonic()
            lease = Lease([now - 2 * GRACE, now - 2 * GRACE, now], tokens=tokens_each * 3, received=now, granted=now)
            leases.append(lease)
            return lease

        client = LeaseClient(call)
        assert await client.take(1) is not None
        assert await client.take(1) is not None  # the two stale slots were dropped: a second lease
        return len(leases)

    assert asyncio.run(main()) == 2


def test_each_request_goes_under_the_epoch_of_its_lease() -> None:
    async def main() -> list[int | None]:
        epochs = iter([3, 4])

        async def call(want: int, tokens_each: float) -> Lease:
            now = time.monotonic()
            return Lease([now, now], tokens=tokens_each * 2, epoch=next(epochs), received=now, granted=now)

        client = LeaseClient(call, want=2)
        return [await client.take(1) for _ in range(4)]

    assert asyncio.run(main()) == [3, 3, 4, 4]


def test_the_client_stops_when_the_coordinator_says_so() -> None:
    async def call(want: int, tokens_each: float) -> Lease:
        return Lease([], stopped="bad key")

    async def main() -> tuple[int | None, str | None]:
        client = LeaseClient(call)
        return await client.take(1), client.stopped

    assert asyncio.run(main()) == (None, "bad key")


# ---- requests in flight, shared --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from("rsaw"), st.integers(0, 80)), max_size=300))
def test_the_cluster_never_has_more_than_the_total_in_flight(steps: list[tuple[int, str, int]]) -> None:
    """Four engines report (and apply the grant they get), send up to their limit, get answers and change
    what they want, in any order: the sum of what they have in flight never passes the total."""
    share = FlightShare(64)
    engines = [{"applied": 0, "in_flight": 0, "wants": 0} for _ in range(4)]
    for now, (who, action, n) in enumerate(steps):
        e = engines[who]
        if action == "r":
            e["applied"] = share.report(
                float(now) / 10, str(who), in_flight=e["in_flight"], applied=e["applied"], wants=e["wants"]
            )
        elif action == "s":
            e["in_flight"] = max(e["in_flight"], min(e["applied"], e["wants"], e["in_flight"] + n))
        elif action == "a":
            e["in_flight"] = max(0, e["in_flight"] - n)
        else:
            e["wants"] = n
        assert sum(x["in_flight"] for x in engines) <= 64


def test_an_engine_that_runs_out_of_work_hands_its_share_on() -> None:
    share = FlightShare(64)
    a = share.report(0.0, "a", in_flight=0, applied=0, wants=500)
    assert a == 64  # alone: all of it
    b = share.report(0.1, "b", in_flight=0, applied=0, wants=500)
    assert b == 0  # a may still have 64 out
    a = share.report(0.2, "a", in_flight=64, applied=64, wants=500)
    assert a == 32
    b = share.report(0.3, "b", in_flight=0, applied=0, wants=500)
    assert b == 0  # a has not come back below its new share yet
    a = share.report(0.4, "a", in_flight=32, applied=32, wants=500)
    b = share.report(0.5, "b", in_flight=0, applied=0, wants=500)
    assert (a, b) == (32, 32)
    # a's blocks are done: its share goes to b as soon as a says so and b asks.
    assert share.report(0.6, "a", in_flight=0, applied=32, wants=0) == 0
    assert share.report(0.7, "b", in_flight=32, applied=32, wants=500) == 32  # a may still apply 32 until it reports
    share.report(0.8, "a", in_flight=0, applied=0, wants=0)
    assert share.report(0.9, "b", in_flight=32, applied=32, wants=500) == 64


def test_demand_below_a_fair_share_leaves_the_rest_to_the_others() -> None:
    share = FlightShare(64)
    for t, name, wants in ((0.0, "a", 10), (0.1, "b", 500), (0.2, "c", 500)):
        share.report(t, name, in_flight=0, applied=0, wants=wants)
    grants = {n: share.report(1.0 + i, n, in_flight=0, applied=g, wants=w)
              for i, (n, g, w) in enumerate((("a", 10, 10), ("b", 0, 500), ("c", 0, 500)))}  # fmt: skip
    assert grants["a"] == 10 and grants["b"] + grants["c"] <= 54 and grants["b"] >= 27


def test_a_silent_engine_is_forgotten_and_a_named_limit_is_the_clusters() -> None:
    share = FlightShare(64)
    share.report(0.0, "dead", in_flight=40, applied=64, wants=500)
    assert share.report(1.0, "b", in_flight=0, applied=0, wants=500) == 0
    assert share.report(10.0, "b", in_flight=0, applied=0, wants=500) == 64  # "dead" has not reported for 9 s
    share.named(10)
    assert share.report(10.5, "b", in_flight=0, applied=64, wants=500) == 10


def test_the_spend_client_sends_settlements_in_batches_one_call_at_a_time() -> None:
    async def main() -> tuple[list[int], list[int]]:
        reserved: list[int] = []
        batches: list[int] = []

        async def reserve(held: tuple[int, int], settles: list[tuple[tuple[int, int], int, int]]) -> bool:
            reserved.append(len(settles))
            return held[0] < 100

        async def settle(settles: list[tuple[tuple[int, int], int, int]]) -> None:
            batches.append(len(settles))
            await asyncio.sleep(0.01)

        client = SpendClient(reserve, settle)
        assert await client.reserve((10, 10)) and not await client.reserve((200, 10))
        client.settle((10, 10), 5, 5)
        await asyncio.sleep(0.001)  # its flush is on its way
        for _ in range(9):
            client.settle((10, 10), 5, 5)
        await client.flushed()
        return reserved, batches

    reserved, batches = asyncio.run(main())
    assert reserved == [0, 0] and batches == [1, 9]  # the first settlement went at once, the rest waited for it
