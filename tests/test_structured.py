"""Structured output (JSON Schema to typed columns), conversations per row, per-row parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import chat_requests, run_cli, write_table
from tests.fakeserver import FakeLLMServer

INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "total": {"type": "number"},
        "items": {"type": "integer"},
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "lines": {"type": "array", "items": {"type": "string"}},
        "due": {"type": "object", "properties": {"days": {"type": "integer"}, "terms": {"type": "string"}}},
    },
    "required": ["vendor", "total", "items", "paid", "currency", "lines", "due"],
}
TEXT = "ACME invoice total 120 EUR"


def job(server: FakeLLMServer, *extra: str, inp: str = "in.csv") -> list[str]:
    return [
        "run", "-i", inp, "-o", "out/result.parquet", "-p", "Extract: {text}", "--base-url", f"{server.url}/v1",
        "--model", "m", "--no-progress", "--max-attempts", "3", *extra,
    ]  # fmt: skip


@pytest.fixture
def schema_file() -> str:
    Path("schema.json").write_text(json.dumps(INVOICE_SCHEMA))
    return "schema.json"


def test_schema_fields_become_typed_columns(server: FakeLLMServer, schema_file: str) -> None:
    write_table("in.csv", [{"id": 1, "text": TEXT}, {"id": 2, "text": None}])
    result = run_cli(*job(server, "--schema", schema_file, "--max-error-rate", "0.5"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.schema["total"] == pl.Float64 and out.schema["items"] == pl.Int64 and out.schema["paid"] == pl.Boolean
    assert out.schema["currency"] == pl.String and out.schema["lines"] == pl.List(pl.String)
    assert out.schema["due"] == pl.Struct({"days": pl.Int64, "terms": pl.String})
    first = out.row(0, named=True)
    words = len(f"Extract: {TEXT}".split())
    assert first["vendor"] == "vendor-value" and first["items"] == words and first["total"] == words / 2
    assert first["paid"] is True and first["currency"] == "EUR" and first["lines"] == ["lines-value"] * 2
    assert first["due"] == {"days": words, "terms": "terms-value"}
    assert out.row(1, named=True)["vendor"] is None  # the unsent row has nulls, not zeros
    (req,) = chat_requests(server)
    assert req.body["response_format"] == {"type": "json_schema", "json_schema": {"name": "fields", "schema": INVOICE_SCHEMA}}


def test_struct_layout_and_prefix_from_config(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 1, "text": TEXT}])
    Path("job.yaml").write_text(
        "input: in.csv\noutput: out/result.parquet\nprompt: 'Extract: {text}'\nmodel: m\n"
        f"base_url: {server.url}/v1\nschema_output: struct\nschema_column: invoice\nschema:\n"
        "  type: object\n  properties:\n    vendor: {type: string}\n    items: {type: integer}\n"
    )
    result = run_cli("run", "job.yaml", "--no-progress")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.schema["invoice"] == pl.Struct({"vendor": pl.String, "items": pl.Int64})
    assert out["invoice"][0] == {"vendor": "vendor-value", "items": len(f"Extract: {TEXT}".split())}


@pytest.mark.parametrize("fault", ["badjsonx1", "wrongtypex2"])
def test_invalid_reply_is_asked_again_with_the_reason(server: FakeLLMServer, schema_file: str, fault: str) -> None:
    write_table("in.csv", [{"id": 1, "text": f"{TEXT} [[fault:{fault}]]"}])
    result = run_cli(*job(server, "--schema", schema_file))
    assert result.exit_code == 0, result.output
    row = pl.read_parquet("out/result.parquet").row(0, named=True)
    failures = int(fault[-1])
    assert row["status"] == "ok" and row["attempts"] == failures + 1 and row["vendor"] == "vendor-value"
    reqs = chat_requests(server)
    assert len(reqs) == failures + 1
    retry = reqs[1].body["messages"]
    assert retry[-2]["role"] == "assistant" and retry[-1]["role"] == "user"
    assert ("not valid JSON" if "badjson" in fault else "does not match the schema") in retry[-1]["content"]


def test_reply_that_stays_invalid_is_an_error_with_the_raw_text_kept(server: FakeLLMServer, schema_file: str) -> None:
    write_table("in.csv", [{"id": 1, "text": f"{TEXT} [[fault:wrongtype]]"}, {"id": 2, "text": TEXT}])
    result = run_cli(*job(server, "--schema", schema_file, "--max-error-rate", "0.5"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    bad = out.row(0, named=True)
    assert bad["status"] == "error" and bad["attempts"] == 3
    assert "does not match the schema at vendor" in bad["error"] and "12345" in bad["completion"]
    assert bad["vendor"] is None and out.row(1, named=True)["vendor"] == "vendor-value"
    assert "invalid_output x1" in result.output


def test_json_object_mode_for_servers_without_json_schema(server: FakeLLMServer, schema_file: str) -> None:
    write_table("in.csv", [{"id": 1, "text": TEXT}])
    Path("job.yaml").write_text(
        f"input: in.csv\noutput: out/result.parquet\nprompt: 'Extract: {{text}}'\nmodel: m\nbase_url: {server.url}/v1\n"
        f"schema: {schema_file}\njson_mode: json_object\nsystem: You read invoices.\n"
    )
    result = run_cli("run", "job.yaml", "--no-progress")
    assert result.exit_code == 0, result.output
    (req,) = chat_requests(server)
    # llama.cpp's form: the schema inside json_object, and the model told in words as well.
    assert req.body["response_format"] == {"type": "json_object", "schema": INVOICE_SCHEMA}
    system = req.body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You read invoices.")
    assert "JSON Schema" in system["content"] and '"vendor"' in system["content"]
    assert pl.read_parquet("out/result.parquet")["vendor"][0] == "vendor-value"


def test_anthropic_structured_output_is_a_forced_tool() -> None:
    with FakeLLMServer(api_key="k") as server:
        write_table("in.csv", [{"id": 1, "text": TEXT}])
        Path("schema.json").write_text(json.dumps(INVOICE_SCHEMA))
        args = job(server, "--schema", "schema.json", "--provider", "anthropic", "--base-url", server.url)
        result = run_cli(*args, env={"ANTHROPIC_API_KEY": "k"})
        assert result.exit_code == 0, result.output
        (req,) = chat_requests(server)
        assert req.body["tools"][0]["input_schema"] == INVOICE_SCHEMA
        assert req.body["tool_choice"] == {"type": "tool", "name": req.body["tools"][0]["name"]}
        row = pl.read_parquet("out/result.parquet").row(0, named=True)
        assert row["vendor"] == "vendor-value" and row["due"]["terms"] == "terms-value"


def test_rows_as_conversations_and_per_row_parameters(server: FakeLLMServer) -> None:
    few_shot = [
        {"role": "user", "content": "Label: the box arrived crushed"},
        {"role": "assistant", "content": "shipping"},
        {"role": "user", "content": "Label: I was charged twice"},
    ]
    rows = [
        {"id": 1, "conversation": few_shot, "budget": 5},
        {"id": 2, "conversation": [{"role": "user", "content": "Label: the app logs me out"}], "budget": 9},
        {"id": 3, "conversation": [], "budget": 5},
    ]
    write_table("in.jsonl", rows)
    args = [
        "run", "-i", "in.jsonl", "-o", "out/result.parquet", "--messages-column", "conversation", "--param-column",
        "max_tokens=budget", "--system", "Answer with one word.", "--base-url", f"{server.url}/v1", "--model", "m",
        "--no-progress", "--max-error-rate", "0.5",
    ]  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    reqs = sorted(chat_requests(server), key=lambda r: r.body["max_tokens"])
    assert reqs[0].body["messages"] == [{"role": "system", "content": "Answer with one word."}, *few_shot]
    assert [r.body["max_tokens"] for r in reqs] == [5, 9]
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "ok", "error"]
    # The row's own max_tokens (5) cut the echo short: the parameter really came from the row.
    assert out["completion"][0] == "echo: Label: I was charged" and out["finish_reason"][0] == "length"
    assert out["finish_reason"][1] == "stop"
    assert "no messages" in out["error"][2]


def test_schema_problems_are_refused_before_sending(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 1, "text": TEXT, "vendor": "x"}])
    Path("bad.json").write_text('{"type": "object", "properties": {"a": {"type": "integr"}}}')
    result = run_cli(*job(server, "--schema", "bad.json"))
    assert result.exit_code == 2 and "not a valid JSON Schema" in result.output
    Path("clash.json").write_text('{"type": "object", "properties": {"vendor": {"type": "string"}}}')
    result = run_cli(*job(server, "--schema", "clash.json"))
    assert result.exit_code == 2 and "'vendor'" in result.output and "schema_prefix" in result.output
    result = run_cli(*job(server, "--schema", "missing.json"))
    assert result.exit_code == 2 and "missing.json" in result.output
    result = run_cli(*job(server, "--messages-column", "text"), "--prompt-column", "text")
    assert result.exit_code == 2
    assert server.requests == []


def test_free_form_fields_are_kept_as_json_text(server: FakeLLMServer) -> None:
    # "meta" has no single type, so its column is a string holding the JSON the model gave.
    schema = {
        "type": "object",
        "properties": {"vendor": {"type": "string"}, "meta": {"anyOf": [{"type": "object"}, {"type": "integer"}]}},
    }
    Path("schema.json").write_text(json.dumps(schema))
    write_table("in.csv", [{"id": 1, "text": TEXT}])
    result = run_cli(*job(server, "--schema", "schema.json"))
    assert result.exit_code == 0, result.output
    row = pl.read_parquet("out/result.parquet").row(0, named=True)
    assert row["vendor"] == "vendor-value" and json.loads(row["meta"]) is not None


def test_conversations_as_json_text_with_a_broken_cell(server: FakeLLMServer) -> None:
    good = json.dumps([{"role": "user", "content": "Label: late parcel"}])
    write_table("in.csv", [{"id": 1, "conv": good}, {"id": 2, "conv": "not json ["}, {"id": 3, "conv": '[{"text": "x"}]'}])
    args = ["run", "-i", "in.csv", "-o", "out/result.parquet", "--messages-column", "conv", "--base-url", f"{server.url}/v1"]
    result = run_cli(*args, "--model", "m", "--no-progress", "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "error", "error"]
    assert "not valid JSON" in out["error"][1] and "without 'role'" in out["error"][2]
    assert len(chat_requests(server)) == 1


def test_nested_columns_in_a_template_are_sent_as_json(server: FakeLLMServer) -> None:
    write_table("in.jsonl", [{"id": 1, "tags": ["a", "b"]}])
    args = [
        "run",
        "-i",
        "in.jsonl",
        "-o",
        "out/result.parquet",
        "-p",
        "Tags: {tags}",
        "--base-url",
        f"{server.url}/v1",
        "--model",
        "m",
    ]
    result = run_cli(*args, "--no-progress")
    assert result.exit_code == 0, result.output  # more in tests/test_tables.py
    assert [r.content for r in chat_requests(server)] == ['Tags: ["a","b"]']
