"""Tool calls: --tools and --tool-choice on the OpenAI, Anthropic and ModelsLab wire formats, the calls in a
tool_calls column, a forced tool's arguments as typed columns, refusals before anything is sent, resume
and batch mode. The fake server answers a request that offers tools with a call whose arguments are a
deterministic instance of the tool's parameters (integers: the prompt's word count)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import base_args, chat_requests, run_cli, write_table
from tests.fakebatch import FakeBatchServer
from tests.fakeserver import FakeLLMServer

SENTIMENT = {
    "type": "function",
    "function": {
        "name": "record_sentiment",
        "description": "Record a review's sentiment",
        "parameters": {
            "type": "object",
            "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}, "stars": {"type": "integer"}},
            "required": ["sentiment", "stars"],
        },
    },
}
SPAM = {
    "type": "function",
    "function": {"name": "flag_spam", "parameters": {"type": "object", "properties": {"why": {"type": "string"}}}},
}
YAML_TOOLS = """tools:
  - type: function
    function:
      name: record_sentiment
      description: Record a review's sentiment
      parameters:
        type: object
        properties:
          sentiment: {type: string, enum: [positive, negative]}
          stars: {type: integer}
        required: [sentiment, stars]
  - name: flag_spam              # a bare function is taken too
    parameters: {type: object, properties: {why: {type: string}}}
