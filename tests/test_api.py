"""The Python API against the fake provider: DataFrames in and out, parity with the CLI, resume
through checkpoint_dir, use inside a running event loop, the exception tree, and run()'s result."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

import pipeline
from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import ROOT, chat_requests, run_cli, write_table
from tests.fakeserver import FakeLLMServer


def reviews(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(n)), "text": [f"review number {i} says it works" for i in range(n)]})


def settings(server: FakeLLMServer, **more: object) -> dict[str, object]:
    return {"prompt": "Summarise: {text}", "base_url": f"{server.url}/v1", "model": "fake-model", "progress": False, **more}


def test_complete_returns_the_table_with_result_columns_in_input_order(server: FakeLLMServer) -> None:
    df = reviews(25)
    out = pipeline.complete(df, **settings(server, concurrency=4, batch_size=7))
    assert isinstance(out, pl.DataFrame)
    assert out.columns == ["id", "text", *RESULT_COLUMNS]
    assert out["id"].to_list() == list(range(25))
    assert set(out["status"]) == {"ok"}
    assert out["completion"].to_list() == [f"echo: Summarise: review number {i} says it works" for i in range(25)]
    assert sorted(r.content for r in chat_requests(server)) == sorted(f"Summarise: {t}" for t in df["text"])
    assert not list(Path.cwd().iterdir())  # no output, no checkpoint, no metrics left behind


def test_complete_and_the_cli_give_the_same_output(server: FakeLLMServer) -> None:
    """Same input and settings: identical columns, order, types, request keys and answers."""
    df = reviews(30).with_columns(notes=pl.when(pl.col("id") % 3 == 0).then(None).otherwise(pl.lit("n")))
    write_table("in.parquet", df)
    schema = '{"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}'
    flags = ["--prompt", "{text} ({notes})", "--system", "Be brief.", "--max-tokens", "40", "--schema", schema]
    result = run_cli(
        "run", "-i", "in.parquet", "-o", "out/cli.parquet", "--base-url", f"{server.url}/v1", "-m", "fake-model",
        "--max-error-rate", "1", "--no-progress", *flags,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cli_out = pl.read_parquet("out/cli.parquet")
    server.reset()
    api_out = pipeline.complete(
        df,
        prompt="{text} ({notes})",
        system="Be brief.",
        max_tokens=40,
        schema=schema,
        base_url=f"{server.url}/v1",
        model="fake-model",
        progress=False,
    )
    assert api_out.columns == cli_out.columns
    assert api_out.schema == cli_out.schema
    assert api_out["request_key"].to_list() == cli_out["request_key"].to_list()
    assert (api_out["status"] == "error").sum() == 10  # the null notes: not sent, in both
    volatile = ["latency_ms"]
    assert_frame_equal(api_out.drop(volatile), cli_out.drop(volatile))


@pytest.mark.parametrize("kind", ["lazy", "arrow", "arrow_batch"])
def test_complete_takes_lazy_frames_and_arrow_tables(server: FakeLLMServer, kind: str) -> None:
    df = reviews(5)
    table = {"lazy": df.lazy(), "arrow": df.to_arrow(), "arrow_batch": df.to_arrow().to_batches()[0]}[kind]
    out = pipeline.complete(table, **settings(server))
    frame = out if isinstance(out, pl.DataFrame) else pl.from_arrow(out)
    assert isinstance(frame, pl.DataFrame)
    assert frame["id"].to_list() == list(range(5)) and set(frame["status"]) == {"ok"}


def test_complete_gives_back_the_kind_of_frame_it_was_given(server: FakeLLMServer) -> None:
    """pandas in, pandas out (its index and dtypes kept); Arrow in, Arrow out (its schema kept); polars stays polars."""
    pd = pytest.importorskip("pandas", reason="pandas is not a dependency; the conversion is tested where it is installed")
    given = pd.DataFrame(
        {"code": ["00042", "007"], "n": [1, None], "text": ["a b", "c d"]}, index=pd.Index([10, 20], name="ticket")
    ).astype({"code": "string", "n": "Int64"})
    out = pipeline.complete(given, **settings(server))
    assert isinstance(out, pd.DataFrame)
    assert list(out.index) == [10, 20] and out.index.name == "ticket"
    assert list(out.columns) == ["code", "n", "text", *RESULT_COLUMNS]
    assert out.dtypes["code"] == "string" and out.dtypes["n"] == "Int64" and list(out["code"]) == ["00042", "007"]
    assert out.loc[20, "completion"] == "echo: Summarise: c d"
    given["summary"] = out["completion"]  # aligned on the caller's own index
    assert list(given["summary"]) == ["echo: Summarise: a b", "echo: Summarise: c d"]

    small = pipeline.complete(given[["text"]], **settings(server, limit=1))
    assert isinstance(small, pd.DataFrame) and list(small.index) == [10]

    schema = pa.schema([pa.field("code", pa.string()), pa.field("text", pa.large_string())], metadata={b"origin": b"crm"})
    arrow = pa.table({"code": ["00042", "7"], "text": ["a b", "c d"]}, schema=schema)
    out_arrow = pipeline.complete(arrow, **settings(server))
    assert isinstance(out_arrow, pa.Table)
    assert out_arrow.schema.field("code").type == pa.string() and out_arrow.schema.metadata == {b"origin": b"crm"}
    assert out_arrow.column_names == ["code", "text", *RESULT_COLUMNS]
    assert out_arrow.column("completion").to_pylist() == ["echo: Summarise: a b", "echo: Summarise: c d"]
    batch = pipeline.complete(arrow.to_batches()[0], **settings(server))
    assert isinstance(batch, pa.RecordBatch) and batch.num_rows == 2

    assert isinstance(pipeline.complete(pl.from_arrow(arrow), **settings(server)), pl.DataFrame)


def test_api_key_is_used_and_written_nowhere(server: FakeLLMServer, tmp_path: Path) -> None:
    key = "sk-notebook-ONLY-IN-MEMORY-4711"
    with FakeLLMServer(api_key=key) as keyed:
        out = pipeline.complete(
            reviews(4), **settings(keyed, checkpoint_dir="answers", metrics="out/m.metrics.json", api_key=key)
        )
        assert set(out["status"]) == {"ok"}
        assert {r.headers["authorization"] for r in chat_requests(keyed)} == {f"Bearer {key}"}
        result = pipeline.run(
            input=str(write_table("in.csv", reviews(3))), output="out/r.parquet", api_key=key, **settings(keyed)
        )
        assert result.succeeded and result.ok == 3
        with pytest.raises(pipeline.RunStopped, match="HTTP 401") as stopped:  # a wrong key: fatal, and masked in the message
            pipeline.complete(reviews(1), **settings(keyed, api_key="sk-wrong-key-0000"))
        assert "sk-wrong-key-0000" not in str(stopped.value)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "m.metrics.json" for p in files) and any(p.suffix == ".html" for p in files)
    assert any("answers" in p.parts for p in files)
    for p in files:
        assert key.encode() not in p.read_bytes(), p
    with pytest.raises(pipeline.ConfigError, match="api_key= takes the key as non-empty text"):
        pipeline.complete(reviews(1), **settings(server, api_key=""))


def test_null_values_and_dtypes_apply_to_a_table_in_memory(server: FakeLLMServer) -> None:
    df = pl.DataFrame({"day": ["2024-01-05", "2024-02-01", "2024-03-09"], "text": ["a b", "N/A", "c d"]})
    out = pipeline.complete(df, **settings(server, null_values=["N/A"], dtypes={"day": "date"}, max_error_rate=1.0))
    assert out.schema["day"] == pl.Date and out["text"].to_list() == ["a b", None, "c d"]
    assert out["status"].to_list() == ["ok", "error", "ok"]
    assert sorted(r.content for r in chat_requests(server)) == ["Summarise: a b", "Summarise: c d"]
    with pytest.raises(pipeline.InputError, match="--dtype text=int: row 1 of the table passed in"):
        pipeline.complete(df, **settings(server, dtypes={"text": "int"}))


def test_pandas_frame_when_pandas_is_installed(server: FakeLLMServer) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is not a dependency; the conversion is tested where it is installed")
    out = pipeline.complete(pd.DataFrame({"text": ["a b", "c d"]}), **settings(server))
    assert out["completion"].to_list() == ["echo: Summarise: a b", "echo: Summarise: c d"]


def test_checkpoint_dir_resumes_a_call(server: FakeLLMServer) -> None:
    df = reviews(12)
    first = pipeline.complete(df.head(5), **settings(server, checkpoint_dir="answers"))
    assert first.height == 5 and len(chat_requests(server)) == 5
    server.reset()
    again = pipeline.complete(df, **settings(server, checkpoint_dir="answers"))
    assert sorted(r.content for r in chat_requests(server)) == sorted(f"Summarise: {t}" for t in df["text"][5:])
    assert again["id"].to_list() == list(range(12)) and set(again["status"]) == {"ok"}
    assert again.head(5).drop("latency_ms").equals(first.drop("latency_ms"))


def test_sync_form_inside_a_running_event_loop_and_the_async_form(server: FakeLLMServer) -> None:
    """Jupyter's cells run inside a loop: complete() must still work there, and acomplete() on it."""
    df = reviews(6)

    async def notebook_cell() -> tuple[pl.DataFrame, pl.DataFrame]:
        blocking = pipeline.complete(df, **settings(server))
        awaited = await pipeline.acomplete(df.lazy(), **settings(server, concurrency=2))
        return blocking, awaited

    blocking, awaited = asyncio.run(notebook_cell())
    # The second call's answers come from the default store: no request made for them (attempts 0).
    assert blocking.drop("latency_ms", "attempts").equals(awaited.drop("latency_ms", "attempts"))
    assert len(chat_requests(server)) == 6 and awaited["attempts"].to_list() == [0] * 6
    assert set(blocking["status"]) == {"ok"} and blocking.height == 6


