"""A new user's first hour: every setting from flags, messages that name the fix, a progress bar that tells the truth."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.config import RunConfig
from tests.conftest import base_args, chat_requests, run_cli, run_in_terminal, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_every_setting_is_a_flag(command: str) -> None:
    shown = run_cli(command, "--help").output
    for name, field in RunConfig.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = extra.get("flag") or "--" + (field.alias or name).replace("_", "-")
        assert re.search(rf"{re.escape(str(flag))}\b", shown), f"{name} has no flag {flag} in `pipeline {command} --help`"


def test_parameters_schema_and_json_mode_from_flags_alone(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    schema = '{"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}'
    result = run_cli(
        *base_args(server),
        "--param", "seed=7", "--param", 'stop=["\\n\\n"]', "--param", "user=team-a",
        "--schema", schema, "--json-mode", "json_object", "--schema-prefix", "x_",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    bodies = [r.body for r in chat_requests(server)]
    assert len(bodies) == 3
    for body in bodies:
        assert body["seed"] == 7 and body["stop"] == ["\n\n"] and body["user"] == "team-a"
        assert body["response_format"]["type"] == "json_object"
        assert body["response_format"]["schema"]["properties"] == {"summary": {"type": "string"}}
    out = pl.read_parquet("out/result.parquet")
    assert out.columns[-1] == "x_summary" and out["x_summary"].null_count() == 0


def test_a_bad_param_flag_says_what_it_takes(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--param", "seed")
    assert result.exit_code == 2 and "--param takes KEY=VALUE, not 'seed'" in result.output
    assert server.requests == []


def test_a_table_given_where_the_config_goes_is_named_as_such(server: FakeLLMServer) -> None:
    write_table("reviews.csv", texts(2))
    result = run_cli("run", "reviews.csv")
    assert result.exit_code == 2
    assert "reviews.csv looks like a table, not a config file. Pass it with --input" in result.output
    assert "must be a mapping" not in result.output


def test_several_unknown_keys_list_the_valid_settings_once(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    Path("job.yaml").write_text(
        "input: in.csv\noutput: out/r.parquet\nprompt: 'S: {text}'\nmodell: x\ntemprature: 0.2\n", encoding="utf-8"
    )
    out = run_cli("run", "job.yaml").output
    assert "unknown setting 'modell'. Did you mean 'model'?" in out
    assert "unknown setting 'temprature'. Did you mean 'temperature'?" in out
    assert out.count("Valid settings:") == 1


def test_a_key_variable_set_but_empty_is_called_empty(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(
        "run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "S: {text}", "--provider", "modelslab",
        "--base-url", f"{server.url}/api/v7/llm", env={"MODELSLAB_API_KEY": ""},
    )  # fmt: skip
    assert result.exit_code == 2
    assert "MODELSLAB_API_KEY, which is set but empty" in result.output
    assert server.requests == []


def test_a_run_that_got_no_answer_leaves_no_checkpoint_and_does_not_say_run_the_same_command() -> None:
    write_table("in.csv", texts(3))
    result = run_cli(
        "run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "S: {text}", "-m", "m",
        "--base-url", "http://127.0.0.1:9/v1", "--no-progress", "--max-attempts", "2",
    )  # fmt: skip
    assert result.exit_code == 8, result.output  # server_unavailable
    assert "Cannot reach the server" in result.output and "Check --base-url" in result.output
    assert "Nothing was answered, so nothing was kept; fix the cause and run again." in result.output
    assert "same command" not in result.output
    assert not Path("out/result.checkpoint").exists()


def test_a_checkpoint_with_answers_is_kept_when_a_later_run_stops(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(4))
    assert run_cli(*base_args(server), "--limit", "2").exit_code == 0
    result = run_cli(*[a if a != f"{server.url}/v1" else "http://127.0.0.1:9/v1" for a in base_args(server)])
    assert result.exit_code == 8, result.output
    assert Path("out/result.checkpoint/results.parquet").exists()


def test_the_bar_at_80_columns_has_room_and_a_ctrl_c_leaves_one_message(tmp_path: Path) -> None:
    write_table("in.csv", texts(400))
    with FakeLLMServer(latency=0.05) as slow:
        code, shown = run_in_terminal(
            "run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "S: {text}", "-m", "m",
            "--base-url", f"{slow.url}/v1", "--no-adapt", "-c", "2",
            interrupt_after=3.0,
        )  # fmt: skip
    assert code == 130, shown
    frames = [f for f in re.split(r"[\r\n]+", shown) if "|" in f and "rows/s" in f]
    assert frames, shown
    for frame in frames:
        assert len(frame.removesuffix("^C")) <= 80, frame
        bar = frame.split("|")[1]
        assert len(bar) >= 20, f"the bar is {len(bar)} characters wide at 80 columns: {frame!r}"
    # What stays on the screen (each carriage return overwrites its line): the message, and no bar left
    # over or drawn again after ^C, even if a refresh raced the interrupt.
    screen = visible_lines(shown)
    assert not [line for line in screen if "rows/s" in line], screen
    assert any("pipeline: interrupted." in line for line in screen) and "Run the same command again to resume." in shown


def visible_lines(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: text after a carriage return overwrites the line from its start."""
    lines = []
    for line in raw.split("\n"):
        cells: list[str] = []
        pos = 0
        for ch in line:
            if ch == "\r":
                pos = 0
                continue
            if pos < len(cells):
                cells[pos] = ch
            else:
                cells.append(ch)
            pos += 1
        lines.append("".join(cells).rstrip())
    return lines


