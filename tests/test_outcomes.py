"""Failing loudly and precisely: each way a run ends has its own exit code, its word in the metrics
file and its exception in the Python API; a server that fails every request stops within --max-wait;
and the smaller ways out (a key given as --api-key-env, a closed stdout, a refused re-run) say what
happened without a traceback or a stale file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.observe.progress import Progress
from pipeline.observe.stats import RunStats
from pipeline.outcomes import EXCEPTIONS, EXIT_CODES, MEANINGS
from tests.conftest import ROOT, base_args, chat_requests, run_cli, run_in_terminal, texts, write_table
from tests.fakeserver import FakeLLMServer

METRICS = Path("out/result.metrics.json")


def outcome_of_file() -> tuple[str, int]:
    run = json.loads(METRICS.read_text())["run"]
    return run["outcome"], run["exit_code"]


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_table_gives_every_outcome_a_code_a_meaning_and_an_exception() -> None:
    for outcome, code in EXIT_CODES.items():
        assert code in MEANINGS, outcome
        if outcome not in ("completed", "empty_input", "interrupted"):
            assert outcome in EXCEPTIONS, outcome
    for outcome, cls in EXCEPTIONS.items():
        if issubclass(cls, pipeline.RunStopped) and cls is not pipeline.RunStopped:
            assert (cls.outcome, cls.exit_code) == (outcome, EXIT_CODES[outcome])
    # The codes that were there before keep their meaning.
    assert (EXIT_CODES["completed"], EXIT_CODES["usage_error"], EXIT_CODES["batch_pending"], EXIT_CODES["interrupted"]) == (
        0,
        2,
        3,
        130,
    )


# (cause, server settings, rows, extra flags, env, exit code, outcome, exception from complete(): None when it returns)
CAUSES: list[tuple[str, dict[str, Any], list[dict[str, Any]], list[str], dict[str, str], int, str, Any]] = [
    ("a refused key", {"api_key": "right-key-0123"}, texts(30), ["--api-key-env", "TEST_KEY"],
     {"TEST_KEY": "wrong-key-0123"}, 6, "auth_refused", pipeline.AuthError),
    ("no quota", {}, [{"id": i, "text": f"r{i} [[fault:quota]]"} for i in range(30)], [], {}, 7, "quota_exhausted",
     pipeline.QuotaExhausted),
    ("the same refusal on every row", {}, [{"id": i, "text": f"r{i} [[fault:501]]"} for i in range(30)], [], {}, 9,
     "requests_refused", pipeline.RequestsRefused),
    ("rows failing above the error rate", {}, [*texts(5), {"id": 9, "text": "bad [[fault:400]]"}], [], {}, 4, "error_rate",
     None),
    ("the spend ceiling", {}, texts(30), ["--price-in", "1000", "--price-out", "1000", "--max-cost", "0.3"], {}, 5,
     "spend_ceiling", None),
]  # fmt: skip


@pytest.mark.parametrize(("cause", "kw", "rows", "flags", "env", "code", "outcome", "raised"), CAUSES, ids=[c[0] for c in CAUSES])
def test_each_cause_has_its_exit_code_outcome_and_exception(
    cause: str,
    kw: dict[str, Any],
    rows: list[dict[str, Any]],
    flags: list[str],
    env: dict[str, str],
    code: int,
    outcome: str,
    raised: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeLLMServer(**kw) as server:
        write_table("in.csv", rows)
        result = run_cli(*base_args(server), "--concurrency", "1", *flags, env=env)
        assert result.exit_code == code, result.output
        assert outcome_of_file() == (outcome, code)
        assert f"exit {code}" in result.output  # the message names the code it ends with
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings: dict[str, Any] = {"base_url": f"{server.url}/v1", "model": "fake-model", "prompt": "Summarise: {text}",
                                    "concurrency": 1, "progress": False, "max_attempts": 4}  # fmt: skip
        for flag, value in zip(flags[::2], flags[1::2], strict=True):
            settings[flag.removeprefix("--").replace("-", "_")] = float(value) if "price" in flag or "cost" in flag else value
        frame = pl.read_csv("in.csv")
        if raised is None:  # the rows carry their status: complete() returns them
            assert pipeline.complete(frame, **settings).height == len(rows)
            with pytest.raises(pipeline.RunStopped) as caught:
                pipeline.run(input="in.csv", output="out/api.parquet", **settings).raise_for_outcome()
            assert (caught.value.outcome, caught.value.exit_code) == (outcome, code)
        else:
            with pytest.raises(raised) as stopped:
                pipeline.complete(frame, **settings)
            result_of = stopped.value.result
            assert (result_of.outcome, result_of.exit_code) == (outcome, code)
            assert stopped.value.frame is not None and stopped.value.frame.height == len(rows)


def test_an_unreachable_server_is_server_unavailable() -> None:
    write_table("in.csv", texts(10))
    args = ["run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "{text}", "-m", "m", "--no-progress",
            "--base-url", f"http://127.0.0.1:{closed_port()}/v1", "--max-attempts", "2"]  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 8, result.output
    assert outcome_of_file() == ("server_unavailable", 8)
    with pytest.raises(pipeline.ServerUnavailable):
        pipeline.complete(pl.read_csv("in.csv"), prompt="{text}", model="m", base_url=args[args.index("--base-url") + 1],
                          max_attempts=2, progress=False)  # fmt: skip


def test_a_server_failing_every_request_stops_within_max_wait() -> None:
    """60,000 rows against a server answering 500 to everything once ran for hours. Now the breaker
    governs from the first request: a few dozen requests, then one probe at growing intervals, and
    the run ends once --max-wait passes without a success, saying so on the bar while it waits."""
    with FakeLLMServer(fault_rate=0.7, fault_statuses=(500, 503)) as server:
        # The other 30%: the connection is reset (the directive comes after the random fault).
        write_table("in.csv", [{"id": i, "text": f"row {i} [[fault:reset]]"} for i in range(5000)])
        started = time.monotonic()
        code, shown = run_in_terminal(
            "run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "{text}", "-m", "m", "--max-wait", "20",
            "--base-url", f"{server.url}/v1", columns=140,
        )  # fmt: skip
        wall = time.monotonic() - started
        sent = len(chat_requests(server))
    assert code == 8, shown
    assert wall < 75, f"{wall:.0f} s"  # the documented bound: --max-wait plus the first burst and one probe
    assert sent < 400, sent
    assert "server failing:" in shown and "in a row, next probe in" in shown
    assert "longer than --max-wait 20 s" in shown
    m = json.loads(METRICS.read_text())
    assert (m["run"]["outcome"], m["run"]["exit_code"]) == ("server_unavailable", 8)
    assert m["rows"]["ok"] == 0 and m["requests"]["outage_holds"] == 1
    assert not Path("out/result.parquet").exists()  # nothing was answered: no output of errors only


def test_a_server_that_takes_requests_and_never_answers_stops_within_max_wait() -> None:
    """A hung server (it accepts the connection, reads the request, never replies): every row used to
    time out attempt after attempt, hours for a big table. A timeout says a server is there, so the
    breaker governs from the first one, and the run ends once --max-wait passes without an answer."""
    with FakeLLMServer(latency=600.0) as server:
        write_table("in.csv", texts(2000))
        started = time.monotonic()
        code, shown = run_in_terminal(
            "run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "{text}", "-m", "m", "--max-wait", "10",
            "--timeout", "2", "--base-url", f"{server.url}/v1", columns=140,
        )  # fmt: skip
        wall = time.monotonic() - started
        sent = len(chat_requests(server))
    assert code == 8, shown
    assert wall < 60, f"{wall:.0f} s"  # --max-wait, plus the first timeouts and one probe's
    assert sent < 100, sent  # not 2,000 rows times their attempts
    assert "longer than --max-wait 10 s" in shown and "no answer within 2 s" in shown
    m = json.loads(METRICS.read_text())
    assert (m["run"]["outcome"], m["run"]["exit_code"]) == ("server_unavailable", 8)
    assert m["requests"]["outage_holds"] == 1


def test_a_server_answering_what_is_not_a_chat_answer_stops_at_the_first_row() -> None:
    """A --base-url that reaches a web page or another API answers 200 with something else: every row
    was tried six times (3,000 rows: 18,000 requests, exit 4). The same unreadable answer to five
    requests in a row, before anything was answered, stops the run with what came back and what to check."""
    with FakeLLMServer() as server:
        write_table("in.csv", [{"id": i, "text": f"row {i} [[fault:malformed]]"} for i in range(3000)])
        result = run_cli(*base_args(server), "--max-attempts", "3")
        sent = len(chat_requests(server))
    assert result.exit_code == 9, result.output  # requests_refused
    assert "all got the same answer (reply is not valid JSON" in result.output
    assert "Check the model, the parameters (--param/params) and --base-url" in result.output
    assert sent < 100, sent
    assert not Path("out/result.parquet").exists()  # nothing answered: no output of errors only


def test_a_malformed_answer_after_good_ones_fails_only_its_row() -> None:
    with FakeLLMServer() as server:
        rows = [*texts(20), {"id": 20, "text": "odd one [[fault:malformed]]"}, *texts(20, prefix="more")]
        write_table("in.csv", rows)
        result = run_cli(*base_args(server), "--concurrency", "1", "--max-attempts", "2", "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list().count("error") == 1 and out["status"][20] == "error"


def test_an_outage_after_answers_writes_the_output_with_the_unsent_rows_marked() -> None:
    with FakeLLMServer() as server:
        write_table("in.csv", texts(300))
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *base_args(server)[:-2], "--max-attempts", "6", "--max-wait", "3",
             "--concurrency", "4", "--rpm", "1200"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(chat_requests(server)) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.fault_rate, server.fault_statuses = 1.0, (500,)  # the server goes bad for good
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 8, stderr
    out = pl.read_parquet("out/result.parquet")
    assert out.height == 300 and out["id"].to_list() == list(range(300))  # every row, in input order
    ok, unsent = out.filter(pl.col("status") == "ok"), out.filter(pl.col("status") == "error")
    assert ok.height >= 30
    assert unsent["error"].str.starts_with("not sent: the run stopped early (the server was unavailable").all()
    assert "has every row; those not sent say why" in stderr
    m = json.loads(METRICS.read_text())
    assert m["rows"]["ok"] == ok.height and m["rows"]["not_sent"] >= unsent.height - 4
    # The rows not sent are sent on the next run; the answered ones are not.
    with FakeLLMServer() as again:
        second = run_cli(*[a if a != f"{server.url}/v1" else f"{again.url}/v1" for a in base_args(server)])
        assert second.exit_code == 0, second.output
        assert len(chat_requests(again)) == unsent.height


def test_the_status_line_says_the_server_is_failing() -> None:
    stats = RunStats(total_rows=100, failing_streak=37, failing_kind="http_500", next_probe_at=time.monotonic() + 4.2)

    class NoTerminal:
        def isatty(self) -> bool:
            return False

    line = Progress(stats, enabled=True, stream=NoTerminal()).status_line()  # type: ignore[arg-type]
    assert "server failing: 37 HTTP 500 in a row, next probe in 4 s" in line


def test_a_refused_rerun_marks_the_metrics_file_so_nothing_stale_is_read(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    assert run_cli(*base_args(server)).exit_code == 0
    assert outcome_of_file() == ("completed", 0)
    args = base_args(server)
    args[args.index("--prompt") + 1] = "Summarise: {txet}"  # a typo tonight
    refused = run_cli(*args)
    assert refused.exit_code == 2, refused.output
    m = json.loads(METRICS.read_text())
    assert (m["run"]["outcome"], m["run"]["exit_code"]) == ("usage_error", 2)
    assert "txet" in m["run"]["reason"] and m["rows"]["ok"] == 0


def test_a_key_given_as_the_variable_name_is_refused_and_never_shown(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    for key in ("sk-proj-abcdefghijklmnopqrstuv0123456789", "abcdefghijklmnopqrstuvwxyz0123456789ABCD"):
        result = run_cli(*base_args(server), "--api-key-env", key)
        assert result.exit_code == 2, result.output
        assert key not in result.output and key[:12] not in result.output
        assert "takes the name of an environment variable" in result.output
    assert server.stats()["requests"] == 0 and not Path("out").exists()


def test_a_closed_stdout_ends_the_run_as_asked(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3000, "a rather long line of text so that the output fills the pipe"))
    command = " ".join(
        [sys.executable, "-m", "pipeline", "run", "-i", "in.csv", "-o", "-", "-p", "'S: {text}'", "-m", "fake-model",
         "--base-url", f"{server.url}/v1", "--no-progress", "--checkpoint-dir", "out/cp", "--metrics", "out/m.json",
         "--batch-size", "200"]
    )  # fmt: skip
    done = subprocess.run(
        ["bash", "-c", f"{command} | head -n 2 > out-head.txt; echo rc=${{PIPESTATUS[0]}} >&2"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert "rc=141" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert "stdout was closed by its reader" in done.stderr
    assert len(Path("out-head.txt").read_text().splitlines()) == 2
    m = json.loads(Path("out/m.json").read_text())
    assert (m["run"]["outcome"], m["run"]["exit_code"]) == ("output_closed", 141)
    journal = b"".join(p.read_bytes() for p in Path("out/cp").glob("journal-*.jsonl"))
    assert journal.count(b'"ok"') >= 200  # what came back is kept: the next run resumes from it


def test_the_retry_advice_only_when_a_rerun_can_help(server: FakeLLMServer) -> None:
    write_table("in.csv", [*texts(3), {"id": 7, "text": "too long [[fault:400]]"}])
    permanent = run_cli(*base_args(server))
    assert permanent.exit_code == 4
    assert "Run the same command again to retry" not in permanent.output
    assert "1 row was refused for good" in permanent.output
    write_table("in.csv", [*texts(3), {"id": 7, "text": "flaky [[fault:503]]"}])
    transient = run_cli(*base_args(server), "--max-attempts", "2")
    assert transient.exit_code == 4
    assert "Run the same command again to retry the 1 row whose requests failed" in transient.output
    assert json.loads(METRICS.read_text())["rows"]["retryable"] == 1
