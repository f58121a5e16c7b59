"""User mistakes: exit 2, a message that names the problem and the fix, and no request sent."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tests.conftest import base_args, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer


def assert_refused(result: object, server: FakeLLMServer, *needles: str) -> None:
    out = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 2, out  # type: ignore[attr-defined]
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    assert server.requests == []
    assert not Path("out/result.parquet").exists()


def test_missing_file(server: FakeLLMServer) -> None:
    assert_refused(run_cli(*base_args(server, inp="nope.csv")), server, "nope.csv", "does not exist")


def test_glob_matching_nothing(server: FakeLLMServer) -> None:
    assert_refused(run_cli(*base_args(server, inp="parts/*.csv")), server, "No input file matches")


def test_missing_column_lists_the_columns_there_are(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 1, "body": "x"}])
    assert_refused(run_cli(*base_args(server)), server, "'text'", "'id', 'body'")


def test_empty_file_with_other_columns_than_the_rest(server: FakeLLMServer) -> None:
    # An empty input is fine (tests/test_tables.py), but its header must still match the others.
    write_table("a.csv", texts(2))
    Path("b.csv").write_text("id,body\n")
    result = run_cli(*base_args(server, inp="a.csv"), "--input", "b.csv")
    assert_refused(result, server, "b.csv", "same columns")


def test_unreadable_parquet(server: FakeLLMServer) -> None:
    Path("in.parquet").write_bytes(b"PAR1 this is not really parquet")
    assert_refused(run_cli(*base_args(server, inp="in.parquet")), server, "in.parquet", "could not be read")


def test_csv_that_is_not_utf8(server: FakeLLMServer) -> None:
    Path("in.csv").write_bytes(b"id,text\n1,caf\xe9 au lait\n")
    assert_refused(run_cli(*base_args(server)), server, "in.csv", "not UTF-8", "--encoding cp1252")


def test_unknown_extension(server: FakeLLMServer) -> None:
    Path("in.xlsx").write_bytes(b"...")
    assert_refused(run_cli(*base_args(server, inp="in.xlsx")), server, "in.xlsx", "CSV")


def test_bad_config_key_suggests_the_right_one(server: FakeLLMServer) -> None:
    Path("job.yaml").write_text(
        f"input: in.csv\noutput: out/result.parquet\nprompt: '{{text}}'\nmodel: m\nbase_url: {server.url}/v1\ntemprature: 0.2\n"
    )
    write_table("in.csv", texts(2))
    assert_refused(run_cli("run", "job.yaml"), server, "temprature", "Did you mean 'temperature'")


def test_wrong_type_in_config(server: FakeLLMServer) -> None:
    Path("job.yaml").write_text(
        f"input: in.csv\noutput: out/result.parquet\nprompt: '{{text}}'\nmodel: m\nbase_url: {server.url}/v1\nconcurrency: lots\n"
    )
    write_table("in.csv", texts(2))
    assert_refused(run_cli("run", "job.yaml"), server, "'concurrency'")


def test_missing_required_setting(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    assert_refused(run_cli("run", "--input", "in.csv", "--prompt", "{text}"), server, "'output' is required", "--output")


def test_config_that_is_not_yaml(server: FakeLLMServer) -> None:
    Path("job.yaml").write_text("input: [unclosed\n")
    assert_refused(run_cli("run", "job.yaml"), server, "job.yaml", "YAML")


def test_missing_api_key_variable(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--provider", "modelslab", "--base-url", f"{server.url}/api/v7/llm")
    assert_refused(result, server, "MODELSLAB_API_KEY", "export")


def test_named_key_variable_that_is_empty(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    assert_refused(run_cli(*base_args(server), "--api-key-env", "MY_KEY", env={"MY_KEY": ""}), server, "MY_KEY")


def test_input_column_clashing_with_result_columns(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 1, "text": "x", "status": "new"}])
    assert_refused(run_cli(*base_args(server)), server, "'status'", "Rename")


def test_template_without_placeholders(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    args = base_args(server)
    args[args.index("--prompt") + 1] = "Summarise this"
    assert_refused(run_cli(*args), server, "names no column")


def test_prompt_and_prompt_column_together(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    assert_refused(run_cli(*base_args(server), "--prompt-column", "text"), server, "exactly one of")


def test_mixed_columns_across_inputs(server: FakeLLMServer) -> None:
    write_table("a.csv", texts(2))
    write_table("b.csv", [{"id": 1, "body": "x"}])
    result = run_cli(*base_args(server, inp="a.csv"), "--input", "b.csv")
    assert_refused(result, server, "b.csv", "same columns")


def test_malformed_line_far_down_a_csv_is_found_before_sending(server: FakeLLMServer) -> None:
    lines = ["id,text", *(f"{i},row {i}" for i in range(5000))]
    lines[4900] = "4899,row,with,extra,fields"
    Path("in.csv").write_text("\n".join(lines) + "\n")
    assert_refused(run_cli(*base_args(server), "--batch-size", "100"), server, "in.csv", "could not be read")


def test_output_that_is_an_input_is_refused(server: FakeLLMServer) -> None:
    write_table("data.parquet", texts(3))
    result = run_cli(*base_args(server, inp="data.parquet", out="./data.parquet"))
    assert result.exit_code == 2 and "would overwrite" in result.output
    assert server.requests == [] and pl.read_parquet("data.parquet").columns == ["id", "text"]


def test_base_url_without_a_scheme(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    args = base_args(server)
    args[args.index("--base-url") + 1] = server.url.removeprefix("http://") + "/v1"
    assert_refused(run_cli(*args), server, "'base_url'", "http://")