def test_errors_are_the_package_tree_and_nothing_is_sent(server: FakeLLMServer) -> None:
    df = reviews(3)
    with pytest.raises(pipeline.InputError, match="'body'"):
        pipeline.complete(df, **settings(server, prompt="{body}"))
    with pytest.raises(pipeline.ConfigError, match=r"unknown setting 'max_token'\. Did you mean 'max_tokens'"):
        pipeline.complete(df, **settings(server, max_token=5))
    with pytest.raises(pipeline.ConfigError, match=r"pipeline\.run\(\)"):
        pipeline.complete(df, **settings(server, output="x.parquet"))
    with pytest.raises(pipeline.InputError, match="not list"):
        pipeline.complete([{"text": "a"}], **settings(server))
    assert issubclass(pipeline.ConfigError, pipeline.UserError) and issubclass(pipeline.UserError, pipeline.PipelineError)
    assert chat_requests(server) == []


def test_a_refused_key_raises_auth_error_with_the_result_and_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-wrong-key-123456")
    with FakeLLMServer(api_key="sk-right-key-123456") as server, pytest.raises(pipeline.AuthError) as caught:
        pipeline.complete(reviews(20), **settings(server, api_key_env="MY_KEY", checkpoint_dir="answers"))
    assert isinstance(caught.value, pipeline.RunStopped)  # an except RunStopped written before still catches it
    result = caught.value.result
    assert isinstance(result, pipeline.RunResult)
    assert result.outcome == "auth_refused" and result.exit_code == 6 and result.ok == 0
    frame = caught.value.frame  # the table so far: every row, none sent, each saying why
    assert frame.height == 20 and set(frame["status"]) == {"error"}
    assert frame["error"].str.starts_with("not sent: the run stopped early (the provider refused the key)").all()
    assert "sk-wrong" not in str(caught.value) and "sk-wrong" not in repr(result.metrics)


