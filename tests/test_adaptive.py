"""The real engine and governor over minutes of simulated traffic, in virtual time (looptime).

Each test states a server (tests/simserver.py) and asserts what it saw: rates,
429s, in-flight counts, queue waits; and what the run wrote. Exact where the
simulation is exact, with margins where the controllers oscillate by design.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import errors
from tests.simserver import SimServer, run_sim


def test_learns_an_announced_per_second_limit_with_no_429s(tmp_path: Path) -> None:
    server = SimServer(latency=0.03, rpm=6000, window="second")
    run = run_sim(server, tmp_path, 3000, concurrency=64)
    assert run.error is None and run.stats.ok == 3000
    assert server.count(429) == 0
    assert server.ok_rate(since=2) >= 0.95 * 100
    assert run.stats.pace_source == "header" and run.stats.pace_rpm == pytest.approx(6000 * 0.987)


def test_a_sliding_minute_window_announced_in_headers_is_never_exceeded(tmp_path: Path) -> None:
    server = SimServer(latency=0.1, rpm=600, window="minute")
    run = run_sim(server, tmp_path, 1200, concurrency=64)
    assert run.error is None and run.stats.ok == 1200
    assert server.count(429) == 0
    assert server.ok_rate(since=10) >= 0.95 * 10


def test_a_low_limit_without_headers_and_slow_answers_is_learned_not_starved(tmp_path: Path) -> None:
    """300/min with answers taking 2 s: the last second often holds no send at all."""
    server = SimServer(latency=2.0, rpm=300, window="minute", headers=False, retry_after=1)
    run = run_sim(server, tmp_path, 600, concurrency=64)
    assert run.error is None and run.stats.ok == 600
    assert run.wall <= 600 / 5 * 1.6  # 120 s at the limit; well under twice that


def test_without_headers_429s_teach_the_rate(tmp_path: Path) -> None:
    # Also the regression test for the pacer's float-dust spin (limits.Pacer._wake_next): it hung here.
    server = SimServer(latency=0.03, rpm=6000, window="second", headers=False)
    run = run_sim(server, tmp_path, 4000, concurrency=64)
    assert run.error is None and run.stats.ok == 4000
    steady_ok, steady_429 = server.count(200, since=10), server.count(429, since=10)
    assert server.ok_rate(since=10) >= 0.85 * 100
    assert steady_429 <= 0.03 * (steady_ok + steady_429)
    assert run.stats.pace_source == "adaptive"


def test_a_user_cap_below_the_server_limit_holds(tmp_path: Path) -> None:
    server = SimServer(latency=0.03, rpm=6000, window="second")
    run = run_sim(server, tmp_path, 1000, concurrency=64, rpm=3000)
    per_second = server.per_second()
    assert max(per_second.values()) <= 50
    assert server.ok_rate(since=1) >= 0.97 * 50
    assert server.count(429) == 0
    assert run.stats.pace_source == "user"


@pytest.mark.parametrize("named", [True, False])
def test_in_flight_limit_is_found_and_held(tmp_path: Path, named: bool) -> None:
    server = SimServer(latency=0.2, max_in_flight=10, named=named, modelslab=True)
    run = run_sim(server, tmp_path, 1500, provider="modelslab", concurrency=64)
    assert run.error is None and run.stats.ok == 1500
    # Never more than a probe above the limit, and the run as fast as one told --concurrency 10.
    assert server.max_in_flight_seen <= 17
    assert server.ok_rate(since=10) >= 0.9 * 10 / 0.2
    late_429, late_ok = server.count(429, since=10), server.count(200, since=10)
    assert late_429 <= (0.01 if named else 0.02) * (late_ok + late_429)
    assert run.stats.concurrency in (9, 10)
    if named:
        assert run.stats.concurrency_named == 10
    # Only the refused row waits: a concurrency 429 never holds everyone.
    assert run.stats.limited_concurrency == server.count(429) and run.stats.limited_rate == 0


def test_a_queueing_server_gets_its_slots_filled_without_a_long_queue(tmp_path: Path) -> None:
    server = SimServer(latency=0.1, slots=32)
    run = run_sim(server, tmp_path, 6000, concurrency=256)
    assert run.error is None and run.stats.ok == 6000
    assert server.ok_rate(since=5) >= 0.9 * 32 / 0.1
    late = server.queue_waits[len(server.queue_waits) // 4 :]
    assert sum(late) / len(late) <= 1.5 * 0.1
    assert 32 <= run.stats.concurrency <= 100


def test_one_slot_server_settles_near_one_in_flight(tmp_path: Path) -> None:
    """The README's serve-local case: one request at a time is all it can do."""
    server = SimServer(latency=1.0, slots=1)
    run = run_sim(server, tmp_path, 60, concurrency=16, timeout=20)
    assert run.error is None and run.stats.ok == 60
    assert run.stats.error_kinds.get("timeout", 0) == 0
    assert server.max_in_flight_seen <= 4
    assert run.wall <= 60 * 1.0 * 1.25  # near the service time: no long queue, no retries