"""
ROWS = [{"id": 0, "text": "great value"}, {"id": 1, "text": "broke after a day [[fault:notool]]"}]


def calls(cell: str | None) -> Any:
    return None if cell is None else json.loads(cell)


def test_openai_tools_go_out_as_given_and_the_calls_come_back_in_a_column(server: FakeLLMServer) -> None:
    Path("tools.yaml").write_text(YAML_TOOLS)
    write_table("in.csv", ROWS)
    result = run_cli(*base_args(server), "--tools", "tools.yaml", "--tool-choice", "auto")
    assert result.exit_code == 0, result.output
    sent = chat_requests(server)[0].body
    assert sent["tools"] == [SENTIMENT, {"type": "function", "function": SPAM["function"]}]
    assert sent["tool_choice"] == "auto"
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "tool_calls"]
    # A call and no text: an answer all the same (ok, completion ""), the call's arguments as an object.
    assert out["status"].to_list() == ["ok", "ok"]
    assert out["completion"][0] == "" and out["finish_reason"][0] == "tool_calls"
    assert calls(out["tool_calls"][0]) == [{"name": "record_sentiment", "arguments": {"sentiment": "positive", "stars": 3}}]
    # A model that answered in words: its text, and no calls.
    assert out["completion"][1] == "echo: Summarise: broke after a day" and calls(out["tool_calls"][1]) == []


@pytest.mark.parametrize(
    ("choice", "wire"),
    [
        ("required", {"type": "any"}),
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("flag_spam", {"type": "tool", "name": "flag_spam"}),
    ],
)
def test_anthropic_gets_its_own_tool_form(server: FakeLLMServer, choice: str, wire: dict[str, str]) -> None:
    Path("tools.json").write_text(json.dumps([SENTIMENT, SPAM]))
    write_table("in.csv", ROWS[:1])
    args = ["run", "-i", "in.csv", "-o", "out/a.jsonl", "-p", "Review: {text}", "--provider", "anthropic",
            "--base-url", server.url, "-m", "claude-test", "--no-progress", "--no-report", "--api-key-env", "KEYVAR",
            "--tools", "tools.json", "--tool-choice", choice]  # fmt: skip
    result = run_cli(*args, env={"KEYVAR": "sk-ant-test-key"})
    assert result.exit_code == 0, result.output
    sent = chat_requests(server)[0].body
    assert sent["tools"] == [
        {
            "name": "record_sentiment",
            "input_schema": SENTIMENT["function"]["parameters"],
            "description": "Record a review's sentiment",
        },
        {"name": "flag_spam", "input_schema": SPAM["function"]["parameters"]},
    ]
    assert sent["tool_choice"] == wire
    row = json.loads(Path("out/a.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok"
    if choice == "none":
        assert calls(row["tool_calls"]) == [] and row["completion"] == "echo: Review: great value"
    else:
        name = "flag_spam" if choice == "flag_spam" else "record_sentiment"
        assert [c["name"] for c in calls(row["tool_calls"])] == [name]
        assert row["completion"] == "" and row["finish_reason"] == "tool_use"


def test_modelslab_answers_that_only_call_a_tool_are_ok(server: FakeLLMServer) -> None:
    Path("tools.json").write_text(json.dumps([SENTIMENT]))
    write_table("in.csv", ROWS[:1])
    args = ["run", "-i", "in.csv", "-o", "out/m.parquet", "-p", "Review: {text}", "--provider", "modelslab",
            "--base-url", f"{server.url}/api/v7/llm", "--no-progress", "--no-report", "--tools", "tools.json"]  # fmt: skip
    result = run_cli(*args, env={"MODELSLAB_API_KEY": "ml-test-key-123456"})
    assert result.exit_code == 0, result.output
    assert chat_requests(server)[0].body["tools"] == [SENTIMENT]
    out = pl.read_parquet("out/m.parquet")
    assert out["status"][0] == "ok" and calls(out["tool_calls"][0])[0]["name"] == "record_sentiment"


def test_a_forced_tool_becomes_typed_columns_and_bad_arguments_are_asked_again(server: FakeLLMServer) -> None:
    Path("tools.json").write_text(json.dumps([SENTIMENT, SPAM]))
    write_table("in.csv", [*ROWS[:1], {"id": 1, "text": "odd one [[fault:wrongtypex1]]"}])
    args = [*base_args(server), "--tools", "tools.json", "--tool-choice", "record_sentiment", "--tool-columns"]
    result = run_cli(*args, "--schema-prefix", "x_")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "tool_calls", "x_sentiment", "x_stars"]
    assert out.schema["x_stars"] == pl.Int64 and out["x_sentiment"].to_list() == ["positive", "positive"]
    assert out["x_stars"].to_list() == [3, 3]  # the words of each prompt, as the fake counts them
    assert out["completion"][0] == '{"sentiment":"positive","stars":3}'  # the arguments are the answer, as with --schema
    assert out["attempts"].to_list() == [1, 2]
    again = [r.body for r in chat_requests(server) if "odd one" in json.dumps(r.body)][-1]
    assert again["tool_choice"] == {"type": "function", "function": {"name": "record_sentiment"}}
    assert "Call record_sentiment again with corrected arguments" in again["messages"][-1]["content"]


def test_a_forced_tool_never_called_fails_the_row_with_what_the_model_said(server: FakeLLMServer) -> None:
    Path("tools.json").write_text(json.dumps([SENTIMENT]))
    write_table("in.csv", ROWS)
    args = [*base_args(server), "--tools", "tools.json", "--tool-choice", "required", "--tool-columns"]
    result = run_cli(*args, "--max-attempts", "2", "--max-error-rate", "0.5", "--schema-output", "struct")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "error"]
    assert out["error"][1].startswith("reply does not call the tool record_sentiment")
    assert out["extracted"][0] == {"sentiment": "positive", "stars": 3} and out["extracted"][1] is None


def test_the_request_key_includes_the_tools(server: FakeLLMServer) -> None:
    Path("tools.json").write_text(json.dumps([SENTIMENT]))
    write_table("in.csv", ROWS[:1])
    assert run_cli(*base_args(server), "--tools", "tools.json").exit_code == 0
    assert run_cli(*base_args(server), "--tools", "tools.json").exit_code == 0
    assert len(chat_requests(server)) == 1  # unchanged: answered from the checkpoint
    Path("tools.json").write_text(json.dumps([SENTIMENT, SPAM]))
    assert run_cli(*base_args(server), "--tools", "tools.json").exit_code == 0
    assert len(chat_requests(server)) == 2  # a tool more: another request
    assert run_cli(*base_args(server), "--tools", "tools.json", "--tool-choice", "flag_spam").exit_code == 0
    assert len(chat_requests(server)) == 3  # another choice: another request
    assert run_cli(*base_args(server)).exit_code == 0
    assert len(chat_requests(server)) == 4  # no tools at all: another request, and no tool_calls column
    assert "tool_calls" not in pl.read_parquet("out/result.parquet").columns


def test_tools_inline_in_a_config_file_run_from_another_folder(server: FakeLLMServer, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    write_table(job / "in.csv", ROWS[:1])
    (job / "tools.yaml").write_text(YAML_TOOLS)
    config = {
        "input": "in.csv", "output": "out/r.parquet", "prompt": "Review: {text}", "base_url": f"{server.url}/v1",
        "model": "m", "progress": False, "tools": "tools.yaml", "tool_choice": "flag_spam",
    }  # fmt: skip
    (job / "file.yaml").write_text(json.dumps(config))
    (job / "inline.yaml").write_text(json.dumps({**config, "output": "out/i.parquet", "tools": [SPAM]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import os

    os.chdir(elsewhere)
    for name in ("file", "inline"):
        result = run_cli("run", str(job / f"{name}.yaml"))
        assert result.exit_code == 0, result.output
    assert calls(pl.read_parquet(job / "out/i.parquet")["tool_calls"][0]) == [
        {"name": "flag_spam", "arguments": {"why": "why-value"}}
    ]
    assert calls(pl.read_parquet(job / "out/r.parquet")["tool_calls"][0])[0]["name"] == "flag_spam"


@pytest.mark.parametrize(
    ("setup", "flags", "says"),
    [
        ("", ["--tools", "nowhere.json"], "Tools file nowhere.json does not exist"),
        ("tools: [oops", ["--tools", "t.yaml"], "Tools file t.yaml is not valid YAML"),
        ('[{"type": "function", "function": {"name": "has space"}}]', ["--tools", "t.json"], "has the name 'has space'"),
        ('[{"function": {"name": "a"}}, {"name": "a"}]', ["--tools", "t.json"], "defines the tool 'a' twice"),
        ('[{"name": "a", "parameters": {"type": "string"}}]', ["--tools", "t.json"], "must be a JSON Schema of an object"),
        ("[]", ["--tools", "t.json"], "must be a non-empty list"),
        ("[1]", ["--tools", "t.json"], "Tool 1 of the tools file t.json is not an OpenAI tool definition"),
        (json.dumps([SENTIMENT]), ["--tools", "t.json", "--tool-choice", "nope"], "neither auto, none, required nor one"),
        (json.dumps([SENTIMENT, SPAM]), ["--tools", "t.json", "--tool-columns"], "force it with --tool-choice NAME"),
        (json.dumps([SPAM]), ["--tools", "t.json", "--tool-choice", "flag_spam", "--tool-columns", "--schema-prefix", ""], None),
        (
            json.dumps([SENTIMENT]),
            ["--tools", "t.json", "--schema", '{"type": "object", "properties": {"a": {}}}'],
            "--schema and --tools",
        ),
        ("", ["--tool-choice", "auto"], "--tool-choice is for --tools"),
    ],
)
def test_bad_tools_are_refused_before_anything_is_sent(
    server: FakeLLMServer, setup: str, flags: list[str], says: str | None
) -> None:
    if setup:
        Path("t.json" if "--tools" in flags and "t.json" in flags else "t.yaml").write_text(setup)
    write_table("in.csv", ROWS[:1])
    result = run_cli(*base_args(server), *flags)
    if says is None:  # a forced tool whose parameters make a column: fine
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert chat_requests(server) == []


def test_a_forced_tool_whose_parameters_clash_with_an_input_column_is_refused(server: FakeLLMServer) -> None:
    Path("t.json").write_text(
        json.dumps([{"name": "f", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}])
    )
    write_table("in.csv", ROWS[:1])
    result = run_cli(*base_args(server), "--tools", "t.json", "--tool-choice", "f", "--tool-columns")
    assert result.exit_code == 2 and "--schema-prefix" in result.output
    assert chat_requests(server) == []


def test_tool_calls_in_batch_mode_on_openai_and_anthropic(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-batch-test-0123456789"
    monkeypatch.setenv("BATCH_KEY", key)
    Path("tools.json").write_text(json.dumps([SENTIMENT, SPAM]))
    write_table("in.csv", ROWS[:1])
    with FakeBatchServer(api_key=key) as batches:
        for provider, base in (("openai", f"{batches.url}/v1"), ("anthropic", batches.url)):
            args = ["run", "-i", "in.csv", "-o", f"out/{provider}.parquet", "-p", "Review: {text}", "--base-url", base,
                    "-m", "m", "--api-key-env", "BATCH_KEY", "--mode", "batch", "--no-progress", "--no-report",
                    "--provider", provider, "--tools", "tools.json", "--tool-choice", "record_sentiment", "--tool-columns"]  # fmt: skip
            assert run_cli(*args).exit_code == 3
            batches.advance(120)
            done = run_cli(*args)
            assert done.exit_code == 0, done.output
            out = pl.read_parquet(f"out/{provider}.parquet")
            assert out["sentiment"].to_list() == ["positive"] and out["stars"].to_list() == [3]
            assert calls(out["tool_calls"][0])[0]["name"] == "record_sentiment"