def test_after_a_resume_the_bar_counts_the_pace_of_rows_sent(tmp_path: Path) -> None:
    write_table("in.csv", texts(200))
    with FakeLLMServer(latency=0.05) as slow:
        args = ["run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "S: {text}", "-m", "m", "--base-url", f"{slow.url}/v1"]
        assert run_cli(*args, "--no-progress", "--limit", "150").exit_code == 0
        code, shown = run_in_terminal(*args, "--no-adapt", "-c", "1")
    assert code == 0, shown
    # 150 rows come from the checkpoint at once; 50 take ~50 ms each. The pace shown is that of the 50, ~20 rows/s,
    # not 200 rows over the run's few seconds.
    rates = [float(r) for r in re.findall(r"([0-9.]+) rows/s", shown.split("pipeline: 200 rows")[0])]
    assert rates and max(rates) < 25, shown
    assert "pipeline: 200 rows in" in shown and "(150 ok from the checkpoint, not sent again)" in shown


def test_estimate_needs_no_output_and_run_says_it_needs_one(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    args = ["-i", "in.csv", "-p", "S: {text}", "-m", "m", "--base-url", f"{server.url}/v1"]
    est = run_cli("estimate", *args, "--price-in", "0.15", "--price-out", "0.6")
    assert est.exit_code == 0, est.output
    assert "3 requests" in est.output or "requests: 3" in est.output, est.output
    assert "$" in est.output  # priced from the flags alone
    assert chat_requests(server) == []
    run = run_cli("run", *args)
    assert run.exit_code == 2 and "'output' is required" in run.output and "--output" in run.output


# A support-ticket export as spreadsheets write it on Windows: cp1252, semicolons, a 'status' column, empty cells.
EXPORT = (
    "id;status;subject;notes\r\n"
    "1;open;Caf\xe9 machine leaks;customer sent photos\r\n"
    "2;closed;Invoice shows 12 \x80 too much;\r\n"
    "3;pending;Na\xefve question about the r\xe9sum\xe9 upload;\r\n"
).encode("latin-1")


def test_done_when_an_own_export_and_an_own_server_with_a_key_work_from_flags_alone(tmp_path: Path) -> None:
    """The issue's bar, as a data engineer runs it: a real process, a cp1252 semicolon export with a
    'status' column and empty cells, a vLLM-like server that wants a key, CSV out, nothing set up in YAML."""
    Path("tickets.csv").write_bytes(EXPORT)
    key = "vllm-secret-key-0123456789"
    with FakeLLMServer(api_key=key) as vllm:
        proc = spawn(
            "run", "-i", "tickets.csv", "--encoding", "cp1252", "--separator", ";",
            "-p", "Ticket ({status}): {subject}\nNotes: {notes:none}", "--result-prefix", "llm_",
            "--base-url", f"{vllm.url}/v1", "-m", "served-model", "--api-key-env", "MY_VLLM_KEY",
            "-o", "out/tickets.csv", "--no-progress",
            env={"MY_VLLM_KEY": key},
        )  # fmt: skip
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        received = chat_requests(vllm)
    assert len(received) == 3 and all(r.headers["authorization"] == f"Bearer {key}" for r in received)
    prompts = sorted(r.content for r in received)
    assert prompts[0] == "Ticket (closed): Invoice shows 12 € too much\nNotes: none"
    assert "Café machine leaks\nNotes: customer sent photos" in prompts[1]
    assert "Naïve question about the résumé upload" in prompts[2]
    out = pl.read_csv("out/tickets.csv")
    assert out.columns[:4] == ["id", "status", "subject", "notes"] and out.columns[4] == "llm_completion"
    assert out["status"].to_list() == ["open", "closed", "pending"]  # the input's own column, untouched
    assert out["llm_status"].to_list() == ["ok"] * 3 and out["id"].to_list() == [1, 2, 3]
    assert "pipeline: 3 rows in" in err and "3 ok, 0 errors" in err
    for f in Path(".").rglob("*"):  # the key is in no file the run left behind
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f


def test_an_anthropic_key_given_as_a_header_needs_no_key_variable(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    server.api_key = "gateway-token-abcdefgh"
    result = run_cli(
        "run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "S: {text}", "--provider", "anthropic", "-m", "claude",
        "--base-url", server.url, "--header", "x-api-key: $GATEWAY_TOKEN", "--no-progress",
        env={"GATEWAY_TOKEN": "gateway-token-abcdefgh"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [r.headers["x-api-key"] for r in chat_requests(server)] == ["gateway-token-abcdefgh"] * 2
    est = run_cli(
        "estimate", "-i", "in.csv", "-p", "S: {text}", "--provider", "anthropic", "-m", "claude",
        "--base-url", server.url, "--header", "x-api-key: $GATEWAY_TOKEN",
        env={"GATEWAY_TOKEN": "gateway-token-abcdefgh"},
    )  # fmt: skip
    assert est.exit_code == 0, est.output
    assert "exact, from the provider's count endpoint" in est.output
    assert "gateway-token-abcdefgh" not in est.output
