"""The answer cache shared across outputs, jobs and calls: real runs against the fake server, two
processes writing at once, pruning."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import polars as pl
import pytest

import pipeline
import pipeline.engines.online
import pipeline.tables.cache
from pipeline.tables.cache import AnswerCache, scope_for
from tests.conftest import base_args, chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer


def job(server: FakeLLMServer, out: str, *more: str, inp: str = "in.csv") -> list[str]:
    return [*base_args(server, inp=inp, out=out), "--cache", "answers", *more]


def test_a_second_output_with_the_same_cache_sends_nothing(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(20))
    first = run_cli(*job(server, "out/a.parquet"))
    assert first.exit_code == 0, first.output
    assert len(chat_requests(server)) == 20
    server.reset()
    second = run_cli(*job(server, "out/b.parquet"))
    assert second.exit_code == 0, second.output
    assert chat_requests(server) == []
    assert "20 from the answer cache, not sent again" in second.output
    a, b = pl.read_parquet("out/a.parquet"), pl.read_parquet("out/b.parquet")
    # The stored answers; no request was made for them by this output: no attempt, no latency of its own.
    assert a.drop("attempts", "latency_ms").equals(b.drop("attempts", "latency_ms"))
    assert set(a["attempts"]) == {1} and set(b["attempts"]) == {0} and b["latency_ms"].null_count() == 20
    # The second output's checkpoint holds them: its resume does not depend on the cache.
    for f in Path("answers").iterdir():
        f.unlink()
    again = run_cli(*base_args(server, out="out/b.parquet"))
    assert again.exit_code == 0 and chat_requests(server) == []
    assert "20 ok from the checkpoint" in again.output


def test_only_changed_and_new_rows_are_sent_and_errors_are_not_kept(server: FakeLLMServer) -> None:
    rows = texts(10)
    rows[4]["text"] += " [[fault:400]]"  # a permanent refusal: not an answer worth keeping
    write_table("in.csv", rows)
    assert run_cli(*job(server, "out/a.parquet", "--max-error-rate", "0.5")).exit_code == 0
    server.reset()
    changed = [dict(r) for r in rows] + texts(13)[10:]
    changed[2]["text"] = "a different review"
    write_table("in2.csv", changed)
    result = run_cli(*job(server, "out/b.parquet", "--max-error-rate", "0.5", inp="in2.csv"))
    assert result.exit_code == 0, result.output
    sent = sorted(r.content for r in chat_requests(server))
    expected = ["Summarise: a different review", f"Summarise: {rows[4]['text']}"] + [
        f"Summarise: {r['text']}" for r in texts(13)[10:]
    ]
    assert sent == sorted(expected)
    assert "8 from the answer cache" in result.output


def test_without_a_cache_or_against_another_server_nothing_is_shared(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(5))
    assert run_cli(*job(server, "out/a.parquet")).exit_code == 0
    server.reset()
    assert run_cli(*base_args(server, out="out/b.parquet")).exit_code == 0
    assert len(chat_requests(server)) == 5  # no --cache: paid again
    with FakeLLMServer() as other:
        assert run_cli(*job(other, "out/c.parquet")).exit_code == 0
        assert len(chat_requests(other)) == 5  # same model name, another server: not the same answers


def test_two_jobs_at_once_share_one_cache_and_every_answer_is_kept() -> None:
    with FakeLLMServer(latency=0.02) as server:
        write_table("in1.csv", texts(150, "first job row"))
        write_table("in2.csv", texts(150, "second job row"))
        procs = [spawn(*job(server, f"out/{i}.parquet", "--concurrency", "8", inp=f"in{i}.csv")) for i in (1, 2)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        scope = scope_for("openai", f"{server.url}/v1")
    with AnswerCache("answers", scope) as store:
        assert store.info().entries == 300
        stored = store.get_many([k for i in (1, 2) for k in pl.read_parquet(f"out/{i}.parquet")["request_key"]])
    assert len(stored) == 300


def test_the_api_shares_the_cache_between_calls(server: FakeLLMServer) -> None:
    df = pl.DataFrame({"text": [f"note {i}" for i in range(6)]})
    kw = {"prompt": "{text}", "base_url": f"{server.url}/v1", "model": "m", "progress": False, "cache_dir": "answers"}
    first = pipeline.complete(df, **kw)
    server.reset()
    second = pipeline.complete(df, **kw)
    assert chat_requests(server) == []
    assert first.drop("attempts", "latency_ms").equals(second.drop("attempts", "latency_ms"))
    assert second["attempts"].to_list() == [0] * 6


def _count_flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    written: list[int] = []
    flush = AnswerCache.flush

    def counting(self: AnswerCache) -> int:
        n = flush(self)
        if n:
            written.append(n)
        return n

    monkeypatch.setattr(AnswerCache, "flush", counting)
    return written


def test_answers_are_not_written_one_transaction_a_row_or_a_batch(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _count_flushes(monkeypatch)
    monkeypatch.setattr(pipeline.engines.online, "CACHE_FLUSH_EVERY", 3600.0)  # no timed flush: only the one at the end
    write_table("in.csv", texts(40))
    assert run_cli(*job(server, "out/a.parquet", "--batch-size", "1")).exit_code == 0
    assert written == [40]


def test_answers_are_written_while_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    written = _count_flushes(monkeypatch)
    monkeypatch.setattr(pipeline.engines.online, "CACHE_FLUSH_EVERY", 0.05)
    with FakeLLMServer(latency=0.02) as server:  # 40 answers one at a time: at least 0.8 s
        write_table("in.csv", texts(40))
        assert run_cli(*job(server, "out/a.parquet", "--concurrency", "1", "--no-adapt")).exit_code == 0
    assert len(written) >= 2 and sum(written) == 40


# ---- the store itself ------------------------------------------------------------------------


def _writer(folder: str, start: int, n: int) -> None:
    with AnswerCache(folder, "s") as store:
        for i in range(start, start + n):
            store.put(f"k{i}", ["answer", i])
            if i % 100 == 99:
                store.flush()


def test_two_processes_writing_at_once_lose_nothing() -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=("answers", start, 1000)) for start in (0, 1000)]
    for p in procs:
        p.start()
    with AnswerCache("answers", "s") as reader:  # reading while they write
        while any(p.is_alive() for p in procs):
            reader.get_many([f"k{i}" for i in range(0, 2000, 50)])
            time.sleep(0.01)
        for p in procs:
            p.join()
            assert p.exitcode == 0
        found = reader.get_many([f"k{i}" for i in range(2000)])
    assert len(found) == 2000 and found["k1234"] == ("answer", 1234)


def test_prune_by_age_and_by_size_and_the_cap_at_close(tmp_path: Path) -> None:
    with AnswerCache("answers", "s") as store:
        for i in range(300):
            store.put(f"k{i:03}", ["x" * 1000])
        store.flush()
        assert store.info().entries == 300
        store.get_many([f"k{i:03}" for i in range(200, 300)])  # used again: these are the recent ones
        store.flush()
        assert store.prune(older_than=3600) == 0
        dropped = store.prune(max_mb=0.1)  # about 100 answers of ~1 kB fit
        info = store.info()
        assert info.bytes <= 0.1 * 1024 * 1024 and dropped == 300 - info.entries
        assert len(store.get_many([f"k{i:03}" for i in range(200, 300)])) == 100 <= info.entries  # the recent ones stayed
    with AnswerCache("answers", "s", max_mb=0.01):
        pass  # closing enforces the cap
    with AnswerCache("answers", "s") as store:
        assert store.info().bytes <= 0.01 * 1024 * 1024


def test_cache_commands(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(4))
    assert run_cli(*job(server, "out/a.parquet")).exit_code == 0
    info = run_cli("cache", "info", "answers")
    assert info.exit_code == 0 and "answers: 4 answers" in info.output
    pruned = run_cli("cache", "prune", "answers", "--max-mb", "0")
    assert pruned.exit_code == 0 and "Dropped 4 answers; 0 remain" in pruned.output
    assert run_cli("cache", "prune", "answers").exit_code == 2
    missing = run_cli("cache", "info", "nowhere")
    assert missing.exit_code == 2 and "holds no answer cache" in missing.output
    assert run_cli("cache", "prune", "answers", "--older-than", "soon").exit_code == 2


def test_scope_names_provider_and_server() -> None:
    assert scope_for("openai", "http://h:1/v1/") == "openai http://h:1/v1"
    assert scope_for("local", None) == "local embedded"


def test_a_flush_behind_another_jobs_write_lock_keeps_its_answers_for_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.tables.cache, "BUSY_MS", 100)
    with AnswerCache("answers", "s") as store:
        other = sqlite3.connect("answers/answers.sqlite", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another job in the middle of its own write
        started = time.monotonic()
        store.put("k", ["answer"])  # never waits on the database
        assert time.monotonic() - started < 0.05
        assert store.get_many(["k"]) == {}  # reading is not blocked by the writer either
        assert store.flush() == 0 and store.pending == 1  # gave up after the busy timeout, kept for the next flush
        other.execute("COMMIT")
        other.close()
        assert store.flush() == 1 and store.get_many(["k"]) == {"k": ("answer",)}


def test_the_cap_at_close_reads_no_answer_when_the_file_is_under_it() -> None:
    with AnswerCache("answers", "s", max_mb=1) as store:
        for i in range(50):
            store.put(f"k{i}", ["x" * 100])
        store.flush()
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
    assert not [q for q in statements if "SUM(" in q or "DELETE" in q]


@pytest.mark.parametrize("bad", ["/proc/answers"])
def test_a_cache_folder_that_cannot_be_made_is_a_usage_error(server: FakeLLMServer, bad: str) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--cache", bad)
    assert result.exit_code == 2 and "Cannot use the answer cache" in result.output
    assert chat_requests(server) == []