def test_limit_halves_then_recovers(tmp_path: Path) -> None:
    server = SimServer(latency=0.03, rpm=6000, window="second", schedule=[(15, 3000), (35, 6000)])
    run = run_sim(server, tmp_path, 5000, concurrency=64)
    assert run.error is None and run.stats.ok == 5000
    assert server.count(429, since=15, until=20) <= 30
    assert server.count(429, since=20) == 0
    assert server.ok_rate(since=20, until=35) >= 0.9 * 50
    assert server.ok_rate(since=45, until=50) >= 0.9 * 100


def test_server_down_mid_run_holds_and_resumes_without_failing_rows(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, down=(3.0, 40.0))
    run = run_sim(server, tmp_path, 600, concurrency=8, rpm=600)
    assert run.error is None
    assert run.stats.ok == 600 and run.stats.errors == 0
    # Probes at growing intervals, not every row's attempts spent in seconds.
    assert server.refused_connections <= 20
    assert run.stats.breaker_opened == 1
    assert run.output.get_column("attempts").max() <= 2


def test_an_outage_at_full_speed_costs_rows_a_few_attempts_not_all(tmp_path: Path) -> None:
    """No --rpm: refused connections come back in no time and must not burn each row's attempts."""
    server = SimServer(latency=0.05, down=(2.0, 20.0))
    run = run_sim(server, tmp_path, 300, concurrency=8)
    assert run.error is None
    assert run.stats.ok == 300 and run.stats.errors == 0
    assert server.refused_connections <= 40
    assert run.output.get_column("attempts").max() <= 4  # of 6: the trip takes a round trip of failures


def test_an_outage_longer_than_max_wait_stops_the_run(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, down=(2.0, 10_000.0))
    run = run_sim(server, tmp_path, 400, concurrency=8, rpm=600, max_wait=120)
    assert isinstance(run.error, errors.WaitTooLong)
    assert "--max-wait" in str(run.error)
    assert 100 <= run.wall <= 200
    assert server.refused_connections <= 20


def test_the_same_permanent_answer_on_every_row_stops_after_a_few(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, status_always=501)
    run = run_sim(server, tmp_path, 120, concurrency=4)
    assert isinstance(run.error, errors.FatalError)
    assert "same answer" in str(run.error)
    assert len(server.answers) <= 5 + 4


def test_a_retry_after_beyond_max_wait_stops_instead_of_sleeping(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, rpm=60, window="minute", retry_after=3 * 3600)
    run = run_sim(server, tmp_path, 200, concurrency=4, rpm=6000, adapt=False)
    assert isinstance(run.error, errors.WaitTooLong)
    assert "--max-wait" in str(run.error) and "Run the same command again" in str(run.error)
    assert run.wall < 120


def test_no_adapt_behaves_as_before(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, rpm=6000, window="second")
    run = run_sim(server, tmp_path, 500, concurrency=8, adapt=False)
    assert run.stats.ok == 500
    assert server.max_in_flight_seen == 8  # the fixed number, from the first second
    assert run.stats.pace_rpm is None  # headers are not read


def test_a_daily_limit_used_up_stops_after_saving_the_last_answer(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, daily_limit=50)
    run = run_sim(server, tmp_path, 200, concurrency=4)
    assert isinstance(run.error, errors.WaitTooLong)
    assert "Run the same command again after about" in str(run.error)
    # Whichever came first (the answer saying "0 left", or a 429 asking for 5 hours), the
    # requests already in flight are let back and saved: answered is never lost.
    assert run.stats.ok == 50
    assert len(server.answers) <= 50 + 4


def test_a_daily_limit_used_up_by_the_last_row_is_not_a_failure(tmp_path: Path) -> None:
    server = SimServer(latency=0.05, daily_limit=100)
    run = run_sim(server, tmp_path, 100, concurrency=4)
    assert run.error is None
    assert run.stats.ok == 100 and run.output.height == 100
