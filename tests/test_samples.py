"""Several answers per row (--n N): every choice in list columns, or one row each with --explode; one
request per row, its tokens and cost counted once; refused where the API has no n. The fake server
answers n with n choices: choice i is choice 0's text with " #i" after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import base_args, chat_requests, run_cli, texts, write_table
from tests.fakebatch import FakeBatchServer
from tests.fakeserver import FakeLLMServer

PRICES = ("--price-in", "2", "--price-out", "5")


def metrics(path: str = "out/result.metrics.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def test_n_answers_in_list_columns_from_one_request_per_row(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(4))
    result = run_cli(*base_args(server), "--n", "3", *PRICES)
    assert result.exit_code == 0, result.output
    assert [r.body["n"] for r in chat_requests(server)] == [3] * 4  # one request a row, asking for three
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "cost_usd", "completions", "finish_reasons"]
    first = "echo: Summarise: review number 0 says the product is fine"
    assert out["completions"][0].to_list() == [first, f"{first} #1", f"{first} #2"]
    assert out["finish_reasons"][0].to_list() == ["stop"] * 3
    assert out["completion"][0] == first  # the first answer, where a reader of one answer looks
    # The request's tokens cover its three answers, once, and so does its cost: as the server billed them.
    s = server.stats()
    assert int(out["prompt_tokens"].sum()) == s["billed_prompt_tokens"]
    assert int(out["completion_tokens"].sum()) == s["billed_completion_tokens"] == 4 * (10 + 11 + 11)
    assert out["cost_usd"].sum() == pytest.approx(metrics()["cost"]["this_run"], abs=1e-9)


def test_explode_gives_a_row_per_answer_in_input_order(server: FakeLLMServer) -> None:
    rows = [*texts(3), {"id": 3, "text": None}, {"id": 4, "text": "down [[fault:400]]"}]
    write_table("in.csv", rows)
    result = run_cli(*base_args(server, out="out/r.csv"), "--n", "2", "--explode", *PRICES, "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    assert "5 rows in" in result.output  # the summary counts input rows
    out = pl.read_csv("out/r.csv")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "cost_usd", "sample_index"]
    # Rows in input order, each row's answers together; a row with no answer stays one row.
    assert out["id"].to_list() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert out["sample_index"].to_list() == [0, 1, 0, 1, 0, 1, None, None]
    assert out["completion"][1] == "echo: Summarise: review number 0 says the product is fine #1"
    assert out["status"].to_list() == ["ok"] * 6 + ["error", "error"]
    # Tokens and cost on each request's first row only, so the columns still add up to the bill.
    assert out["prompt_tokens"].to_list()[:6] == [12, None, 12, None, 12, None]
    s = server.stats()
    assert int(out["completion_tokens"].sum()) == s["billed_completion_tokens"]
    assert out["cost_usd"].sum() == pytest.approx(metrics("out/r.metrics.json")["cost"]["this_run"], abs=1e-9)


def test_n_and_param_n_are_the_same_request_and_resume_sends_nothing(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    assert run_cli(*base_args(server), "--n", "2").exit_code == 0
    first = pl.read_parquet("out/result.parquet")
    assert run_cli(*base_args(server), "--param", "n=2", "--explode").exit_code == 0
    assert len(chat_requests(server)) == 3  # the same requests: answered from the checkpoint
    exploded = pl.read_parquet("out/result.parquet")
    assert exploded["completion"].to_list() == [c for cs in first["completions"].to_list() for c in cs]
    assert run_cli(*base_args(server), "--n", "1").exit_code == 0  # one answer: the plain request, sent again
    assert len(chat_requests(server)) == 6 and "n" not in chat_requests(server)[-1].body
    assert pl.read_parquet("out/result.parquet").columns == ["id", "text", *RESULT_COLUMNS]


def test_n_given_twice_must_agree(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--n", "3", "--explode", "--param", "n=1")
    assert result.exit_code == 2 and "--n 3 and --param n=1 disagree" in result.output
    assert chat_requests(server) == []


def test_a_server_that_ignores_n_gives_what_it_gave() -> None:
    """llama.cpp's server takes n and answers one choice: the list holds that one, and --explode makes one row."""
    from pipeline.engines.online import answer_fields
    from pipeline.providers.openai import OpenAIChat
    from pipeline.requests.prompts import RequestSpec
    from pipeline.tables.checkpoint import Result
    from pipeline.tables.columns import Layout
    from pipeline.tables.sink import result_frame

    spec = RequestSpec(model="m", system=None, max_tokens=None, temperature=None, top_p=None, params={"n": 3})
    reply = {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "one"}, "finish_reason": "stop"}]}
    c = OpenAIChat("http://127.0.0.1:9/v1", spec, None).parse(200, {}, json.dumps(reply).encode())
    assert c.choices == (("one", "stop"),)
    result = Result("one", 1, 1, 2, "stop", "m", "ok", None, 1, 1.0, "k", False, None, **answer_fields(c))
    inputs, results = Layout(samples=True, explode=True).shape(pl.DataFrame({"id": [7]}), result_frame([result]))
    assert inputs["id"].to_list() == [7] and results["sample_index"].to_list() == [0]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--provider", "anthropic", "--n", "2"], "Anthropic's Messages API does not do"),
        (["--explode"], "--explode makes one row per answer of --n N"),
        (["--n", "2", "--schema", '{"type": "object", "properties": {"a": {"type": "string"}}}'], "--n with --schema"),
        (["--n", "0"], "'n'"),
    ],
)
def test_n_is_refused_where_it_cannot_be_kept(server: FakeLLMServer, flags: list[str], says: str) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), *flags, env={"ANTHROPIC_API_KEY": "sk-ant-0123456789"})
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert chat_requests(server) == []


def test_n_in_batch_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-batch-test-0123456789"
    monkeypatch.setenv("BATCH_KEY", key)
    write_table("in.csv", texts(2))
    with FakeBatchServer(api_key=key) as batches:
        args = ["run", "-i", "in.csv", "-o", "out/b.parquet", "-p", "Summarise: {text}", "--base-url", f"{batches.url}/v1",
                "-m", "m", "--api-key-env", "BATCH_KEY", "--mode", "batch", "--no-progress", "--no-report", "--n", "2",
                "--explode", *PRICES]  # fmt: skip
        assert run_cli(*args).exit_code == 3
        batches.advance(120)
        done = run_cli(*args)
        assert done.exit_code == 0, done.output
    out = pl.read_parquet("out/b.parquet")
    assert out["id"].to_list() == [0, 0, 1, 1] and out["sample_index"].to_list() == [0, 1, 0, 1]
    assert out["completion"][1].endswith(" #1")
    assert out["cost_usd"].sum() == pytest.approx(metrics("out/b.metrics.json")["cost"]["this_run"], abs=1e-9)
