"""Crash safety with real processes: SIGKILL mid-run, SIGTERM mid-run, then resume."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from pipeline.limits.spend import money
from tests.conftest import chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer

ROWS = 300


def journal_lines(folder: Path) -> list[bytes]:
    return [line for j in sorted(folder.glob("journal-*.jsonl")) for line in j.read_bytes().splitlines()]


def wait_for_answers(folder: Path, at_least: int, proc: object, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while len(journal_lines(folder)) < at_least:
        assert proc.poll() is None, proc.communicate()  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the run recorded too few answers in time"
        time.sleep(0.05)


def job_args(server: FakeLLMServer) -> list[str]:
    return [
        "run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "Summarise: {text}", "--base-url", f"{server.url}/v1",
        "--model", "fake-model", "--concurrency", "8", "--batch-size", "50", "--no-progress",
    ]  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_run_resumes_without_sending_answered_rows_again(sig: signal.Signals) -> None:
    with FakeLLMServer(latency=0.05) as server:  # ~160 rows/s: the kill lands well before the end even on a busy machine
        write_table("in.csv", texts(ROWS))
        proc = spawn(*job_args(server))
        wait_for_answers(Path("out/result.checkpoint"), 60, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 130, stderr
            assert "Run the same command again to resume" in stderr
        assert not Path("out/result.parquet").exists()  # no half-written output
        answered_before = len(journal_lines(Path("out/result.checkpoint")))
        assert 60 <= answered_before < ROWS
        first_run = Counter(r.content for r in chat_requests(server))

        server.reset()
        result = run_cli(*job_args(server))
        assert result.exit_code == 0, result.output
        second_run = Counter(r.content for r in chat_requests(server))

    out = pl.read_parquet("out/result.parquet")
    assert out["id"].to_list() == list(range(ROWS))  # every row exactly once, in order
    assert set(out["status"]) == {"ok"}
    # Rows answered before the kill were not sent again; only those in flight at the kill were.
    resent = set(first_run) & set(second_run)
    assert len(resent) <= 8, f"{len(resent)} rows sent twice; at most the 8 in flight may be"
    assert len(second_run) == ROWS - answered_before
    assert f"{answered_before} ok from the checkpoint" in result.output
    assert all(n == 1 for n in second_run.values())


def test_killed_run_under_a_ceiling_resumes_and_each_run_keeps_its_own_ceiling() -> None:
    """SIGKILL mid-run with --max-cost, a re-run whose ceiling stops it, then one that finishes:
    each run's spend at the server stays under its own ceiling, and no answered row is paid twice."""
    prices = ["--price-in", "1", "--price-out", "2", "--max-tokens", "20"]  # ~$0.000032 a request

    def billed(server: FakeLLMServer) -> float:
        s = server.stats()
        return s.get("billed_prompt_tokens", 0) * 1e-6 + s.get("billed_completion_tokens", 0) * 2e-6

    with FakeLLMServer(latency=0.05) as server:
        write_table("in.csv", texts(ROWS))
        proc = spawn(*job_args(server), *prices, "--max-cost", "1")
        wait_for_answers(Path("out/result.checkpoint"), 60, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        answered_first = len(journal_lines(Path("out/result.checkpoint")))
        first_run = Counter(r.content for r in chat_requests(server))
        assert 60 <= answered_first < ROWS - 100

        server.reset()  # a ceiling for about 50 of the remaining rows
        second = run_cli(*job_args(server), *prices, "--max-cost", "0.0016")
        assert second.exit_code == 5, second.output  # spend_ceiling
        assert billed(server) <= 0.0016
        second_run = Counter(r.content for r in chat_requests(server))
        assert len(set(first_run) & set(second_run)) <= 8  # at most what was in flight at the kill
        assert f"{answered_first} ok from the checkpoint" in second.output
        out = pl.read_parquet("out/result.parquet")
        assert out["id"].to_list() == list(range(ROWS))
        unsent = out.filter(pl.col("error").str.starts_with("not sent: spend ceiling reached"))
        assert unsent.height > 0 and out.filter(pl.col("status") == "ok").height + unsent.height == ROWS

        server.reset()
        third = run_cli(*job_args(server), *prices, "--max-cost", "1")
        assert third.exit_code == 0, third.output
        third_run = Counter(r.content for r in chat_requests(server))
        assert sorted(third_run) == sorted(f"Summarise: {t}" for t in unsent["text"].to_list())  # only the unsent
        assert all(n == 1 for n in third_run.values())
    final = pl.read_parquet("out/result.parquet")
    assert final["id"].to_list() == list(range(ROWS)) and set(final["status"]) == {"ok"}
    # Across runs: what the answers kept in the output record is what "on this output in all runs" says.
    total = int(final["prompt_tokens"].sum()) * 1e-6 + int(final["completion_tokens"].sum()) * 2e-6
    assert f"{money(total)} on this output in all runs" in third.output