def test_run_returns_a_result_instead_of_an_exit_code(server: FakeLLMServer) -> None:
    rows = [{"id": i, "text": f"row {i}" + (" [[fault:400]]" if i == 3 else "")} for i in range(8)]
    write_table("in.csv", rows)
    config = Path("job.yaml")
    config.write_text(f"input: in.csv\noutput: out/r.parquet\nprompt: 'Summarise: {{text}}'\nbase_url: {server.url}/v1\n")
    result = pipeline.run(str(config), model="fake-model", price_in=1, price_out=2, progress=False, make_report=False)
    assert (result.outcome, result.exit_code, result.succeeded) == ("error_rate", 4, False)
    with pytest.raises(pipeline.ErrorRateExceeded) as caught:  # for an orchestrator's task that should fail
        result.raise_for_outcome()
    assert caught.value.result is result and caught.value.exit_code == 4
    assert "1 of 8 rows failed" in (result.reason or "")
    assert (result.rows, result.ok, result.errors, result.from_checkpoint) == (8, 7, 1, 0)
    assert result.requests == 8 and result.prompt_tokens > 0 and result.cost is not None and result.cost > 0
    assert result.output == "out/r.parquet" and Path(result.output).exists()
    assert result.metrics_file is not None and Path(result.metrics_file).exists()
    assert result.report_file is None
    # The same call again with a mapping for the config: resumed, the failed row retried.
    again = pipeline.run({"input": "in.csv", "output": "out/r.parquet", "prompt": "Summarise: {text}"},
                         base_url=f"{server.url}/v1", model="fake-model", progress=False, max_error_rate=0.5)  # fmt: skip
    assert again.succeeded and again.from_checkpoint == 7 and again.outcome == "completed"


