"""The output side of the first hour: a result prefix, CSV / JSONL / stdout outputs, and `pipeline show`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import base_args, chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer

PREFIXED = [f"llm_{c}" for c in RESULT_COLUMNS]
LONG = "a very long review " + "that goes on and on " * 12 + "and finally ends here"


def journal_lines(folder: Path) -> list[bytes]:
    return [line for j in sorted(folder.glob("journal-*.jsonl")) for line in j.read_bytes().splitlines()]


def wait_for_answers(folder: Path, at_least: int, proc: subprocess.Popen[str], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while len(journal_lines(folder)) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run recorded too few answers in time"
        time.sleep(0.05)


def read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# --- the result prefix ---------------------------------------------------------------------------


def test_input_columns_named_like_results_are_refused_then_written_beside_prefixed_results(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": i, "text": f"ticket {i}", "status": "open", "model": "X1"} for i in range(3)])
    refused = run_cli(*base_args(server))
    assert refused.exit_code == 2
    assert refused.output.startswith("pipeline: error: Input columns 'status', 'model' would clash")
    assert "pass --result-prefix llm_ to write the result columns as llm_completion, llm_status" in refused.output
    assert chat_requests(server) == []

    result = run_cli(*base_args(server), "--result-prefix", "llm_")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", "status", "model", *PREFIXED]
    assert out["status"].to_list() == ["open"] * 3 and out["model"].to_list() == ["X1"] * 3  # the input's own
    assert out["llm_status"].to_list() == ["ok"] * 3 and out["llm_model"].to_list() == ["fake-model"] * 3
    assert out["llm_completion"].to_list() == [f"echo: Summarise: ticket {i}" for i in range(3)]

    # The checkpoint keeps its own names: the same command again sends nothing.
    server.reset()
    again = run_cli(*base_args(server), "--result-prefix", "llm_")
    assert again.exit_code == 0 and chat_requests(server) == []
    assert "3 ok from the checkpoint" in again.output

    shown = run_cli("show", "out/result.parquet")
    assert shown.exit_code == 0, shown.output
    assert "llm_completion" in shown.output and "echo: Summarise: ticket 2" in shown.output
    assert shown.output.rstrip().endswith("out/result.parquet: ok: 3 rows")


def test_a_prefix_that_clashes_too_is_refused(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "x", "llm_status": "done"}])
    result = run_cli(*base_args(server), "--result-prefix", "llm_")
    assert result.exit_code == 2
    assert "Input column 'llm_status' would clash" in result.output
    assert "Choose another --result-prefix (now 'llm_')" in result.output
    assert chat_requests(server) == []


# --- output formats ------------------------------------------------------------------------------


def test_csv_output_in_input_order(server: FakeLLMServer) -> None:
    rows = texts(12)
    write_table("in.csv", rows)
    result = run_cli(*base_args(server, out="out/result.csv"), "--batch-size", "5", "--concurrency", "8")
    assert result.exit_code == 0, result.output
    assert "output: out/result.csv" in result.output
    out = pl.read_csv("out/result.csv")
    assert out.columns == ["id", "text", *RESULT_COLUMNS]
    assert out["id"].to_list() == list(range(12))
    assert out["completion"].to_list() == [f"echo: Summarise: {r['text']}" for r in rows]
    assert set(out["status"]) == {"ok"}
    assert not list(Path("out").glob(".*.tmp"))  # written under a temporary name, then moved into place


def test_nested_values_are_json_text_in_csv(server: FakeLLMServer) -> None:
    schema = {
        "type": "object",
        "properties": {"vendor": {"type": "string"}, "items": {"type": "integer"}},
        "required": ["vendor", "items"],
    }
    Path("schema.json").write_text(json.dumps(schema))
    write_table("in.jsonl", [{"id": 0, "text": "ACME invoice of 3 items", "tags": ["a", "b"]}])
    args = base_args(server, inp="in.jsonl", out="out/result.csv")
    result = run_cli(*args, "--schema", "schema.json", "--schema-output", "struct")
    assert result.exit_code == 0, result.output
    out = pl.read_csv("out/result.csv")
    assert out.columns == ["id", "text", "tags", *RESULT_COLUMNS, "extracted"]
    assert json.loads(out["extracted"][0]) == {"vendor": "vendor-value", "items": 6}  # the fake: the prompt's word count
    assert json.loads(out["tags"][0]) == ["a", "b"]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_json_lines_output_in_input_order(server: FakeLLMServer, suffix: str) -> None:
    rows = texts(7)
    write_table("in.csv", rows)
    result = run_cli(*base_args(server, out=f"out/result{suffix}"), "--batch-size", "3")
    assert result.exit_code == 0, result.output
    lines = read_jsonl(Path(f"out/result{suffix}").read_text())
    assert [list(line) for line in lines] == [["id", "text", *RESULT_COLUMNS]] * 7
    assert [line["id"] for line in lines] == list(range(7))
    assert [line["completion"] for line in lines] == [f"echo: Summarise: {r['text']}" for r in rows]
    assert lines[0]["error"] is None and lines[0]["status"] == "ok"


def test_unknown_output_extension_is_refused(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server, out="out/result.txt"))
    assert result.exit_code == 2
    assert result.output.startswith("pipeline: error: Output out/result.txt has no output format's extension")
    assert "end it in .parquet, .csv or .jsonl (or give --output - for JSON Lines on stdout)" in result.output
    assert chat_requests(server) == [] and not Path("out").exists()


def test_stdout_gets_exactly_the_rows_as_json_lines_and_messages_go_to_stderr(server: FakeLLMServer) -> None:
    rows = texts(40)
    write_table("in.csv", rows)
    args = [a for a in base_args(server, out="-") if a != "--no-progress"]  # the progress must keep off stdout too
    proc = spawn(*args, "--batch-size", "7")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    lines = read_jsonl(stdout)
    assert [line["id"] for line in lines] == list(range(40))
    assert [list(line) for line in lines] == [["id", "text", *RESULT_COLUMNS]] * 40
    assert [line["completion"] for line in lines] == [f"echo: Summarise: {r['text']}" for r in rows]
    assert "output: stdout (JSON Lines)" in stderr
    assert "checkpoint: in.stdout.checkpoint" in stderr  # in the current folder, named after the input
    assert len(journal_lines(Path("in.stdout.checkpoint"))) == 40

    # Run again from the same place: resumed, nothing sent, every row written again.
    server.reset()
    proc = spawn(*args)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert [line["id"] for line in read_jsonl(stdout)] == list(range(40))
    assert chat_requests(server) == [] and "40 ok from the checkpoint" in stderr

    # Nothing of stdout is kept; `show -` says where the answers are.
    shown = run_cli("show", "-")
    assert shown.exit_code == 2
    assert "pipeline: error: An output written to stdout (--output -) is not kept" in shown.output
    assert "(here: in.stdout.checkpoint)" in shown.output
    shown = run_cli("show", "in.stdout.checkpoint")
    assert shown.exit_code == 0, shown.output
    assert "These are the 40 answers so far in its checkpoint in.stdout.checkpoint" in shown.output


# --- pipeline show -------------------------------------------------------------------------------


def test_show_a_missing_output_in_our_words() -> None:
    result = run_cli("show", "out/nothing.parquet")
    assert result.exit_code == 2
    assert result.output == (
        "pipeline: error: out/nothing.parquet does not exist, and there is no checkpoint out/nothing.checkpoint: no run "
        "has written it or answered anything for it yet. Give the --output of a `pipeline run` (a .parquet, .csv or "
        ".jsonl file), or --checkpoint-dir for a checkpoint kept elsewhere.\n"
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_show_csv_and_jsonl_outputs_with_errors_columns_and_full(server: FakeLLMServer, suffix: str) -> None:
    write_table(
        "in.csv",
        [
            {"id": 0, "text": "short and fine"},
            {"id": 1, "text": "refused [[fault:400]]"},
            {"id": 2, "text": LONG},
        ],
    )
    out = f"out/result{suffix}"
    result = run_cli(*base_args(server, out=out), "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    long_answer = f"echo: Summarise: {LONG}"

    shown = run_cli("show", out)
    assert shown.exit_code == 0, shown.output
    header = shown.output.splitlines()[1]
    assert [h.strip() for h in header.strip("│").split("┆")] == ["id", "completion", "status", "error", "total_tokens"]
    assert "echo: Summarise: short and fine" in shown.output
    assert long_answer not in shown.output and "…" in shown.output  # long text is cut in the table
    assert shown.output.rstrip().endswith(f"{out}: error: 1 row, ok: 2 rows")

    errors_only = run_cli("show", out, "--errors")
    assert errors_only.exit_code == 0, errors_only.output
    assert "HTTP 400" in errors_only.output and "short and fine" not in errors_only.output

    chosen = run_cli("show", out, "--columns", "id, error")
    header = chosen.output.splitlines()[1]
    assert [h.strip() for h in header.strip("│").split("┆")] == ["id", "error"]

    full = run_cli("show", out, "--full", "-n", "3")
    assert full.exit_code == 0, full.output
    assert f"  completion: {long_answer}\n" in full.output  # whole, one value per line
    assert "-- row 3\n  id: 2\n" in full.output and "  error: null\n" in full.output

    missing = run_cli("show", out, "--columns", "id,nope")
    assert missing.exit_code == 2
    assert missing.output.startswith("pipeline: error: --columns: there is no column 'nope' in these rows. They have: id,")


def test_show_an_interrupted_run_from_its_checkpoint() -> None:
    with FakeLLMServer(latency=0.05) as server:
        write_table("in.csv", texts(300))
        proc = spawn(*base_args(server, out="out/result.csv"), "--concurrency", "4", "--batch-size", "50")
        wait_for_answers(Path("out/result.checkpoint"), 20, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert not Path("out/result.csv").exists()
    answered = len(journal_lines(Path("out/result.checkpoint")))

    shown = run_cli("show", "out/result.csv")
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith(
        "out/result.csv does not exist yet: its run has not finished (it is running, or was stopped). "
        f"These are the {answered} answers so far in its checkpoint out/result.checkpoint"
    )
    assert "echo: Summarise: review number" in shown.output
    assert shown.output.rstrip().endswith(f"out/result.checkpoint (checkpoint of an unfinished run): ok: {answered} answers")


def test_show_while_a_run_holds_the_lock_reads_without_disturbing_it() -> None:
    with FakeLLMServer(latency=0.2) as server:
        write_table("in.csv", texts(200))
        args = base_args(server, out="out/result.parquet")
        proc = spawn(*args, "--concurrency", "2", "--checkpoint-dir", "ck")
        try:
            wait_for_answers(Path("ck"), 4, proc)
            journals = sorted(Path("ck").glob("journal-*.jsonl"))

            elsewhere = run_cli("show", "out/result.parquet")
            assert elsewhere.exit_code == 2
            assert "there is no checkpoint out/result.checkpoint" in elsewhere.output
            assert "or --checkpoint-dir for a checkpoint kept elsewhere" in elsewhere.output

            shown = run_cli("show", "out/result.parquet", "--checkpoint-dir", "ck", "-n", "2")
            assert shown.exit_code == 0, shown.output
            assert "out/result.parquet does not exist yet" in shown.output
            assert "answers so far in its checkpoint ck" in shown.output
            assert "ck (checkpoint of an unfinished run): ok: " in shown.output
            # Read only: the run goes on, its journal is neither compacted nor moved.
            assert proc.poll() is None
            assert sorted(Path("ck").glob("journal-*.jsonl")) == journals
            assert not Path("ck/results.parquet").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr


# --- a folder of Parquet parts (--output DIR/) -----------------------------------------------------


def read_parts(folder: str) -> dict[str, pl.DataFrame]:
    """The folder as one table, by every reader that is installed."""
    import pyarrow.parquet as pq

    tables = {"polars": pl.read_parquet(folder), "pyarrow": pl.DataFrame(pl.from_arrow(pq.read_table(folder)))}
    try:
        import duckdb
    except ImportError:
        return tables
    tables["duckdb"] = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/*.parquet')").pl()  # files in name order
    return tables


def test_a_folder_output_is_parts_in_input_order_that_readers_take_as_one_table(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(230))
    result = run_cli(*base_args(server, out="out/parts/"), "--batch-size", "50", "--no-report")
    assert result.exit_code == 0, result.output
    assert "output: out/parts/ (Parquet parts" in result.output
    names = sorted(p.name for p in Path("out/parts").iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(5)]  # one a batch
    assert Path("out/parts.checkpoint").is_dir() and Path("out/parts.metrics.json").exists()
    assert not list(Path("out").glob(".parts.pending-*"))
    single = run_cli(*base_args(server, out="out/single.parquet"), "--batch-size", "50", "--no-report")
    assert single.exit_code == 0
    expected = pl.read_parquet("out/single.parquet").drop("latency_ms")
    for reader, table in read_parts("out/parts").items():
        assert table.drop("latency_ms").equals(expected), reader
    shown = run_cli("show", "out/parts/")
    assert shown.exit_code == 0 and "ok: 230 rows" in shown.output


def test_a_folder_output_rerun_replaces_its_parts_and_leaves_other_files(server: FakeLLMServer) -> None:
    Path("out/parts").mkdir(parents=True)
    Path("out/parts/README.txt").write_text("mine")
    write_table("in.csv", texts(120))
    # An existing folder is a folder output, with or without the slash.
    assert run_cli(*base_args(server, out="out/parts"), "--batch-size", "50").exit_code == 0
    assert len(list(Path("out/parts").glob("part-*.parquet"))) == 3
    assert "120" in Path("out/parts.report.html").read_text()  # the report beside it, read from the parts
    report = run_cli("report", "out/parts/", "--report", "out/again.html")
    assert report.exit_code == 0, report.output
    assert "no metrics file" not in Path("out/again.html").read_text()
    write_table("in.csv", texts(40))
    server.reset()
    assert run_cli(*base_args(server, out="out/parts"), "--batch-size", "50").exit_code == 0
    assert sorted(p.name for p in Path("out/parts").iterdir()) == ["README.txt", "part-00000.parquet"]
    assert pl.read_parquet("out/parts/*.parquet")["id"].to_list() == list(range(40))
    assert chat_requests(server) == []  # resumed from the checkpoint beside the folder


def test_a_killed_run_leaves_no_parts_and_the_rerun_resumes(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(300))
    slow = FakeLLMServer(latency=0.05)
    with slow:
        proc = spawn(*base_args(slow, out="out/parts/"), "--batch-size", "20", "--concurrency", "4")
        wait_for_answers(Path("out/parts.checkpoint"), 40, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert not Path("out/parts").exists() or not list(Path("out/parts").glob("part-*"))  # nothing half done
        first = len(chat_requests(slow))
        again = run_cli(*base_args(slow, out="out/parts/"), "--batch-size", "20", "--concurrency", "4")
        assert again.exit_code == 0, again.output
        assert len(chat_requests(slow)) - first <= 300 - 40 + 4
    assert pl.read_parquet("out/parts/")["id"].to_list() == list(range(300))
    assert not list(Path("out").glob(".parts.pending-*"))


def test_folder_outputs_that_cannot_be_are_refused_before_anything_is_sent(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(5))
    Path("out").mkdir()
    Path("out/file").write_text("x")
    for out, said in (("out/file/", "is a file"), ("s3://bucket/parts/", "s3://bucket/parts/ is")):
        result = run_cli(*base_args(server, out=out))
        assert result.exit_code == 2 and said in result.output, result.output
    assert chat_requests(server) == []
