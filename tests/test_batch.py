"""Batch mode against a fake OpenAI batch service with a clock (tests/fakebatch.py): two invocations,
--wait, kills during and right after create, expiry, errored lines, a failed validation, a late output
file, polls answered 429/500, splitting, refusal for providers without batches, and the key in no file."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import run_cli, spawn, texts, write_table
from tests.fakebatch import FakeBatchServer

KEY = "sk-batch-test-0123456789"


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBatchServer]:
    monkeypatch.setenv("BATCH_KEY", KEY)
    with FakeBatchServer(api_key=KEY) as srv:
        yield srv


def job(srv: FakeBatchServer, *more: str, out: str = "out/r.parquet", provider: str = "openai") -> list[str]:
    base = f"{srv.url}/v1" if provider == "openai" else srv.url  # Anthropic's base is the part before /v1
    return ["run", "-i", "in.csv", "-o", out, "-p", "Summarise: {text}", "--base-url", base, "-m", "gpt-test",
            "--api-key-env", "BATCH_KEY", "--mode", "batch", "--no-progress", "--no-report", "--provider", provider,
            *more]  # fmt: skip


def ledger_events(out: str = "out/r") -> list[dict[str, object]]:
    path = Path(f"{out}.checkpoint/batches/ledger.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_submit_then_collect_with_the_same_command(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(10))
    first = run_cli(*job(batches))
    assert first.exit_code == 3, first.output
    assert "1 batch in progress (10 requests); nothing is lost. Run the same command again" in first.output
    assert not Path("out/r.parquet").exists()
    assert json.loads(Path("out/r.metrics.json").read_text())["run"]["outcome"] == "batch_pending"
    again = run_cli(*job(batches))  # the batch has not finished on the server's clock: still 3, nothing resent
    assert again.exit_code == 3 and batches.stats["batches_created"] == 1
    batches.advance(120)
    done = run_cli(*job(batches))
    assert done.exit_code == 0, done.output
    out = pl.read_parquet("out/r.parquet")
    assert out["id"].to_list() == list(range(10)) and set(out["status"]) == {"ok"}
    assert out["completion"].to_list() == [f"echo: Summarise: {r['text']}" for r in texts(10)]
    assert out["attempts"].to_list() == [1] * 10 and out["latency_ms"].null_count() == 10
    assert batches.stats["batches_created"] == 1 and set(batches.lines_seen.values()) == {1}
    # Once collected, the same command sends nothing and writes the same output.
    assert run_cli(*job(batches)).exit_code == 0 and batches.stats["batches_created"] == 1


def test_wait_polls_until_done(batches: FakeBatchServer) -> None:
    batches.faults["duration"] = 0  # finished at the first poll
    write_table("in.csv", texts(6))
    result = run_cli(*job(batches, "--wait"))
    assert result.exit_code == 0, result.output
    assert set(pl.read_parquet("out/r.parquet")["status"]) == {"ok"}


def test_splitting_by_lines(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(10))
    assert run_cli(*job(batches, "--batch-max-requests", "4")).exit_code == 3
    assert batches.stats["batches_created"] == 3
    assert sorted(b["request_counts"]["total"] for b in batches.batches.values()) == [2, 4, 4]


def test_expiry_resends_only_the_unfinished_lines(batches: FakeBatchServer) -> None:
    batches.faults["expire_after"] = 4
    write_table("in.csv", texts(10))
    assert run_cli(*job(batches)).exit_code == 3
    batches.advance(25 * 3600)
    second = run_cli(*job(batches))
    assert second.exit_code == 3, second.output
    assert "expired: 4 answered, 0 refused, 6 to send again" in second.output
    assert batches.stats["batches_created"] == 2
    del batches.faults["expire_after"]
    batches.advance(120)
    third = run_cli(*job(batches))
    assert third.exit_code == 0, third.output
    out = pl.read_parquet("out/r.parquet")
    assert set(out["status"]) == {"ok"}
    assert sorted(batches.lines_seen.values()) == [1] * 4 + [2] * 6  # answered lines never sent again
    assert sorted(out["attempts"].to_list()) == [1] * 4 + [2] * 6


def test_errored_lines_permanent_recorded_transient_resent(batches: FakeBatchServer) -> None:
    batches.faults["line_status"] = {"number 3 ": 400, "number 5 ": 500}
    write_table("in.csv", texts(8))
    assert run_cli(*job(batches)).exit_code == 3
    batches.advance(120)
    second = run_cli(*job(batches))
    assert second.exit_code == 3 and "6 answered, 1 refused, 1 to send again" in second.output
    batches.faults["line_status"] = {"number 3 ": 400}
    batches.advance(120)
    third = run_cli(*job(batches))
    assert third.exit_code == 4, third.output  # one row refused: above --max-error-rate 0
    out = pl.read_parquet("out/r.parquet")
    assert out.filter(pl.col("id") == 3)["error"][0].startswith("HTTP 400: fake status 400")
    assert out.filter(pl.col("status") == "ok").height == 7
    counts = batches.lines_seen
    assert counts[out.filter(pl.col("id") == 3)["request_key"][0]] == 1  # a permanent refusal is not resent
    assert counts[out.filter(pl.col("id") == 5)["request_key"][0]] == 2


def test_failed_validation_refuses_the_named_line_and_resubmits_the_rest(batches: FakeBatchServer) -> None:
    batches.faults["fail_validation"] = True
    write_table("in.csv", texts(5))
    assert run_cli(*job(batches)).exit_code == 3
    second = run_cli(*job(batches))
    assert second.exit_code == 3 and "failed: 0 answered, 1 refused, 4 to send again" in second.output
    batches.faults["fail_validation"] = False
    batches.advance(120)
    run_cli(*job(batches))  # polls the new batch: validating -> completed
    final = run_cli(*job(batches, "--max-error-rate", "0.5"))
    assert final.exit_code == 0, final.output
    out = pl.read_parquet("out/r.parquet")
    assert out.filter(pl.col("status") == "error")["error"][0].startswith("refused by the batch's validation")


def test_late_output_file_and_polls_answered_429_and_500(batches: FakeBatchServer) -> None:
    batches.faults.update(output_late=True)
    write_table("in.csv", texts(4))
    assert run_cli(*job(batches)).exit_code == 3
    batches.advance(120)
    batches.faults["retrieve_faults"] = [429, 500]
    second = run_cli(*job(batches))
    assert second.exit_code == 3  # completed, but its output file not announced yet: not folded
    assert batches.stats["retrieve_faults"] == 2
    third = run_cli(*job(batches))
    assert third.exit_code == 0, third.output
    assert set(pl.read_parquet("out/r.parquet")["status"]) == {"ok"}


@pytest.mark.parametrize("when", ["during", "after"])
def test_killed_around_create_never_pays_twice(batches: FakeBatchServer, when: str) -> None:
    """SIGKILL while the create call is in flight (the batch exists, the run never heard of it), or
    right after it was recorded: the next run adopts that batch and creates no second one."""
    if when == "during":
        batches.faults["create_sleep"] = 10
    write_table("in.csv", texts(10))
    proc = spawn(*job(batches), env={"BATCH_KEY": KEY})
    deadline = time.monotonic() + 30
    while not (batches.stats["batches_created"] if when == "during" else any(e["event"] == "created" for e in ledger_events())):
        assert time.monotonic() < deadline and proc.poll() in (None, 3)
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    batches.faults["create_sleep"] = 0
    again = run_cli(*job(batches))
    assert again.exit_code == 3, again.output
    if when == "during":
        assert "adopted batch" in again.output
    batches.advance(120)
    assert run_cli(*job(batches)).exit_code == 0
    assert batches.stats["batches_created"] == 1 and set(batches.lines_seen.values()) == {1}
    assert set(pl.read_parquet("out/r.parquet")["status"]) == {"ok"}


@pytest.mark.parametrize("provider", ["modelslab", "local"])
def test_providers_without_a_batch_api_are_refused(batches: FakeBatchServer, provider: str) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*job(batches, provider=provider))
    assert result.exit_code == 2
    assert "--mode batch needs a provider with a batch API" in result.output and provider in result.output
    assert batches.stats["uploads"] == 0


def test_the_key_is_in_no_file_and_goes_only_in_the_header(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(3))
    run_cli(*job(batches))
    batches.advance(120)
    assert run_cli(*job(batches)).exit_code == 0
    for path in Path.cwd().rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert set(batches.received_keys) == {f"Bearer {KEY}"}


def status_then_cancel(batches: FakeBatchServer, job_flags: list[str]) -> None:
    """`batch status` shows the one open batch of 10 rows, then `batch cancel` cancels it (the fake has finished half)."""
    shown = run_cli("batch", "status", *job_flags)
    assert shown.exit_code == 0, shown.output
    assert ": in_progress (0 done, 0 failed of 10); open" in shown.output
    assert "10 requests in open batches, 0 waiting to be submitted, 0 refused, 0 answered" in shown.output
    cancelled = run_cli("batch", "cancel", *job_flags)
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled: 5 answered, 0 refused, 5 to send again" in cancelled.output
    assert batches.stats["cancels"] == 1


def test_status_and_cancel(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(10))
    assert run_cli(*job(batches)).exit_code == 3
    status_then_cancel(batches, job(batches)[1:])  # the job's flags, without "run"
    # The next run keeps the 5 answers and submits only the other 5.
    assert run_cli(*job(batches)).exit_code == 3
    assert batches.stats["batches_created"] == 2 and sorted(batches.lines_seen.values()) == [1] * 5 + [2] * 5
    batches.advance(120)
    assert run_cli(*job(batches)).exit_code == 0
    assert set(pl.read_parquet("out/r.parquet")["status"]) == {"ok"}


def test_batch_commands_take_the_config_as_given_the_subcommand_is_the_mode(batches: FakeBatchServer) -> None:
    """A job run with --mode batch on the command line: status and cancel on the same config, without the flag."""
    write_table("in.csv", texts(2))
    args = [a for a in job(batches)[1:] if a not in ("--mode", "batch")]
    none_yet = run_cli("batch", "status", *args)
    assert none_yet.exit_code == 0 and "no batches yet" in none_yet.output
    assert run_cli(*job(batches)).exit_code == 3  # submitted, with the flag
    status = run_cli("batch", "status", *args)
    assert status.exit_code == 0, status.output
    assert "in_progress" in status.output and "2 requests in open batches" in status.output
    cancel = run_cli("batch", "cancel", *args)
    assert cancel.exit_code == 0 and "cancelled" in cancel.output
    assert batches.stats["cancels"] == 1


# ---- Anthropic Message Batches: the same flow, inline requests, results stream, no metadata ----------


def test_anthropic_submit_then_collect(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(6))
    first = run_cli(*job(batches, provider="anthropic"))
    assert first.exit_code == 3, first.output
    batches.advance(120)
    done = run_cli(*job(batches, provider="anthropic"))
    assert done.exit_code == 0, done.output
    out = pl.read_parquet("out/r.parquet")
    assert set(out["status"]) == {"ok"} and out["completion"].to_list() == [f"echo: Summarise: {r['text']}" for r in texts(6)]
    assert out["prompt_tokens"].min() > 0 and batches.stats["uploads"] == 0  # inline requests, usage from the messages
    assert set(batches.received_keys) == {f"x-api-key {KEY}"}


def test_anthropic_errored_expired_and_cancelled_lines(batches: FakeBatchServer) -> None:
    batches.faults.update(line_status={"number 1 ": 400, "number 2 ": 500}, expire_after=4)
    write_table("in.csv", texts(6))
    assert run_cli(*job(batches, provider="anthropic")).exit_code == 3
    batches.advance(25 * 3600)
    second = run_cli(*job(batches, provider="anthropic"))
    # Lines 0-3 ran: 0 and 3 answered, 1 refused (400), 2 errored (500: again); 4 and 5 expired (again).
    assert second.exit_code == 3 and "2 answered, 1 refused, 3 to send again" in second.output, second.output
    batches.faults.update(line_status={}, expire_after=None)
    del batches.faults["expire_after"]
    batches.advance(120)
    third = run_cli(*job(batches, "--max-error-rate", "0.5", provider="anthropic"))
    assert third.exit_code == 0, third.output
    out = pl.read_parquet("out/r.parquet")
    assert out.filter(pl.col("status") == "error")["id"].to_list() == [1]


def test_anthropic_kill_during_create_adopts_by_size_and_time(batches: FakeBatchServer) -> None:
    batches.faults["create_sleep"] = 10
    write_table("in.csv", texts(7))
    proc = spawn(*job(batches, provider="anthropic"), env={"BATCH_KEY": KEY})
    deadline = time.monotonic() + 30
    while not batches.stats["batches_created"]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    batches.faults["create_sleep"] = 0
    again = run_cli(*job(batches, provider="anthropic"))
    assert again.exit_code == 3 and "adopted batch" in again.output, again.output
    batches.advance(120)
    assert run_cli(*job(batches, provider="anthropic")).exit_code == 0
    assert batches.stats["batches_created"] == 1 and set(batches.lines_seen.values()) == {1}


def test_anthropic_cancel_keeps_what_finished(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(8))
    assert run_cli(*job(batches, provider="anthropic")).exit_code == 3
    cancelled = run_cli("batch", "cancel", *job(batches, provider="anthropic")[1:])
    assert cancelled.exit_code == 0 and "4 answered, 0 refused, 4 to send again" in cancelled.output, cancelled.output
    assert run_cli(*job(batches, provider="anthropic")).exit_code == 3
    assert sorted(batches.lines_seen.values()) == [1] * 4 + [2] * 4


def test_estimate_prices_batch_mode_at_half_and_a_ceiling_is_refused(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(4))
    online = [a for a in job(batches) if a not in ("--mode", "batch", "--no-progress", "--no-report")][1:]
    prices = ["--price-in", "2", "--price-out", "4"]

    def at_most(output: str) -> float:
        line = next(x for x in output.splitlines() if x.startswith("  cost:"))
        return float(line.split("at most $")[1].split()[0])

    full = run_cli("estimate", *online, *prices)
    half = run_cli("estimate", *online, "--mode", "batch", *prices)
    assert full.exit_code == 0 and half.exit_code == 0, half.output
    assert at_most(half.output) == pytest.approx(at_most(full.output) / 2, rel=0.02)
    assert "batch mode: 50% of the online price" in half.output and "within 24 hours" in half.output
    refused = run_cli(*job(batches, *prices, "--max-cost", "1"))
    assert refused.exit_code == 2 and "batch mode does not apply them yet" in refused.output
    assert batches.stats["uploads"] == 0


# ---- the OpenAI batch file format as an interchange format --------------------------------------


def write_requests(n: int, path: str = "requests.jsonl") -> list[dict[str, object]]:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "vllm-model", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 20 + i}}
        for i in range(n)
    ]  # fmt: skip
    Path(path).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def test_batch_request_file_runs_online_as_it_is_and_writes_batch_output_lines() -> None:
    from tests.conftest import chat_requests
    from tests.fakeserver import FakeLLMServer

    lines = write_requests(5)
    with FakeLLMServer() as server:
        result = run_cli("run", "-i", "requests.jsonl", "-o", "out/answers.jsonl", "--base-url", f"{server.url}/v1",
                         "--no-progress", "--no-report")  # fmt: skip
        assert result.exit_code == 0, result.output
        sent = sorted((r.body for r in chat_requests(server)), key=lambda b: b["max_tokens"])
        # The same file to Parquet: a table with custom_id, method, url and body beside the results.
        table = run_cli("run", "-i", "requests.jsonl", "-o", "out/answers.parquet", "--base-url", f"{server.url}/v1",
                        "--no-progress", "--no-report")  # fmt: skip
        assert table.exit_code == 0, table.output
    assert sent == [x["body"] for x in lines]  # each body sent verbatim: its own model and max_tokens
    frame = pl.read_parquet("out/answers.parquet")
    assert frame.columns[:5] == ["custom_id", "method", "url", "body", "completion"] and set(frame["status"]) == {"ok"}
    out = [json.loads(x) for x in Path("out/answers.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(5)]  # input order
    first = out[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "echo: question 0"
    assert first["response"]["body"]["model"] == "vllm-model" and first["response"]["body"]["usage"]["prompt_tokens"] > 0


def test_batch_request_file_in_batch_mode(batches: FakeBatchServer) -> None:
    write_requests(4)
    args = ["run", "-i", "requests.jsonl", "-o", "out/r.jsonl", "--base-url", f"{batches.url}/v1", "--api-key-env", "BATCH_KEY",
            "--mode", "batch", "--no-progress", "--no-report"]  # fmt: skip
    assert run_cli(*args).exit_code == 3
    batch = next(iter(batches.batches.values()))
    assert [line["body"]["max_tokens"] for line in batch["_lines"]] == [20, 21, 22, 23]  # the bodies as given
    batches.advance(120)
    done = run_cli(*args)
    assert done.exit_code == 0, done.output
    out = [json.loads(x) for x in Path("out/r.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(4)]
    assert all(x["response"]["status_code"] == 200 for x in out)


def test_batch_output_lines_carry_the_providers_responses_as_received() -> None:
    """Not rebuilt from our completion text: the server's own body (its id, created, every field), a
    refusal's status and error body, and for a row that got no HTTP answer an error code of ours."""
    from tests.fakeserver import FakeLLMServer

    lines = write_requests(3)
    lines[1]["body"]["messages"][0]["content"] = "too long [[fault:400]]"  # type: ignore[index]
    lines[2]["body"]["messages"][0]["content"] = "never answers [[fault:hang]]"  # type: ignore[index]
    Path("requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with FakeLLMServer() as server:
        result = run_cli("run", "-i", "requests.jsonl", "-o", "out/answers.jsonl", "--base-url", f"{server.url}/v1",
                         "--no-progress", "--no-report", "--timeout", "1", "--max-attempts", "1", "--max-error-rate", "1")  # fmt: skip
        assert result.exit_code == 0, result.output
    ok, refused, lost = (json.loads(x) for x in Path("out/answers.jsonl").read_text().splitlines())
    body = ok["response"]["body"]
    assert "created" in body and body["id"].startswith("chatcmpl-") and not body["id"].endswith(ok["id"][10:])
    assert ok["error"] is None and body["choices"][0]["message"]["content"] == "echo: question 0"
    assert refused["error"] is None and refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["type"] == "invalid_request_error"  # the error body as the server sent it
    assert (
        lost["response"] is None and lost["error"]["code"] == "no_response" and "no answer within 1 s" in lost["error"]["message"]
    )


def test_batch_mode_output_lines_are_the_batch_files_lines(batches: FakeBatchServer) -> None:
    write_requests(3)
    batches.faults["line_status"] = {"question 1": 400}
    args = ["run", "-i", "requests.jsonl", "-o", "out/r.jsonl", "--base-url", f"{batches.url}/v1", "--api-key-env", "BATCH_KEY",
            "--mode", "batch", "--no-progress", "--no-report", "--max-error-rate", "1"]  # fmt: skip
    assert run_cli(*args).exit_code == 3
    batches.advance(120)
    done = run_cli(*args)
    assert done.exit_code == 0, done.output
    first, refused, third = (json.loads(x) for x in Path("out/r.jsonl").read_text().splitlines())
    assert first["response"]["body"]["id"] == "chatcmpl-fake"  # the batch's own body, not one rebuilt by us
    assert refused["response"]["status_code"] == 400 and refused["error"] is None
    assert third["response"]["status_code"] == 200
    assert not Path("out/r.checkpoint/responses").exists() or all(
        b"sk-batch-test" not in f.read_bytes() for f in Path("out/r.checkpoint/responses").iterdir()
    )


def test_bad_batch_request_files_are_refused_before_anything_is_sent() -> None:
    write_requests(2)
    with open("requests.jsonl", "a") as f:
        f.write(json.dumps({"custom_id": "req-0", "body": {"messages": []}}) + "\n")
    result = run_cli("run", "-i", "requests.jsonl", "-o", "out/a.jsonl", "--base-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 2 and "line 3 repeats custom_id 'req-0'" in result.output
    write_requests(2)
    wrong = run_cli(
        "run", "-i", "requests.jsonl", "-o", "out/a.jsonl", "--provider", "anthropic", "--base-url", "http://127.0.0.1:9"
    )
    assert wrong.exit_code == 2 and "does not speak" in wrong.output
    write_table("in.csv", texts(2))
    plain = run_cli("run", "-i", "in.csv", "-o", "out/a.jsonl", "-p", "{text}", "-m", "m", "--output-format", "openai-batch",
                    "--base-url", "http://127.0.0.1:9/v1")  # fmt: skip
    assert plain.exit_code == 2 and "give an --input of such requests" in plain.output


def test_one_model_per_batch_file(batches: FakeBatchServer) -> None:
    lines = write_requests(6)
    for i, line in enumerate(lines):
        line["body"]["model"] = "model-a" if i % 2 else "model-b"  # type: ignore[index]
    Path("requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["run", "-i", "requests.jsonl", "-o", "out/r.jsonl", "--base-url", f"{batches.url}/v1", "--api-key-env", "BATCH_KEY",
            "--mode", "batch", "--no-progress", "--no-report"]  # fmt: skip
    assert run_cli(*args).exit_code == 3
    models = sorted(
        {line["body"]["model"] for line in b["_lines"]} == {m} for b in batches.batches.values() for m in ("model-a", "model-b")
    )
    assert batches.stats["batches_created"] == 2 and models.count(True) == 2


def test_fallback_online_sends_failed_lines_online(batches: FakeBatchServer) -> None:
    """--fallback online: the lines a batch left unanswered go online (the fake, as OpenAI, serves chat
    completions on the same base URL) instead of into a second batch."""
    batches.faults["expire_after"] = 2
    write_table("in.csv", texts(5))
    args = job(batches, "--fallback", "online")
    assert run_cli(*args).exit_code == 3
    batches.advance(25 * 3600)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert batches.stats["batches_created"] == 1 and batches.stats["online"] == 3
    out = pl.read_parquet("out/r.parquet")
    assert set(out["status"]) == {"ok"} and sorted(out["attempts"].to_list()) == [1, 1, 2, 2, 2]


def test_a_bad_key_stops_with_exit_6_and_submits_nothing(batches: FakeBatchServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_KEY", "sk-wrong-key-0000000000")
    write_table("in.csv", texts(3))
    result = run_cli(*job(batches))
    assert result.exit_code == 6, result.output  # auth_refused
    assert "Incorrect API key" in result.output and "sk-wrong" not in result.output
    assert batches.stats["batches_created"] == 0


# ---- from review: paying twice and wedged jobs --------------------------------------------------


def test_an_online_run_refuses_an_output_with_open_batches(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(5))
    assert run_cli(*job(batches)).exit_code == 3
    online = [a for a in job(batches) if a not in ("--mode", "batch")]
    result = run_cli(*online)
    assert result.exit_code == 2 and "5 requests of this output sit in open batches" in result.output
    assert batches.stats["online"] == 0


def test_complete_in_batch_mode_needs_a_checkpoint_dir(batches: FakeBatchServer) -> None:
    import pipeline

    with pytest.raises(pipeline.ConfigError, match="checkpoint_dir"):
        pipeline.complete(pl.DataFrame(texts(2)), prompt="{text}", model="m", base_url=f"{batches.url}/v1", mode="batch")
    assert batches.stats["uploads"] == 0


def test_anthropic_adoption_skips_a_batch_the_ledger_already_holds(batches: FakeBatchServer) -> None:
    """Two files of the same size: the batch of a create whose reply was lost is the one not yet in the
    ledger, never the other file's."""
    write_table("in.csv", texts(8))
    args = job(batches, "--batch-max-requests", "4", provider="anthropic")
    assert run_cli(*args).exit_code == 3 and batches.stats["batches_created"] == 2
    ledger = Path("out/r.checkpoint/batches/ledger.jsonl")
    lines = ledger.read_text().splitlines()
    last_created = max(i for i, x in enumerate(lines) if json.loads(x)["event"] == "created")
    ledger.write_text("".join(x + "\n" for i, x in enumerate(lines) if i != last_created))  # as if killed before it
    again = run_cli(*args)
    assert again.exit_code == 3 and "adopted batch" in again.output, again.output
    created = [json.loads(x)["batch_id"] for x in ledger.read_text().splitlines() if json.loads(x)["event"] == "created"]
    assert len(created) == len(set(created)) == 2
    batches.advance(120)
    assert run_cli(*args).exit_code == 0
    assert batches.stats["batches_created"] == 2 and set(batches.lines_seen.values()) == {1}


def test_a_create_refused_for_good_does_not_wedge_later_runs(batches: FakeBatchServer) -> None:
    batches.faults["create_status"] = 400
    write_table("in.csv", texts(3))
    assert run_cli(*job(batches)).exit_code == 9  # requests_refused
    second = run_cli(*job(batches))  # the prepared file is refused again: given up, its rows pending again
    assert second.exit_code == 9 and "its rows are sent again" in second.output
    del batches.faults["create_status"]
    assert run_cli(*job(batches)).exit_code == 3
    batches.advance(120)
    assert run_cli(*job(batches)).exit_code == 0
    assert batches.stats["batches_created"] == 1


def test_a_torn_ledger_line_does_not_swallow_the_next_event(tmp_path: Path) -> None:
    from pipeline.engines.batch import Ledger

    ledger = Ledger(tmp_path)
    ledger.append("prepared", local="a", n=3)
    with ledger.path.open("ab") as f:
        f.write(b'{"event":"created","loc')  # a kill in mid-write
    ledger.append("created", local="a", batch_id="batch_1")
    assert ledger.entries()["a"].batch_id == "batch_1"


def test_cancel_folds_a_batch_that_already_finished_instead_of_cancelling_it(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(4))
    assert run_cli(*job(batches)).exit_code == 3
    batches.advance(120)
    cancelled = run_cli("batch", "cancel", *job(batches)[1:])
    assert cancelled.exit_code == 0 and "completed: 4 answered" in cancelled.output
    assert batches.stats["cancels"] == 0
    assert run_cli(*job(batches)).exit_code == 0


def test_batch_mode_shares_the_answer_cache(batches: FakeBatchServer) -> None:
    """Answers a batch brought are kept in --cache; another output's batch job then submits nothing."""
    write_table("in.csv", texts(4))
    assert run_cli(*job(batches, "--cache", "answers")).exit_code == 3
    batches.advance(120)
    assert run_cli(*job(batches, "--cache", "answers")).exit_code == 0
    other = run_cli(*job(batches, "--cache", "answers", out="out/other.parquet"))
    assert other.exit_code == 0, other.output
    assert batches.stats["batches_created"] == 1 and set(batches.lines_seen.values()) == {1}
    assert set(pl.read_parquet("out/other.parquet")["status"]) == {"ok"}
    assert "4 from the answer cache" in other.output


# ---- a flaky batch API is not a failure: exit 3 or 0, never a paging exit code ------------------------


def test_a_flaky_batch_api_only_ever_exits_3_or_0(batches: FakeBatchServer) -> None:
    """A fifth of the polls answered 429 or 500 and the results file 404 on its first download: every
    invocation of a nightly cron exits 3 (run again) or 0 (done), and nothing is paid twice."""
    batches.faults.update(retrieve_fault_rate=0.2, content_404_first=True, duration=30)
    write_table("in.csv", texts(40))
    codes = []
    for _ in range(8):
        result = run_cli(*job(batches, "--batch-max-requests", "10", "--max-wait", "60"))
        codes.append(result.exit_code)
        assert result.exit_code in (0, 3), result.output
        if result.exit_code == 0:
            break
        batches.advance(40)
    assert codes[-1] == 0, codes
    assert batches.stats["retrieve_faults"] >= 1 and batches.stats["content_404"] >= 1
    assert set(batches.lines_seen.values()) == {1}  # every line submitted once
    out = pl.read_parquet("out/r.parquet")
    assert out.height == 40 and set(out["status"]) == {"ok"}


def test_a_batch_api_down_past_max_wait_with_batches_open_exits_3(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(5))
    assert run_cli(*job(batches)).exit_code == 3
    batches.advance(120)
    batches.faults["retrieve_faults"] = [503] * 1000  # the API is down; the batch is fine
    down = run_cli(*job(batches, "--max-wait", "3"))
    assert down.exit_code == 3, down.output
    assert "did not answer well" in down.output and "nothing is lost" in down.output
    assert json.loads(Path("out/r.metrics.json").read_text())["run"]["outcome"] == "batch_pending"
    batches.faults["retrieve_faults"] = []
    back = run_cli(*job(batches))
    assert back.exit_code == 0, back.output
    assert batches.stats["batches_created"] == 1


def test_batch_spend_counts_in_the_run_that_collects_it(batches: FakeBatchServer) -> None:
    write_table("in.csv", texts(6))
    priced = ("--price-in", "2", "--price-out", "4")
    submit = run_cli(*job(batches, *priced))
    assert submit.exit_code == 3
    batches.advance(120)
    collect = run_cli(*job(batches, *priced))
    assert collect.exit_code == 0, collect.output
    m = json.loads(Path("out/r.metrics.json").read_text())
    out = pl.read_parquet("out/r.parquet")
    tokens_in, tokens_out = int(out["prompt_tokens"].sum()), int(out["completion_tokens"].sum())
    assert (m["tokens"]["prompt"], m["tokens"]["completion"]) == (tokens_in, tokens_out)
    assert f"tokens this run: {tokens_in:,} in, {tokens_out:,} out" in collect.output
    expected = (tokens_in * 2 + tokens_out * 4) / 1e6 / 2  # the batch discount: half the price
    assert m["cost"]["this_run"] == pytest.approx(expected, abs=1e-6)
    assert m["cost"]["all_runs"] == pytest.approx(expected, abs=1e-6)  # not counted twice
    again = run_cli(*job(batches, *priced))  # nothing new: this run spent nothing
    assert json.loads(Path("out/r.metrics.json").read_text())["cost"]["this_run"] == 0
    assert again.exit_code == 0


def test_status_and_cancel_of_a_job_whose_checkpoint_is_in_a_bucket(
    batches: FakeBatchServer, s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An s3:// job's ledger lives in its bucket: status and cancel from a fresh disk (another folder, another
    state folder) see the batches the run submitted, and cancel's answers reach the bucket."""
    write_table("in.csv", texts(10))
    out = "s3://lake/out/r.parquet"
    assert run_cli(*job(batches, out=out)).exit_code == 3
    fresh = tmp_path / "another-worker"
    (fresh / "in.csv").parent.mkdir()
    (fresh / "in.csv").write_bytes(Path("in.csv").read_bytes())
    monkeypatch.chdir(fresh)
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(fresh / "state"))
    status_args = job(batches, out=out)[1:]
    status_then_cancel(batches, status_args)
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path / "a-third-worker"))
    assert run_cli(*job(batches, out=out)).exit_code == 3  # the 5 cancel kept are not submitted again
    assert batches.stats["batches_created"] == 2 and sorted(batches.lines_seen.values()) == [1] * 5 + [2] * 5
    after = run_cli("batch", "status", *status_args)
    assert "5 requests in open batches, 0 waiting to be submitted, 0 refused, 5 answered" in after.output, after.output


