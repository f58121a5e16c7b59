"""The spend ceiling: the pure budget, then real runs against the fake server (faults, retries,
concurrency, a ceiling reached mid-batch and the re-run that sends only what was not sent)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.config import RunConfig
from pipeline.limits.spend import NOT_SENT, Budget, Ceiling, Verdict, money
from pipeline.rules import ceiling_refusal as refusal
from pipeline.rules import worst_out
from pipeline.tables.checkpoint import read_done
from tests.conftest import base_args, chat_requests, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer

PRICES = ["--price-in", "1", "--price-out", "2"]  # $ per million tokens


def cfg(**kw: object) -> RunConfig:
    return RunConfig.model_validate({"input": "in.csv", "prompt": "{text}", **kw})


# ---- the pure budget ------------------------------------------------------------------------


def test_budget_reserves_worst_case_waits_for_settles_and_refuses_for_good() -> None:
    b = Budget((Ceiling(100.0, 1.0, 1.0, "--max-tokens-total"),), max_out=20)
    held = b.worst(30)
    assert held == (30, 20)
    assert b.check(*held) is Verdict.FITS
    b.reserve(held)
    assert b.check(*held) is Verdict.FITS  # 50 + 50: exactly the ceiling is allowed
    b.reserve(held)
    assert b.check(*held) is Verdict.WAIT  # 50 + 50 + 50 > 100, but nothing is spent yet
    b.settle(held, 0, 0)
    b.settle(held, 10, 5)  # billed far less than reserved
    assert (b.spent_in, b.spent_out, b.reserved_in, b.reserved_out) == (10, 5, 0, 0)
    assert b.check(*held) is Verdict.FITS
    b.reserve(held)
    b.settle(held, 0, 0)  # a 5xx: nothing billed, the reservation is released
    assert b.spent_in + b.spent_out == 15
    b.spent_in = 60  # 60 + 5 + 50 > 100: cannot fit even with nothing in flight
    assert b.check(*held) is Verdict.REFUSE
    assert b.check(1, 1) is Verdict.REFUSE  # reached is final: smaller requests are not sent either
    assert not b.overrun


def test_budget_money_ceiling_and_token_ceiling_together() -> None:
    money = Ceiling(0.001, 1 / 1e6, 2 / 1e6, "--max-cost")  # $1 / $2 per million
    tokens = Ceiling(1000.0, 1.0, 1.0, "--max-tokens-total")
    b = Budget((money, tokens), max_out=100)
    assert b.check(300, 100) is Verdict.FITS  # $0.0005, 400 tokens
    b.reserve((300, 100))
    b.settle((300, 100), 400, 0)
    assert b.overrun  # billed more than the bound: reported, not hidden
    assert b.check(500, 100) is Verdict.REFUSE  # 1000 tokens: the token ceiling binds first
    assert money.show(0.001) == "$0.001" and tokens.show(1000) == "1,000 tokens"


def test_worst_out_and_refusals() -> None:
    assert worst_out(cfg(max_tokens=50)) == 50
    assert worst_out(cfg(max_tokens=50, params={"max_completion_tokens": 80, "n": 2})) == 160
    assert worst_out(cfg(max_tokens=None, provider="anthropic")) == 1024
    assert worst_out(cfg(max_tokens=None)) is None
    assert refusal(cfg(max_tokens=50)) is None
    with pytest.raises(ValueError, match="without max_tokens an answer has no bound"):
        cfg(max_tokens=None, max_tokens_total=1000)
    with pytest.raises(ValueError, match="needs the prices"):
        cfg(max_cost=1.0, price_in=1.0)
    with pytest.raises(ValueError, match="taken per row from a column"):
        cfg(max_cost=1.0, price_in=1.0, price_out=1.0, param_columns={"max_tokens": "budget"})


# ---- real runs ----------------------------------------------------------------------------------


def billed(server: FakeLLMServer) -> tuple[int, int]:
    s = server.stats()
    return s.get("billed_prompt_tokens", 0), s.get("billed_completion_tokens", 0)


def spend_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("  spend:"))


def test_max_cost_without_prices_is_refused_before_anything_is_sent(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    result = run_cli(*base_args(server), "--max-cost", "0.01")
    assert result.exit_code == 2
    assert "--max-cost (max_cost) needs the prices" in result.output and "--max-tokens-total" in result.output
    assert chat_requests(server) == []
    assert not Path("out/result.parquet").exists()


def test_ceiling_mid_batch_leaves_valid_output_and_rerun_sends_only_unsent_rows(server: FakeLLMServer) -> None:
    rows = 40
    write_table("in.csv", texts(rows))
    args = [*base_args(server), *PRICES, "--max-tokens", "20", "--concurrency", "4", "--batch-size", "15"]
    # Each request: ~12 tokens in and 10 out billed ($0.000032); worst case ~150 in + 20 out.
    result = run_cli(*args, "--max-cost", "0.0005")
    assert result.exit_code == 5, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.height == rows and out["id"].to_list() == list(range(rows))  # every row, input order
    ok = out.filter(pl.col("status") == "ok")
    unsent = out.filter(pl.col("error").str.starts_with(NOT_SENT))
    assert ok.height + unsent.height == rows and 5 < ok.height < rows
    assert (unsent["status"] == "error").all()
    # What the server billed is under the ceiling, and the run counted exactly that.
    tin, tout = billed(server)
    assert tin * 1e-6 + tout * 2e-6 <= 0.0005
    assert (
        f"this run spent {money(tin * 1e-6 + tout * 2e-6)} ({tin:,} tokens in, {tout:,} out) of --max-cost {money(0.0005)}"
        in result.output
    )
    assert f"{unsent.height} rows were not sent (status error, '{NOT_SENT}')" in result.output
    assert (
        "raise --max-cost and run the same command again" in result.output and "nothing answered is paid twice" in result.output
    )
    assert "ceiling --max-cost $0.0005, reached" in spend_line(result.output)
    # The server saw one request per answered row; the checkpoint holds them all.
    assert len(chat_requests(server)) == ok.height
    assert read_done(Path("out/result.checkpoint")).height == ok.height

    server.reset()
    again = run_cli(*args, "--max-cost", "1")
    assert again.exit_code == 0, again.output
    sent = sorted(r.content for r in chat_requests(server))
    assert sent == sorted(f"Summarise: {t}" for t in unsent["text"].to_list())  # only the unsent rows
    final = pl.read_parquet("out/result.parquet")
    assert (final["status"] == "ok").all() and final.height == rows
    tin2, tout2 = billed(server)
    this_run = tin2 * 1e-6 + tout2 * 2e-6
    line = spend_line(again.output)
    assert line.startswith(f"  spend: {money(this_run)} this run (ceiling --max-cost $1.00)")
    assert f"{money(this_run + tin * 1e-6 + tout * 2e-6)} on this output in all runs" in line


def test_spend_counts_each_billed_attempt_under_faults(server: FakeLLMServer) -> None:
    """500 and 429 answers carry no usage and bill nothing; an answer that fails the schema was billed."""
    rows = [{"id": i, "text": f"row {i} is fine"} for i in range(6)]
    rows[1]["text"] += " [[fault:500x2]]"
    rows[2]["text"] += " [[fault:429@0.01x1]]"
    rows[3]["text"] += " [[fault:badjsonx1]]"
    write_table("in.csv", rows)
    schema = '{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}'
    result = run_cli(*base_args(server), "--schema", schema, "--max-tokens-total", "100000", "--concurrency", "3")
    assert result.exit_code == 0, result.output
    tin, tout = billed(server)
    assert spend_line(result.output) == (
        f"  spend: {tin + tout:,} tokens this run (ceiling --max-tokens-total 100,000 tokens), {tin + tout:,} tokens on "
        "this output in all runs"
    )
    statuses = [r.status for r in chat_requests(server)]
    assert statuses.count(500) == 2 and statuses.count(429) == 1 and statuses.count(200) == 7  # 6 rows + 1 invalid answer
    out = pl.read_parquet("out/result.parquet")
    assert (out["status"] == "ok").all()
    # The answers' own usage is less than what was billed: the invalid answer was paid for too.
    assert int(out["prompt_tokens"].sum()) + int(out["completion_tokens"].sum()) < tin + tout


def test_identical_rows_follow_their_request_and_the_rest_are_marked_not_sent(server: FakeLLMServer) -> None:
    rows = [{"id": i, "text": "same text every time"} for i in range(3)]
    rows += [{"id": 3 + i, "text": f"other row {i}" + (" [[fault:500x1]]" if i == 0 else "")} for i in range(30)]
    write_table("in.csv", rows)
    # Each request's worst case is ~130 tokens; each is billed ~15: some go out, then the ceiling.
    result = run_cli(*base_args(server), "--max-tokens", "10", "--max-tokens-total", "300", "--concurrency", "1")
    assert result.exit_code == 5, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list()[:3] == ["ok"] * 3  # one request answered three rows
    unsent = out.filter(pl.col("error").str.starts_with(NOT_SENT))
    assert unsent.height > 0 and out.filter(pl.col("status") == "ok").height + unsent.height == len(rows)
    tin, tout = billed(server)
    assert tin + tout <= 300
    assert (
        f"this run spent {tin + tout:,} tokens ({tin:,} tokens in, {tout:,} out) of --max-tokens-total 300 tokens"
        in result.output
    )
    assert "raise --max-tokens-total and run the same command again" in result.output
    answered = [r for r in chat_requests(server) if r.status == 200]
    assert len(answered) == out.filter(pl.col("status") == "ok").height - 2  # the identical rows shared one request
    assert sum(1 for r in chat_requests(server) if r.status == 500) == 1  # billed nothing
    # Its retry came back after the ceiling was reached: not sent again, and the row says so.
    row3 = out.filter(pl.col("id") == 3)
    if row3["status"][0] == "error":
        assert row3["error"][0] == f"{NOT_SENT} (after 1 failed attempt)" and row3["attempts"][0] == 1
