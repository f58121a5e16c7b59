"""Ctrl-C on a real `pipeline run` process: the requests in flight come back within a short grace
and are saved, so the re-run does not pay for them again; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import base_args, chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer
from tests.test_resume import journal_lines

ROWS = 40


def job(server: FakeLLMServer) -> list[str]:
    # A fixed 4 in flight (--no-adapt): adaptive concurrency would start at 1.
    return [*base_args(server), "--concurrency", "4", "--no-adapt", "--batch-size", "10"]


def wait_for_requests(server: FakeLLMServer, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(chat_requests(server)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "too few requests reached the server in time"
        time.sleep(0.05)


def read_until(proc: subprocess.Popen[str], needle: str, limit: float = 60.0) -> str:
    """What the process wrote to stderr until `needle` appeared (read from the pipe as it comes)."""
    assert proc.stderr is not None
    fd, seen, deadline = proc.stderr.fileno(), b"", time.monotonic() + limit
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not said in time; said: {seen.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"stderr closed before {needle!r}; said: {seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode()


def test_ctrl_c_lets_the_requests_in_flight_come_back_and_the_rerun_does_not_pay_for_them() -> None:
    write_table("in.csv", texts(ROWS))
    with FakeLLMServer(latency=1.5) as server:  # slow replies: a Ctrl-C lands with requests on the wire
        proc = spawn(*job(server))
        wait_for_requests(server, 4, proc)
        proc.send_signal(signal.SIGINT)
        said = read_until(proc, "in flight to come back")
        _, rest = proc.communicate(timeout=60)
        said += rest
        first = {r.content for r in chat_requests(server)}
        assert proc.returncode == 130, said
        assert "waiting up to 5 s for the" in said and "Ctrl-C again to stop at once" in said
        assert "did not come back" not in said
        assert "pipeline: interrupted." in said
        # Every request the server received came back and was saved: the checkpoint holds them all.
        assert 4 <= len(first) < ROWS
        assert len(journal_lines(Path("out/result.checkpoint"))) == len(first)

        server.reset()
        server.latency = 0.0
        again = run_cli(*job(server))
        second = [r.content for r in chat_requests(server)]
    assert again.exit_code == 0, again.output
    assert not first & set(second), "answers received before the Ctrl-C were paid for again"
    assert len(second) == ROWS - len(first) and len(set(second)) == len(second)
    assert f"{len(first)} ok from the checkpoint" in again.output


def press_ctrl_c(proc: subprocess.Popen[str], presses: int) -> tuple[str, str, float]:
    """Ctrl-C once, then (presses == 2) again as soon as the wind-down is said; returns what the process
    wrote to stdout and stderr, and how long it took to end after the first press was acknowledged."""
    proc.send_signal(signal.SIGINT)
    said = read_until(proc, "in flight to come back")
    started = time.monotonic()
    if presses == 2:
        proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    return out, said + rest, time.monotonic() - started


@pytest.mark.parametrize("presses", [1, 2])
def test_replies_that_do_not_come_back_are_waited_for_a_few_seconds_or_not_at_all(presses: int) -> None:
    write_table("in.csv", texts(ROWS))
    with FakeLLMServer(latency=120.0) as server:  # replies that will not come in time
        proc = spawn(*job(server))
        wait_for_requests(server, 4, proc)
        _, said, waited = press_ctrl_c(proc, presses)
    assert proc.returncode == 130, said
    assert "pipeline: interrupted." in said and "Run the same command again to resume" in said
    assert journal_lines(Path("out/result.checkpoint")) == []  # nothing came back, nothing is kept
    if presses == 1:
        assert "4 requests did not come back in 5 s; the next run sends them again" in said
        assert waited >= 4.5  # the grace was given (its length is said on screen)
    else:
        assert "did not come back" not in said  # the second Ctrl-C did not wait for the grace