WAIT_IN_A_NOTEBOOK = """
import json, sys, polars as pl, pipeline
df = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})
settings = dict(prompt="{text}", model="m", base_url=sys.argv[1], mode="batch", wait=True, progress=False,
                api_key_env="BATCH_KEY")
try:
    out = pipeline.complete(df, **settings)
except pipeline.Interrupted as stop:
    print(json.dumps({"interrupted": str(stop)}), flush=True)
    sys.exit(0)
print(json.dumps({"rows": out.height, "ok": out["status"].unique().to_list(),
                  "echoed": all(c == "echo: " + t for c, t in zip(out["completion"], out["text"]))}), flush=True)
"""


def test_complete_waiting_on_batches_interrupted_collects_them_in_the_next_call(batches: FakeBatchServer, tmp_path: Path) -> None:
    """The notebook's stop button while complete(mode='batch', wait=True) waits: the batches go on at the
    provider, and the same call made again, in a new process, collects them: nothing submitted twice."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("XDG_STATE_HOME", "PIPELINE_STATE_DIR")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), BATCH_KEY=KEY)

    def call() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", WAIT_IN_A_NOTEBOOK, f"{batches.url}/v1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)  # fmt: skip

    first = call()
    deadline = time.monotonic() + 60
    while batches.stats["batches_created"] < 1:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # waiting on the batch now
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    said = json.loads(out)["interrupted"]
    assert "the batches submitted are collected, not submitted again" in said, said
    ledger = tmp_path / "home/.local/state/pipeline/batches"
    assert [p.name for p in ledger.glob("*/batches/ledger.jsonl")] == ["ledger.jsonl"]  # kept, with the open batch
    batches.advance(120)  # the batch finished at the provider meanwhile
    again = call()
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert json.loads(out) == {"rows": 12, "ok": ["ok"], "echoed": True}
    assert batches.stats["batches_created"] == 1 and set(batches.lines_seen.values()) == {1}
    assert not list(ledger.iterdir())  # all collected: the answers are in the default store, the ledger is gone
    # Collected, the call made a third time is answered from the default store: nothing submitted.
    third = call()
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0 and json.loads(out)["rows"] == 12, err
    assert batches.stats["batches_created"] == 1 and batches.stats["uploads"] == 1
