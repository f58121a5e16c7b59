"""Pacers, the gate and the hold, on a virtual clock (looptime): exact times, no sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import looptime
import pytest

from pipeline.limits.buckets import Gate, Hold, request_pacer, token_pacer


def virtual(main: Coroutine[Any, Any, Any]) -> Any:
    loop = looptime.new_event_loop(start=0.0)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


def test_request_pacer_never_lets_a_second_hold_more_than_its_limit() -> None:
    async def main() -> list[float]:
        pacer = request_pacer(100 * 0.987)
        times = []
        for _ in range(1000):
            await pacer.acquire()
            times.append(asyncio.get_running_loop().time())
        return times

    times = virtual(main())
    assert times[-1] == pytest.approx(999 / 98.7, rel=0.01)
    for i, t in enumerate(times):  # any one-second window starting at a send
        assert sum(1 for u in times[i : i + 200] if u < t + 1.0) <= 100


def test_changing_the_rate_keeps_what_was_just_sent() -> None:
    """A lower rate applies at once to the waiters, and the level is not forgotten (no burst)."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        pacer = request_pacer(100)
        for _ in range(50):
            await pacer.acquire()
        half = loop.time()
        pacer.set_rate(10)
        for _ in range(10):
            await pacer.acquire()
        return half, loop.time()

    half, end = virtual(main())
    assert 0.48 <= half <= 0.5
    assert end - half == pytest.approx(1.0, abs=0.1)  # ten at 10/s, not one instant burst


def test_token_pacer_charges_big_requests_in_chunks() -> None:
    async def main() -> float:
        pacer = token_pacer(100)  # 100 tokens a second, a second's worth in the bucket
        for _ in range(3):
            await pacer.take(250)
        return asyncio.get_running_loop().time()

    assert virtual(main()) == pytest.approx(6.5, abs=0.05)  # 750 tokens, the first 100 banked


def test_gate_follows_its_limit_both_ways() -> None:
    async def main() -> list[int]:
        gate = Gate(2)
        seen = []

        async def one() -> None:
            await gate.acquire()
            seen.append(gate.held)
            await asyncio.sleep(1)
            gate.release()

        tasks = [asyncio.create_task(one()) for _ in range(8)]
        await asyncio.sleep(0.5)
        assert gate.held == 2
        gate.set_limit(4)  # waiters go at once
        await asyncio.sleep(0)
        assert gate.held == 4
        gate.set_limit(1)  # nobody new until the count is below 1
        gate.cap(None)
        await asyncio.gather(*tasks)
        return seen

    seen = virtual(main())
    assert max(seen) == 4 and len(seen) == 8


def test_gate_cap_lets_one_probe_through() -> None:
    async def main() -> int:
        gate = Gate(10)
        gate.cap(1)
        await gate.acquire()
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(1)
        assert not waiting.done()
        gate.cap(None)
        await asyncio.sleep(0)
        assert waiting.done()
        return gate.held

    assert virtual(main()) == 2


def test_hold_reopens_on_its_timer_and_shut_is_for_good() -> None:
    async def main() -> float:
        hold = Hold()
        assert hold.close_for(5)
        assert not hold.close_for(2)  # a shorter hold does not cut a longer one
        await hold.wait()
        t = asyncio.get_running_loop().time()
        hold.shut()
        assert not hold.close_for(10)
        waiter = asyncio.create_task(hold.wait())
        await asyncio.sleep(3600)
        assert not waiter.done()
        waiter.cancel()
        return t

    assert virtual(main()) == pytest.approx(5.0)


def test_a_pacer_learned_mid_run_starts_full() -> None:
    """What went out before the limit was known already counts at the server: no burst on top."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        empty, full = token_pacer(100), token_pacer(100, full=True)
        await empty.take(100)  # a second's worth banked: at once
        t_empty = loop.time()
        await full.take(100)  # must be earned first
        return t_empty, loop.time() - t_empty

    t_empty, t_full = virtual(main())
    assert t_empty == 0.0 and t_full == pytest.approx(1.0, abs=0.01)


def test_a_token_limit_that_drops_while_a_big_request_waits_still_lets_it_through() -> None:
    """The waiter asked for a chunk sized to the old bucket; the new one must still hold it."""

    async def main() -> float:
        pacer = token_pacer(20_000 * 0.987 / 60, full=True)
        waiting = asyncio.create_task(pacer.take(270))
        await asyncio.sleep(0.01)
        pacer.set_rate(10_000 * 0.987 / 60)
        await asyncio.wait_for(waiting, 60)
        return asyncio.get_running_loop().time()

    assert virtual(main()) < 5
