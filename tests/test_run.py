"""The pipeline end to end against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import base_args, chat_requests, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer


def test_every_row_once_in_input_order_with_the_servers_token_counts(server: FakeLLMServer) -> None:
    rows = texts(23)
    write_table("in.csv", rows)
    result = run_cli(*base_args(server), "--batch-size", "5", "--concurrency", "8")
    assert result.exit_code == 0, result.output

    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS]
    assert out["id"].to_list() == list(range(23))
    assert set(out["status"]) == {"ok"}
    assert out["completion"].to_list() == [f"echo: Summarise: {r['text']}" for r in rows]
    # Token counts are the server's, not ours: compare with what it computed per request.
    sent = {r.content: r for r in chat_requests(server)}
    assert len(sent) == 23 == len(chat_requests(server))
    for row in out.iter_rows(named=True):
        words = len(f"Summarise: {row['text']}".split())
        assert row["prompt_tokens"] == words + 3  # the fake server's documented count
        assert row["completion_tokens"] == words + 1
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["finish_reason"] == "stop" and row["model"] == "fake-model"
        assert row["attempts"] == 1 and row["latency_ms"] > 0 and row["tokens_estimated"] is False
        assert len(row["request_key"]) == 32


def test_openai_wire_format(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(1))
    result = run_cli(*base_args(server), "--system", "Be brief.", "--max-tokens", "50", "--temperature", "0.3", "--top-p", "0.9")
    assert result.exit_code == 0, result.output
    (req,) = chat_requests(server)
    assert req.path == "/v1/chat/completions"
    assert req.body == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Summarise: " + texts(1)[0]["text"]},
        ],
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
    }
    assert "authorization" not in {k.lower() for k in req.headers}  # no key was named for this server


@pytest.mark.parametrize("fault", ["429@0.2x2", "500x2", "503x1", "502x1", "resetx2", "malformedx1", "529x1", "408x1"])
def test_transient_faults_are_retried_until_ok(server: FakeLLMServer, fault: str) -> None:
    write_table("in.csv", [{"id": 0, "text": f"broken [[fault:{fault}]]"}, {"id": 1, "text": "healthy"}])
    result = run_cli(*base_args(server))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "ok"]
    expected_attempts = 1 + int(fault.split("x")[1])
    assert out["attempts"].to_list() == [expected_attempts, 1]
    per_content = Counter(r.content for r in chat_requests(server))
    assert per_content["Summarise: broken [[fault:" + fault + "]]"] == expected_attempts
    assert per_content["Summarise: healthy"] == 1


def test_timeout_is_retried(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "stuck [[fault:hangx1]]"}])
    result = run_cli(*base_args(server), "--timeout", "0.5")
    assert result.exit_code == 0, result.output
    row = pl.read_parquet("out/result.parquet").row(0, named=True)
    assert (row["status"], row["attempts"]) == ("ok", 2)


def test_persistent_server_errors_give_up_after_max_attempts(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "always down [[fault:500]]"}, {"id": 1, "text": "fine"}])
    result = run_cli(*base_args(server), "--max-attempts", "3")
    assert result.exit_code == 4  # one failed row is above the default --max-error-rate 0
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["error", "ok"]
    assert out["attempts"][0] == 3 and "HTTP 500" in out["error"][0] and "after 3 attempts" in out["error"][0]
    assert out["completion"][0] is None and out["prompt_tokens"][0] is None
    assert "http_500 x1" in result.output


def test_a_400_is_recorded_and_not_retried(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "bad [[fault:400]]"}, {"id": 1, "text": "good"}])
    result = run_cli(*base_args(server), "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["error", "ok"]
    assert out["error"][0].startswith("HTTP 400") and out["attempts"][0] == 1
    assert Counter(r.content for r in chat_requests(server))["Summarise: bad [[fault:400]]"] == 1


def test_a_401_stops_the_run_at_once() -> None:
    with FakeLLMServer(api_key="right-key") as server:
        write_table("in.csv", texts(200))
        result = run_cli(*base_args(server), "--api-key-env", "TEST_KEY", "--concurrency", "2", env={"TEST_KEY": "wrong-key"})
        assert result.exit_code == 6, result.output  # auth_refused
        assert "stopped" in result.output and "HTTP 401" in result.output
        # Stopped at the first answer, not after failing all 200 rows.
        assert len(chat_requests(server)) <= 4
        assert not Path("out/result.parquet").exists()
        assert "wrong-key" not in result.output


def test_out_of_quota_stops_the_run(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": i, "text": f"row {i} [[fault:quota]]"} for i in range(50)])
    result = run_cli(*base_args(server), "--concurrency", "1")
    assert result.exit_code == 7, result.output  # quota_exhausted
    assert "quota" in result.output.lower()
    assert len(chat_requests(server)) == 1


def test_unreachable_server_stops_instead_of_failing_every_row() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_table("in.csv", texts(30))
    result = run_cli(
        "run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "{text}", "--base-url", f"http://127.0.0.1:{port}/v1",
        "--model", "m", "--no-progress", "--max-attempts", "2",
    )  # fmt: skip
    assert result.exit_code == 8, result.output  # server_unavailable
    assert "Cannot reach the server" in result.output


def test_retry_after_is_honoured(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "slow down [[fault:429@0.8x1]]"}])
    result = run_cli(*base_args(server))
    assert result.exit_code == 0, result.output
    first, second = chat_requests(server)
    assert (first.status, second.status) == (429, 200)
    assert second.t - first.t >= 0.8


def test_no_usage_means_estimated_tokens_flagged_in_the_row(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "count me [[fault:nousage]]"}, {"id": 1, "text": "with usage"}])
    result = run_cli(*base_args(server))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["tokens_estimated"].to_list() == [True, False]
    assert out["prompt_tokens"][0] > 0 and out["completion_tokens"][0] > 0
    assert "estimated" in result.output


@pytest.mark.parametrize("fault", ["error200", "nochoices"])
def test_http_200_error_bodies_are_errors(server: FakeLLMServer, fault: str) -> None:
    write_table("in.csv", [{"id": 0, "text": f"odd [[fault:{fault}]]"}, {"id": 1, "text": "normal"}])
    result = run_cli(*base_args(server), "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["error", "ok"]
    assert out["completion"][0] is None and out["error"][0]


def test_null_and_empty_cells_are_not_sent(server: FakeLLMServer) -> None:
    write_table("in.parquet", pl.DataFrame({"id": [0, 1, 2], "text": ["real text", None, "   "]}))
    result = run_cli(*base_args(server, inp="in.parquet"), "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "error", "error"]
    assert "'text' is null" in out["error"][1] and "'text' is empty" in out["error"][2]
    assert [r.content for r in chat_requests(server)] == ["Summarise: real text"]


def test_identical_prompts_are_sent_once(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": i, "text": "same words"} for i in range(10)])
    result = run_cli(*base_args(server))
    assert result.exit_code == 0, result.output
    assert len(chat_requests(server)) == 1
    assert pl.read_parquet("out/result.parquet")["completion"].to_list() == ["echo: Summarise: same words"] * 10


def test_id_column_keeps_identical_prompts_apart(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": i, "text": "same words"} for i in range(4)])
    result = run_cli(*base_args(server), "--id-column", "id")
    assert result.exit_code == 0, result.output
    assert len(chat_requests(server)) == 4


def test_inputs_from_several_files_glob_and_formats(server: FakeLLMServer) -> None:
    write_table("parts/a.jsonl", texts(3, "alpha"))
    write_table("parts/b.jsonl", texts(2, "beta"))
    result = run_cli(*base_args(server, inp="parts/*.jsonl"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["text"].to_list() == [r["text"] for r in texts(3, "alpha") + texts(2, "beta")]


def test_limit_takes_the_first_rows(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(20))
    result = run_cli(*base_args(server), "--limit", "4")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet("out/result.parquet")["id"].to_list() == [0, 1, 2, 3]
    assert len(chat_requests(server)) == 4


def test_rerun_sends_nothing_and_changed_rows_only(server: FakeLLMServer) -> None:
    rows = texts(12)
    write_table("in.csv", rows)
    assert run_cli(*base_args(server)).exit_code == 0
    assert len(chat_requests(server)) == 12

    server.reset()
    again = run_cli(*base_args(server))
    assert again.exit_code == 0, again.output
    assert chat_requests(server) == []
    assert "12 ok from the checkpoint" in again.output

    rows[3]["text"] = "an edited review"
    rows[7]["text"] = "another edit"
    write_table("in.csv", rows)
    server.reset()
    assert run_cli(*base_args(server)).exit_code == 0
    assert sorted(r.content for r in chat_requests(server)) == ["Summarise: an edited review", "Summarise: another edit"]
    out = pl.read_parquet("out/result.parquet")
    assert out["completion"][3] == "echo: Summarise: an edited review" and out.height == 12

    server.reset()  # a new template changes every request
    args = base_args(server)
    args[args.index("--prompt") + 1] = "TL;DR: {text}"
    assert run_cli(*args).exit_code == 0
    assert len(chat_requests(server)) == 12

    server.reset()  # and --fresh ignores the checkpoint
    assert run_cli(*base_args(server), "--fresh").exit_code == 0
    assert len(chat_requests(server)) == 12


def test_rows_that_failed_are_retried_on_the_next_run(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "flaky [[fault:503x3]]"}, {"id": 1, "text": "fine"}])
    first = run_cli(*base_args(server), "--max-attempts", "2")
    assert first.exit_code == 4
    assert pl.read_parquet("out/result.parquet")["status"].to_list() == ["error", "ok"]
    before = len(chat_requests(server))  # the server keeps counting attempts: the third still fails
    second = run_cli(*base_args(server), "--max-attempts", "2")
    assert second.exit_code == 0, second.output
    assert [r.content for r in chat_requests(server)[before:]] == ["Summarise: flaky [[fault:503x3]]"] * 2
    assert pl.read_parquet("out/result.parquet")["status"].to_list() == ["ok", "ok"]


def test_rpm_paces_evenly_without_429s() -> None:
    # The server allows 10 requests in each wall-clock second; we ask for 600/min.
    with FakeLLMServer(rpm=600, rate_window="second") as server:
        write_table("in.csv", texts(25))
        started = time.monotonic()
        result = run_cli(*base_args(server), "--rpm", "600", "--concurrency", "16")
        assert result.exit_code == 0, result.output
        assert server.stats().get("status_429", 0) == 0
        arrivals = [r.t for r in chat_requests(server)]
        assert len(arrivals) == 25
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert min(gaps) >= 0.08  # evenly spaced (10 per second), no burst at the start
        assert time.monotonic() - started >= 2.3


def test_rate_limited_run_backs_off_and_finishes() -> None:
    # ModelsLab-style: at most 2 requests in flight, a 429 with retry_after in the body beyond that.
    with FakeLLMServer(max_in_flight=2, latency=0.05, api_key="k") as server:
        write_table("in.csv", texts(10))
        result = run_cli(
            *base_args(server), "--provider", "modelslab", "--base-url", f"{server.url}/api/v7/llm", "--concurrency", "4",
            env={"MODELSLAB_API_KEY": "k"},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert pl.read_parquet("out/result.parquet")["status"].to_list() == ["ok"] * 10


def test_tpm_paces_by_estimated_tokens(server: FakeLLMServer) -> None:
    # Each request is charged its prompt estimate + max_tokens (about 105 tokens), and 6,000
    # tokens a minute is about 99 a second: one request a second, whichever worker sends it.
    write_table("in.csv", texts(5))
    result = run_cli(*base_args(server), "--tpm", "6000", "--max-tokens", "90", "--concurrency", "8")
    assert result.exit_code == 0, result.output
    arrivals = sorted(r.t for r in chat_requests(server))
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] >= 3.5


@pytest.mark.parametrize("fault", ["oddretryx1", "oddusage", "ratelinkx2"])
def test_odd_but_survivable_replies_do_not_end_the_run(server: FakeLLMServer, fault: str) -> None:
    # A Retry-After of "soon", usage that is a string, a rate limit whose text mentions billing:
    # each is retried or read as far as it can be, and the run goes on.
    write_table("in.csv", [{"id": 0, "text": f"odd [[fault:{fault}]]"}, {"id": 1, "text": "plain"}])
    result = run_cli(*base_args(server))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "ok"]
    if fault == "oddusage":
        assert out["tokens_estimated"].to_list() == [True, False]


def test_duplicates_far_apart_are_sent_once(server: FakeLLMServer) -> None:
    rows = [*texts(30), {"id": 30, "text": texts(1)[0]["text"]}]  # the last row repeats the first, batches later
    write_table("in.csv", rows)
    result = run_cli(*base_args(server), "--batch-size", "4", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    assert len(chat_requests(server)) == 30
    out = pl.read_parquet("out/result.parquet")
    assert out["completion"][30] == out["completion"][0] and out["request_key"][30] == out["request_key"][0]
    assert "1 row shared" in result.output


def test_a_404_before_any_answer_stops_with_a_hint_about_the_url(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(40))
    args = base_args(server)
    args[args.index("--base-url") + 1] = f"{server.url}/v2"  # a path the server does not serve
    result = run_cli(*args, "--concurrency", "1")
    assert result.exit_code == 9, result.output  # requests_refused
    assert "HTTP 404" in result.output and "/v1" in result.output
    assert len(chat_requests(server)) <= 1


def test_a_long_rate_limit_pause_is_announced_once(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "wait [[fault:429@5x1]]"}, *texts(3)])
    result = run_cli(*base_args(server), "--concurrency", "1")
    assert result.exit_code == 0, result.output
    assert result.output.count("holding all requests for 5 s") == 1
