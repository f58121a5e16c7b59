"""Cost per row: `cost_usd` with prices, adding up to the metrics' cost and to what the server billed.

The fake server invoices every answer that carries usage (`billed_*_tokens` in its stats), so the rows'
costs are checked against what a provider would bill, not only against our own metrics: identical rows
share one request, an answer that failed the schema check and was asked again is billed too, a resumed
output keeps what each answer cost, the answer cache costs nothing, and batch mode pays half."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.tables.checkpoint import RESULT_COLUMNS, RESULT_SCHEMA
from tests.conftest import base_args, chat_requests, run_cli, spawn, texts, write_table
from tests.fakebatch import FakeBatchServer
from tests.fakeserver import FakeLLMServer
from tests.test_resume import wait_for_answers

PRICES = ("--price-in", "2", "--price-out", "5")  # per million tokens
PER_IN, PER_OUT = 2e-6, 5e-6


def metrics(path: str = "out/result.metrics.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def billed(server: FakeLLMServer) -> float:
    """What the server invoiced since its last reset, at PRICES."""
    s = server.stats()
    return s.get("billed_prompt_tokens", 0) * PER_IN + s.get("billed_completion_tokens", 0) * PER_OUT


def test_each_row_costs_its_tokens_and_the_rows_add_up_to_the_metrics_and_the_bill(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(12))
    result = run_cli(*base_args(server), *PRICES)
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "cost_usd"]  # after tokens_estimated, the last result column
    expected = out["prompt_tokens"] * PER_IN + out["completion_tokens"] * PER_OUT
    assert out["cost_usd"].to_list() == pytest.approx(expected.to_list())
    m = metrics()
    assert out["cost_usd"].sum() == pytest.approx(m["cost"]["this_run"], abs=1e-6)
    assert m["cost"]["all_runs"] == pytest.approx(m["cost"]["this_run"])
    assert out["cost_usd"].sum() == pytest.approx(billed(server))


def test_without_prices_the_output_has_exactly_the_columns_it_had(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    assert run_cli(*base_args(server, out="out/r.csv")).exit_code == 0
    assert pl.read_csv("out/r.csv").columns == ["id", "text", *RESULT_COLUMNS]


def test_identical_rows_pay_once_on_the_first_of_them(server: FakeLLMServer) -> None:
    # Row 0's text again at rows 3 and 7, in other batches of the input (--batch-size 2).
    rows = texts(8)
    for i in (3, 7):
        rows[i] = {**rows[i], "text": rows[0]["text"]}
    write_table("in.csv", rows)
    result = run_cli(*base_args(server), *PRICES, "--batch-size", "2", "--concurrency", "1")
    assert result.exit_code == 0, result.output
    assert len(chat_requests(server)) == 6  # one request for the three identical rows
    out = pl.read_parquet("out/result.parquet")
    cost = out["cost_usd"].to_list()
    assert cost[0] > 0 and cost[3] == 0 and cost[7] == 0
    assert out["request_key"][0] == out["request_key"][3] == out["request_key"][7]
    assert out["cost_usd"].sum() == pytest.approx(billed(server)) == pytest.approx(metrics()["cost"]["this_run"])

    # From the checkpoint the next run shows the same: the cost on the first row, 0 on its twins.
    again = run_cli(*base_args(server), *PRICES, "--batch-size", "2")
    assert again.exit_code == 0, again.output
    resumed = pl.read_parquet("out/result.parquet")
    assert resumed["cost_usd"].to_list() == pytest.approx(cost)
    m = metrics()
    assert m["cost"]["this_run"] == 0 and m["cost"]["all_runs"] == pytest.approx(sum(cost))


@pytest.mark.parametrize("ceiling", [(), ("--max-cost", "1")], ids=["no ceiling", "under a ceiling"])
def test_an_answer_that_failed_its_check_is_billed_on_its_row(server: FakeLLMServer, ceiling: tuple[str, ...]) -> None:
    schema = '{"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}'
    rows = [*texts(3), {"id": 3, "text": "prose first [[fault:badjsonx1]]"}]
    write_table("in.csv", rows)
    result = run_cli(*base_args(server), *PRICES, "--schema", schema, *ceiling)
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["attempts"].to_list() == [1, 1, 1, 2]
    plain = out["prompt_tokens"] * PER_IN + out["completion_tokens"] * PER_OUT
    assert out["cost_usd"][:3].to_list() == pytest.approx(plain[:3].to_list())
    assert out["cost_usd"][3] > plain[3]  # the prose answer before it was billed too
    # ...and the rows' costs are the server's bill, the metrics' cost and the billed tokens alike.
    m = metrics()
    assert out["cost_usd"].sum() == pytest.approx(billed(server)) == pytest.approx(m["cost"]["this_run"], abs=1e-6)
    s = server.stats()
    assert (m["tokens"]["billed_prompt"], m["tokens"]["billed_completion"]) == (
        s["billed_prompt_tokens"],
        s["billed_completion_tokens"],
    )


def test_a_row_that_fails_after_billed_attempts_says_what_they_cost(server: FakeLLMServer) -> None:
    schema = '{"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}'
    write_table("in.csv", [*texts(2), {"id": 2, "text": "never json [[fault:badjson]]"}])
    result = run_cli(*base_args(server), *PRICES, "--schema", schema, "--max-attempts", "2", "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "ok", "error"] and out["cost_usd"][2] > 0
    assert out["cost_usd"].sum() == pytest.approx(billed(server)) == pytest.approx(metrics()["cost"]["this_run"], abs=1e-6)


def test_a_timeout_under_a_ceiling_counts_its_worst_case_on_its_row(server: FakeLLMServer) -> None:
    """A timed-out request may have been billed without a word: the ceiling counts its worst case, and so
    does its row, so that the rows still add up to what the run counted against the ceiling."""
    write_table("in.csv", [*texts(2), {"id": 2, "text": "slow once [[fault:hangx1]]"}])
    result = run_cli(*base_args(server), *PRICES, "--max-cost", "1", "--max-tokens", "20", "--timeout", "0.5")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["attempts"].to_list() == [1, 1, 2]
    m = metrics()
    assert out["cost_usd"].sum() == pytest.approx(m["cost"]["this_run"], abs=1e-6)
    assert out["cost_usd"][2] > out["prompt_tokens"][2] * PER_IN + out["completion_tokens"][2] * PER_OUT
    assert m["cost"]["this_run"] > billed(server)  # a bound, above the bill: the timeout was not billed here


def test_a_killed_run_resumed_shows_every_answer_s_cost_once() -> None:
    args = ["run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "Summarise: {text}", "--model", "fake-model",
            "--concurrency", "4", "--batch-size", "20", "--no-progress", *PRICES]  # fmt: skip
    rows = texts(120)
    for i in range(100, 120):  # the last rows repeat the first ones: answered by the killed run
        rows[i] = {**rows[i], "text": rows[i - 100]["text"]}
    write_table("in.csv", rows)
    with FakeLLMServer(latency=0.05) as server:
        proc = spawn(*args, "--base-url", f"{server.url}/v1")
        wait_for_answers(Path("out/result.checkpoint"), 40, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        server.reset()
        result = run_cli(*args, "--base-url", f"{server.url}/v1")
        assert result.exit_code == 0, result.output
        sent_again = Counter(r.content for r in chat_requests(server))
        second_bill = billed(server)
    out = pl.read_parquet("out/result.parquet")
    assert out["id"].to_list() == list(range(120)) and set(out["status"]) == {"ok"}
    m = metrics()
    # This run: what it sent, as billed; all runs: the whole output, the earlier answers at what they cost.
    assert m["cost"]["this_run"] == pytest.approx(second_bill, abs=1e-6)
    assert out["cost_usd"].sum() == pytest.approx(m["cost"]["all_runs"], abs=1e-6)
    assert all(n == 1 for n in sent_again.values())
    # The repeated rows carry no cost of their own: their first occurrence does.
    assert out["cost_usd"][100:].sum() == 0 and (out["cost_usd"][:100] > 0).all()


def test_a_checkpoint_from_before_cost_per_row_is_priced_by_its_tokens(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(4))
    assert run_cli(*base_args(server)).exit_code == 0  # no prices: the checkpoint's cost is null
    folder = Path("out/result.checkpoint")
    for journal in folder.glob("journal-*.jsonl"):  # as an older version wrote it: the twelve columns only
        lines = [json.loads(line) for line in journal.read_text().splitlines()]
        journal.write_text("".join(json.dumps({k: v for k, v in x.items() if k in RESULT_SCHEMA}) + "\n" for x in lines))
    if (folder / "results.parquet").exists():
        pl.read_parquet(folder / "results.parquet").select(list(RESULT_SCHEMA)).write_parquet(folder / "results.parquet")
    again = run_cli(*base_args(server), *PRICES)
    assert again.exit_code == 0, again.output
    out = pl.read_parquet("out/result.parquet")
    assert out["cost_usd"].to_list() == pytest.approx(
        (out["prompt_tokens"] * PER_IN + out["completion_tokens"] * PER_OUT).to_list()
    )
    m = metrics()
    assert m["cost"]["this_run"] == 0 and m["cost"]["all_runs"] == pytest.approx(out["cost_usd"].sum())


def test_answers_from_the_cache_cost_this_output_nothing(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(5))
    assert run_cli(*base_args(server), *PRICES, "--cache", "cache").exit_code == 0
    first = pl.read_parquet("out/result.parquet")["cost_usd"].sum()
    assert first > 0
    other = run_cli(*base_args(server, out="out/other.parquet"), *PRICES, "--cache", "cache")
    assert other.exit_code == 0, other.output
    out = pl.read_parquet("out/other.parquet")
    assert out["cost_usd"].to_list() == [0.0] * 5
    m = metrics("out/other.metrics.json")
    assert m["cost"]["this_run"] == 0 and m["cost"]["all_runs"] == 0
    # ...and stays so when that output is resumed from its own checkpoint.
    assert run_cli(*base_args(server, out="out/other.parquet"), *PRICES).exit_code == 0
    assert pl.read_parquet("out/other.parquet")["cost_usd"].sum() == 0
    assert metrics("out/other.metrics.json")["cost"]["all_runs"] == 0


def test_batch_mode_rows_cost_half_and_add_up_in_the_run_that_collects(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-batch-test-0123456789"
    monkeypatch.setenv("BATCH_KEY", key)
    rows = texts(6)
    rows[5] = {**rows[5], "text": rows[0]["text"]}  # one line for two rows
    write_table("in.csv", rows)
    with FakeBatchServer(api_key=key) as batches:
        args = ["run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "Summarise: {text}", "--base-url", f"{batches.url}/v1",
                "-m", "gpt-test", "--api-key-env", "BATCH_KEY", "--mode", "batch", "--no-progress", "--no-report", *PRICES]  # fmt: skip
        assert run_cli(*args).exit_code == 3
        batches.advance(120)
        collect = run_cli(*args)
        assert collect.exit_code == 0, collect.output
    out = pl.read_parquet("out/r.parquet")
    half = (out["prompt_tokens"] * PER_IN + out["completion_tokens"] * PER_OUT) / 2
    assert out["cost_usd"][:5].to_list() == pytest.approx(half[:5].to_list())
    assert out["cost_usd"][5] == 0  # the line was paid on row 0
    m = metrics("out/r.metrics.json")
    assert m["cost"]["batch_discount"] is True
    assert out["cost_usd"].sum() == pytest.approx(m["cost"]["this_run"], abs=1e-6)
    assert m["cost"]["all_runs"] == pytest.approx(m["cost"]["this_run"])