def test_importing_the_package_loads_no_engine() -> None:
    code = "import sys, pipeline; print(sorted(m for m in ('polars', 'aiohttp', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
    assert (ROOT / "pipeline" / "py.typed").exists()


SCRIPT = textwrap.dedent(
    """
    import sys, polars as pl, pipeline
    df = pl.DataFrame({"text": [f"row {i}" for i in range(400)]})
    try:
        pipeline.complete(df, prompt="{text}", base_url=sys.argv[1], model="m", progress=False,
                          checkpoint_dir="answers", concurrency=4)
    except pipeline.Interrupted as exc:
        print("INTERRUPTED", exc.result.outcome, exc.result.ok, flush=True)
        sys.exit(130)
    print("FINISHED", flush=True)
    """
)


def interrupt_script(script: str, server: FakeLLMServer) -> str:
    """Run `script` against `server` in its own process, SIGINT it once 40 requests have gone out, and
    check it said it was interrupted; returns how many rows it had answered (as text)."""
    Path("job.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "job.py", f"{server.url}/v1"], stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while len(chat_requests(server)) < 40:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    word, outcome, ok = out.split()
    assert (word, outcome) == ("INTERRUPTED", "interrupted") and 30 <= int(ok) < 400
    return ok


def test_ctrl_c_in_a_call_saves_answers_and_raises_interrupted() -> None:
    with FakeLLMServer(latency=0.05) as server:
        ok = interrupt_script(SCRIPT, server)
        first = {r.content for r in chat_requests(server)}
        server.reset()
        df = pl.DataFrame({"text": [f"row {i}" for i in range(400)]})
        out_frame = pipeline.complete(df, prompt="{text}", base_url=f"{server.url}/v1", model="m", progress=False,
                                      checkpoint_dir="answers")  # fmt: skip
        second = {r.content for r in chat_requests(server)}
    assert set(out_frame["status"]) == {"ok"} and out_frame.height == 400
    assert first & second == set()  # the requests in flight at the interrupt came back in its grace: none sent again
    assert len(second) <= 400 - int(ok)


def test_memory_sink_builds_one_frame_from_batches() -> None:
    from pipeline.api import MemorySink

    sink = MemorySink("llm_")
    results = pl.DataFrame({c: [None] for c in RESULT_COLUMNS})
    sink.write(pl.DataFrame({"a": [1]}), results)
    sink.write(pl.DataFrame({"a": [2]}), results)
    sink.commit()
    assert sink.frame is not None and sink.frame["a"].to_list() == [1, 2]
    assert sink.frame.columns[1] == "llm_completion"


def test_pyarrow_record_batch_conversion_keeps_columns() -> None:
    from pipeline.api import _as_frame

    batch = pa.RecordBatch.from_pydict({"text": ["x"], "n": [1]})
    frame = _as_frame(batch)
    assert isinstance(frame, pl.DataFrame) and frame.columns == ["text", "n"]


NOTEBOOK_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, polars as pl, pipeline
    df = pl.DataFrame({"text": [f"row {i}" for i in range(400)]})

    async def cell():  # as Jupyter runs a cell: inside a running loop, Ctrl-C a KeyboardInterrupt in this thread
        try:
            pipeline.complete(df, prompt="{text}", base_url=sys.argv[1], model="m", progress=False,
                              checkpoint_dir="answers", concurrency=4)
        except pipeline.Interrupted as exc:
            print("INTERRUPTED", exc.result.outcome, exc.result.ok, flush=True)
            return 130
        return 0

    loop = asyncio.new_event_loop()  # run_until_complete installs no SIGINT handler, as a kernel's loop
    sys.exit(loop.run_until_complete(cell()))
    """
)


def test_ctrl_c_inside_a_running_loop_saves_answers_and_raises_interrupted() -> None:
    """The sync form inside a running loop runs on a worker thread's loop; the interrupt reaches the
    calling thread, which cancels the run there, waits for it to save, and raises Interrupted."""
    with FakeLLMServer(latency=0.05) as server:
        ok = interrupt_script(NOTEBOOK_SCRIPT, server)
        sent = len(chat_requests(server))
    from pipeline.tables.checkpoint import read_done

    assert read_done(Path("answers")).height >= int(ok)  # every answer counted is in the checkpoint
    assert read_done(Path("answers")).height == sent  # and every request sent: those in flight came back in the grace


HANGING_CELL = textwrap.dedent(
    """
    import asyncio, logging, sys, polars as pl, pipeline
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the pipeline logger's lines, on stderr
    df = pl.DataFrame({"text": [f"row {i}" for i in range(40)]})

    async def cell():
        try:
            pipeline.complete(df, prompt="{text}", base_url=sys.argv[1], model="m", progress=False,
                              checkpoint_dir="answers", concurrency=4, adapt=False)
        except pipeline.Interrupted:
            print("INTERRUPTED", flush=True)
            return 130
        return 0

    sys.exit(asyncio.new_event_loop().run_until_complete(cell()))
    """
)


@pytest.mark.parametrize("presses", [1, 2])
def test_the_stop_button_waits_a_few_seconds_for_replies_or_not_at_all(presses: int) -> None:
    """A server that does not answer: the first press waits the grace out and stops, the second stops at once."""
    from tests.test_ctrl_c import press_ctrl_c, wait_for_requests

    Path("cell.py").write_text(HANGING_CELL)
    with FakeLLMServer(latency=120.0) as server:
        proc = subprocess.Popen([sys.executable, "cell.py", f"{server.url}/v1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        wait_for_requests(server, 4, proc)
        out, said, waited = press_ctrl_c(proc, presses)
    assert proc.returncode == 130 and out.strip() == "INTERRUPTED", said
    assert "waiting up to 5 s for the 4 requests in flight" in said
    if presses == 1:
        assert "4 requests did not come back in 5 s" in said
        assert waited >= 4.5  # the grace was given
    else:
        assert "did not come back" not in said  # the second press did not wait for it
