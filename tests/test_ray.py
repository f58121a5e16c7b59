"""The Ray engine on a real Ray: a two-node cluster on this machine (ray.cluster_utils.Cluster),
the real actors, the fake server on 127.0.0.1. Kill cases use real processes and SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import ROOT, chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer
from tests.test_resume import journal_lines, wait_for_answers

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the extra: pip install -e '.[ray]'")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two nodes of two CPUs each, one machine; this test process is the driver of the in-process runs."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def args(server: FakeLLMServer, *extra: str, out: str = "out/result.parquet") -> list[str]:
    return [
        "run", "-i", "in.csv", "-o", out, "-p", "Summarise: {text}", "--base-url", f"{server.url}/v1",
        "--model", "fake-model", "--no-progress", "--batch-size", "100", *extra,
    ]  # fmt: skip


RAY = ("--engine", "ray", "--workers", "4")


def same_output(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.columns == b.columns
    assert a.schema == b.schema
    latency = [c for c in a.columns if c.endswith("latency_ms")]
    assert a.drop(latency).equals(b.drop(latency)), "the Ray engine's output differs from the local engine's"


def test_ray_output_equals_the_local_engines(cluster: Any, server: FakeLLMServer) -> None:
    rows = [*texts(500), {"id": 500, "text": None}, {"id": 501, "text": "review number 3 says the product is fine"}]
    write_table("in.parquet", pl.DataFrame(rows, schema={"id": pl.Int32, "text": pl.String}))
    base = [a.replace("in.csv", "in.parquet") for a in args(server)]
    local = run_cli(*base, "-o", "out/local.parquet", "--max-error-rate", "0.01")
    assert local.exit_code == 0, local.output
    server.reset()
    on_ray = run_cli(*base, "-o", "out/ray.parquet", "--max-error-rate", "0.01", *RAY)
    assert on_ray.exit_code == 0, on_ray.output
    assert "engine ray: 4 actors" in on_ray.output
    same_output(pl.read_parquet("out/ray.parquet"), pl.read_parquet("out/local.parquet"))
    sent = Counter(r.content for r in chat_requests(server))
    # The null row is not sent. The duplicate of row 3 is in another block, maybe on another actor: it may be sent
    # again (the local engine shares it); no other row is.
    assert len(sent) == 500 and sum(sent.values()) <= 501
    assert "pipeline: 502 rows in" in on_ray.output and "501 ok, 1 error" in on_ray.output, on_ray.output
    assert "INFO" not in on_ray.output  # Ray's own log lines stay out of the run's


def test_structured_output_and_result_prefix_match_the_local_engine(cluster: Any, server: FakeLLMServer) -> None:
    write_table("in.csv", [{"text": f"item {i}", "completion": "mine"} for i in range(120)])
    schema = '{"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}'
    extra = ("--schema", schema, "--result-prefix", "llm_")
    assert run_cli(*args(server, *extra, out="out/local.parquet")).exit_code == 0
    result = run_cli(*args(server, *extra, *RAY, out="out/ray.parquet"))
    assert result.exit_code == 0, result.output
    same_output(pl.read_parquet("out/ray.parquet"), pl.read_parquet("out/local.parquet"))
    assert {"llm_status", "label"} <= set(pl.read_parquet("out/ray.parquet").columns)


def test_one_rate_budget_for_the_whole_cluster(cluster: Any) -> None:
    """--rpm holds for all actors together, against a server that counts per wall-clock second."""
    with FakeLLMServer(rpm=3000, rate_window="second", rate_headers="none") as server:  # 50 a second
        write_table("in.csv", texts(600))
        result = run_cli(*args(server, *RAY, "--rpm", "3000", "--no-adapt", "--concurrency", "32"))
        assert result.exit_code == 0, result.output
        assert server.stats()["status_429"] == 0, server.stats()  # never over 50 in a wall-clock second
        per_second = [b["ok"] for b in server.timeline()["buckets"]]
    # The timeline's seconds start at the first request, not on the wall clock's: a steady 50/s may show 51-52.
    assert max(per_second) <= 55, per_second
    busy = per_second[1:-1]  # whole seconds only
    assert sum(busy) / len(busy) >= 40, per_second  # a static split or a lost lease would show as a shortfall


def test_a_limit_learned_from_headers_is_shared(cluster: Any) -> None:
    """No --rpm: the server's headers name its limit; the actors together keep under it after learning it."""
    with FakeLLMServer(rpm=3000, rate_window="second") as server:
        write_table("in.csv", texts(500))
        result = run_cli(*args(server, *RAY, "--concurrency", "16"))
        assert result.exit_code == 0, result.output
        timeline = server.timeline()["buckets"]
    out = pl.read_parquet("out/result.parquet")
    assert set(out["status"]) == {"ok"}
    limited = [b["429"] for b in timeline]
    # Before the first answers nothing is known; after the first two seconds nothing more is refused.
    assert sum(limited[2:]) == 0, timeline


def test_a_local_run_resumes_on_ray_and_the_other_way_round(cluster: Any, server: FakeLLMServer) -> None:
    write_table("in.csv", texts(400))
    assert run_cli(*args(server, "--limit", "150")).exit_code == 0
    server.reset()
    result = run_cli(*args(server, *RAY))
    assert result.exit_code == 0, result.output
    assert "150 ok from the checkpoint" in result.output
    assert len(chat_requests(server)) == 250
    write_table("in.csv", texts(450))  # 50 rows more, now on the local engine
    server.reset()
    again = run_cli(*args(server))
    assert again.exit_code == 0, again.output
    assert len(chat_requests(server)) == 50
    assert pl.read_parquet("out/result.parquet")["id"].to_list() == list(range(450))


def test_a_fatal_answer_on_one_actor_stops_every_actor(cluster: Any) -> None:
    """One row's answer says the quota is gone: the actor that gets it tells the coordinator, and the others
    stop too (not each on its own answer), after their requests in flight come back and are kept."""
    rows = [{"id": i, "text": f"review {i}" + (" [[fault:quota]]" if i == 300 else "")} for i in range(2000)]
    with FakeLLMServer(latency=0.05) as server:
        write_table("in.csv", rows)
        result = run_cli(*args(server, *RAY, "--concurrency", "16"))
        assert result.exit_code == 7, result.output  # quota exhausted, as a local run that gets the answer exits
        assert "stopped" in result.output and "quota" in result.output.lower()
        received = chat_requests(server)
        sent = len(received)
        kept = len(journal_lines(Path("out/result.checkpoint")))
        answered = server.stats()
    assert not Path("out/result.parquet").exists()
    # Blocks go to actors in no fixed order, so the refusal comes at some point of the run; after it, the other
    # actors hear the stop within one report (0.5 s: at most ~160 requests at this pace) and send nothing more.
    refused_at = next(i for i, r in enumerate(received) if "fault:quota" in r.content)
    assert sent - refused_at <= 200 and sent < 2000, f"{sent - refused_at} requests after the refusal"
    # Every answer the server gave was kept (only the refused one is not an answer).
    assert kept >= sent - 1, (kept, sent, answered)


def test_ray_dataset_in_and_out(cluster: Any, server: FakeLLMServer) -> None:
    import pipeline.ray

    ds = ray.data.from_items([{"id": i, "text": f"review {i}"} for i in range(300)], override_num_blocks=6)
    out = pipeline.ray.complete(ds, prompt="Summarise: {text}", base_url=f"{server.url}/v1", model="fake-model", workers=2)
    rows = pl.concat([pl.DataFrame(pl.from_arrow(ray.get(ref))) for ref in out.to_arrow_refs()])
    assert rows["id"].to_list() == list(range(300))
    assert rows.columns[:3] == ["id", "text", "completion"] and set(rows["status"]) == {"ok"}
    assert rows["completion"][7] == "echo: Summarise: review 7"


def test_without_ray_installed_engine_ray_says_how_to_install(tmp_path: Path, server: FakeLLMServer) -> None:
    blocker = tmp_path / "noray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    write_table("in.csv", texts(5))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args(server, "--engine", "ray")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pip install -e '.[ray]' in the pipeline checkout" in proc.stderr and "'pipeline[ray]'" not in proc.stderr
    assert chat_requests(server) == []


def test_ray_options_without_engine_ray_are_refused(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(5))
    result = run_cli(*args(server, "--workers", "3"))
    assert result.exit_code == 2 and "--engine ray" in result.output
    assert chat_requests(server) == []


def journal_sizes(folder: Path) -> list[int]:
    """Answers per actor's journal (the driver's own stays empty)."""
    return sorted(n for j in folder.glob("journal-*.jsonl") if (n := len(j.read_bytes().splitlines())))


def test_every_actor_is_busy_and_in_flight_is_one_budget(cluster: Any) -> None:
    """Default blocks: a job of 600 rows (one --batch-size block before) is cut so that both actors get
    their share; the server never sees more than --concurrency at once, and sees all of it: the actors
    share it by demand instead of each holding half."""
    with FakeLLMServer(latency=0.1, max_in_flight=16) as server:
        write_table("in.csv", texts(600))
        result = run_cli(
            *args(server, "--engine", "ray", "--workers", "2", "--concurrency", "16", "--no-adapt", "--batch-size", "5000")
        )
        assert result.exit_code == 0, result.output
        stats = server.stats()
        assert "2 actors sharing 16 in flight, 8 blocks of up to 75 rows" in result.output, result.output
        sizes = journal_sizes(Path("out/result.checkpoint"))
        assert len(sizes) == 2 and min(sizes) >= 600 * 0.3, sizes
        assert stats.get("status_429", 0) == 0 and stats["max_in_flight_seen"] == 16, stats
        # One block left: a single actor works on it alone and may use the whole budget.
        server.reset()
        write_table("in.csv", texts(40))
        alone = run_cli(
            *args(server, "--engine", "ray", "--workers", "2", "--concurrency", "16", "--no-adapt", "-o", "out/one.parquet")
        )
        assert alone.exit_code == 0, alone.output
        assert server.stats()["max_in_flight_seen"] == 16, server.stats()


def _ray_job(server: FakeLLMServer, address: str, rows: int) -> subprocess.Popen[str]:
    write_table("in.csv", texts(rows))
    return spawn(*args(server, *RAY, "--ray-address", address, "--concurrency", "16"))


def test_killing_the_driver_resends_only_what_was_in_flight(cluster: Any) -> None:
    rows = 1500
    with FakeLLMServer(latency=0.05) as server:
        proc = _ray_job(server, cluster.address, rows)
        wait_for_answers(Path("out/result.checkpoint"), 300, proc, limit=120)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        time.sleep(2)  # Ray ends the dead driver's actors; anything they still had in flight may land meanwhile
        answered = {line for line in journal_lines(Path("out/result.checkpoint"))}
        first = Counter(r.content for r in chat_requests(server))
        server.reset()
        result = run_cli(*args(server, *RAY, "--concurrency", "16"))
        assert result.exit_code == 0, result.output
        second = Counter(r.content for r in chat_requests(server))
    out = pl.read_parquet("out/result.parquet")
    assert out["id"].to_list() == list(range(rows)) and set(out["status"]) == {"ok"}
    assert 300 <= len(answered) < rows
    resent = set(first) & set(second)
    assert len(resent) <= 16, f"{len(resent)} rows sent twice; at most the 16 in flight may be"
    assert max(second.values()) == 1


def test_killing_one_actor_resends_only_what_it_had_in_flight(cluster: Any) -> None:
    rows = 1500
    with FakeLLMServer(latency=0.05) as server:
        proc = _ray_job(server, cluster.address, rows)
        folder = Path("out/result.checkpoint")
        wait_for_answers(folder, 200, proc, limit=120)
        victim = next(j for j in sorted(folder.glob("journal-*.jsonl")) if j.stat().st_size)
        os.kill(int(victim.name.split("-")[2]), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        sent = Counter(r.content for r in chat_requests(server))
    out = pl.read_parquet("out/result.parquet")
    assert out["id"].to_list() == list(range(rows)) and set(out["status"]) == {"ok"}
    journals = list(folder.glob("journal-*.jsonl"))
    assert len(journals) > 4, "no actor took over from the one killed"
    assert "1 actor replaced after dying" in stderr, stderr
    twice = [k for k, n in sent.items() if n > 1]
    # The actors share 16 in flight: the killed one had at most that many out, and only those go again.
    assert len(twice) <= 16, f"{len(twice)} rows sent twice; at most the 16 in flight may be"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_every_answer_and_exit_130(cluster: Any, sig: signal.Signals) -> None:
    """Ray installs its own SIGTERM handler (it aborts the process); the run must still stop as a local one does."""
    rows = 1200
    with FakeLLMServer(latency=0.05) as server:
        proc = _ray_job(server, cluster.address, rows)
        wait_for_answers(Path("out/result.checkpoint"), 100, proc, limit=120)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Run the same command again to resume" in stderr
        assert "Traceback" not in stderr
        assert not Path("out/result.parquet").exists()
        first = Counter(r.content for r in chat_requests(server))
        server.reset()
        result = run_cli(*args(server, *RAY, "--concurrency", "16"))
        assert result.exit_code == 0, result.output
        second = Counter(r.content for r in chat_requests(server))
    assert pl.read_parquet("out/result.parquet")["id"].to_list() == list(range(rows))
    assert len(set(first) & set(second)) <= 16


def test_complete_on_a_dataset_names_columns_as_the_local_api(cluster: Any, server: FakeLLMServer) -> None:
    import pipeline
    import pipeline.ray
    from pipeline.errors import InputError

    items = [{"id": i, "text": f"item {i}"} for i in range(60)]
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    # fresh: both send (the default store would answer the second from the first, with attempts 0)
    settings = dict(prompt="Label: {text}", base_url=f"{server.url}/v1", model="fake-model", schema=schema, result_prefix="llm_",
                    fresh=True)  # fmt: skip
    local = pipeline.complete(pl.DataFrame(items), **settings)
    out = pipeline.ray.complete(ray.data.from_items(items, override_num_blocks=3), workers=2, **settings)
    on_ray = pl.concat([pl.DataFrame(pl.from_arrow(ray.get(ref))) for ref in out.to_arrow_refs()])
    assert on_ray.columns == local.columns
    same_output(on_ray.cast(local.schema), local)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="clash"):
        pipeline.ray.complete(ray.data.from_items([{"completion": "x", "text": "t"}]), prompt="{text}",
                              base_url=f"{server.url}/v1", model="fake-model")  # fmt: skip


def test_the_shared_pace_recovers_within_seconds_after_the_limit_drops(cluster: Any) -> None:
    """4 actors, --rpm at the server's limit of 50 a wall-clock second, which drops to 25 from 3 s to 5 s
    (no rate headers: only 429s say so). The cluster's pace is cut when the 429s come (once per event,
    not once per 429) and is back at the limit within seconds of it returning: from 8 s on the server
    gets >= 90% of it, with no 429 after the drop. (It took 40 s to climb back before, 5% every 2 s.)"""
    with FakeLLMServer(rpm=3000, rate_window="second", rate_headers="none", limit_schedule="0:3000,3:1500,5:3000") as server:
        write_table("in.csv", texts(700))
        result = run_cli(*args(server, *RAY, "--rpm", "3000", "--concurrency", "32"))
        assert result.exit_code == 0, result.output
        timeline = server.timeline()["buckets"]
    ok = {b["t"]: b["ok"] for b in timeline}
    refused = {b["t"]: b["429"] for b in timeline}
    # The start: no burst above the per-second share. The timeline's second 0 starts at the first request,
    # the server's limit counts wall-clock seconds, so a steady 50/s may show 51-52 in it (seen: 51).
    assert refused.get(0, 0) == 0 and ok.get(0, 0) <= 55, timeline
    assert sum(n for t, n in refused.items() if t >= 6) == 0 and sum(refused.values()) <= 40, timeline
    steady = [ok.get(t, 0) for t in range(8, max(ok))]
    assert steady and sum(steady) / len(steady) >= 45, timeline


def test_one_spend_ceiling_for_every_actor(cluster: Any, server: FakeLLMServer) -> None:
    """--max-cost holds for the cluster: reserved through the coordinator, so what the server billed stays
    under it however many actors send; the rows not sent say so, and the run exits 1 as a local one does."""
    write_table("in.csv", texts(300))
    prices = ("--price-in", "1", "--price-out", "2", "--max-tokens", "20")
    result = run_cli(*args(server, *RAY, *prices, "--max-cost", "0.003", "--concurrency", "16"))
    assert result.exit_code == 5, result.output  # the spend ceiling, as a local run
    stats = server.stats()
    billed = stats.get("billed_prompt_tokens", 0) * 1e-6 + stats.get("billed_completion_tokens", 0) * 2e-6
    assert 0.002 < billed <= 0.003, stats
    out = pl.read_parquet("out/result.parquet")
    assert out["id"].to_list() == list(range(300))
    ok = out.filter(pl.col("status") == "ok").height
    assert 0 < ok < 300 and ok == len(chat_requests(server))
    assert out.filter(pl.col("error").str.starts_with("not sent: spend ceiling reached")).height == 300 - ok
    assert "stopped at the spend ceiling" in result.output and "ceiling --max-cost $0.003, reached" in result.output


def test_the_answer_cache_is_read_and_filled_on_ray(cluster: Any, server: FakeLLMServer) -> None:
    write_table("in.csv", texts(100))
    assert run_cli(*args(server, "--cache", "answers", "-o", "out/a.parquet")).exit_code == 0
    write_table("in.csv", texts(150))
    server.reset()
    on_ray = run_cli(*args(server, *RAY, "--cache", "answers", "-o", "out/b.parquet"))
    assert on_ray.exit_code == 0, on_ray.output
    assert len(chat_requests(server)) == 50 and "100 from the answer cache" in on_ray.output
    server.reset()
    again = run_cli(*args(server, "--cache", "answers", "-o", "out/c.parquet"))  # what Ray answered was kept
    assert again.exit_code == 0 and chat_requests(server) == []
    assert (
        pl.read_parquet("out/b.parquet")
        .drop("latency_ms", "attempts")
        .equals(pl.read_parquet("out/c.parquet").drop("latency_ms", "attempts"))
    )


def test_batch_mode_with_engine_ray_submits_from_here_without_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fakebatch import FakeBatchServer

    monkeypatch.setenv("BATCH_KEY", "sk-batch-test")
    with FakeBatchServer(api_key="sk-batch-test") as batches:
        batches.faults["duration"] = 0
        write_table("in.csv", texts(8))
        result = run_cli("run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "Summarise: {text}", "--base-url",
                         f"{batches.url}/v1", "-m", "gpt-test", "--api-key-env", "BATCH_KEY", "--mode", "batch", "--wait",
                         "--no-progress", "--engine", "ray")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "engine ray:" not in result.output and "no Ray actors" in result.output
    assert set(pl.read_parquet("out/r.parquet")["status"]) == {"ok"}


def test_a_folder_output_is_written_by_the_actors_in_input_order(cluster: Any, server: FakeLLMServer) -> None:
    import pyarrow.parquet as pq

    write_table("in.csv", texts(500))
    result = run_cli(*args(server, *RAY, "-o", "out/parts/"))
    assert result.exit_code == 0, result.output
    parts = sorted(Path("out/parts").iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(len(parts))] and len(parts) >= 4
    assert pl.read_parquet("out/parts/")["id"].to_list() == list(range(500))
    assert pq.read_table("out/parts").column("id").to_pylist() == list(range(500))
    ctx = ray.data.DataContext.get_current()
    ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        assert [r["id"] for r in ray.data.read_parquet(str(Path("out/parts").resolve())).iter_rows()] == list(range(500))
    finally:
        ctx.execution_options.preserve_order = ordered
    local = run_cli(*args(server, "-o", "out/local.parquet"))
    assert local.exit_code == 0
    same_output(pl.read_parquet("out/parts/"), pl.read_parquet("out/local.parquet"))


def test_a_run_says_nothing_of_rays_own(tmp_path: Path, server: FakeLLMServer) -> None:
    """A Ray started by the run (a real process, its own Ray): its log lines stay in Ray's files, unless
    --verbose. The summary says when the first request went out."""
    write_table("in.csv", texts(60))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args(server, "--engine", "ray", "--workers", "2")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith(("pipeline", "  ")) for line in lines), proc.stderr
    assert any("the first request went out" in line for line in lines)


def test_complete_says_its_summary_when_the_dataset_is_consumed(
    cluster: Any, server: FakeLLMServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import pipeline.ray

    ds = ray.data.from_items([{"id": i, "text": f"review {i}"} for i in range(200)])
    out = pipeline.ray.complete(ds, prompt="Summarise: {text}", base_url=f"{server.url}/v1", model="fake-model", workers=2)
    assert "pipeline.ray:" not in capsys.readouterr().err  # lazy: nothing sent yet
    assert out.count() == 200
    err = capsys.readouterr().err
    assert "pipeline.ray: 200 rows in" in err and "200 ok, 0 errors" in err, err


def test_cost_per_row_on_ray_adds_up_to_the_metrics_and_the_bill(cluster: Any, server: FakeLLMServer) -> None:
    import json

    write_table("in.csv", texts(300))
    on_ray = run_cli(*args(server, "--price-in", "2", "--price-out", "5", *RAY))
    assert on_ray.exit_code == 0, on_ray.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns[-1] == "cost_usd"
    expected = out["prompt_tokens"] * 2e-6 + out["completion_tokens"] * 5e-6
    assert out["cost_usd"].to_list() == pytest.approx(expected.to_list())
    billed = server.stats()["billed_prompt_tokens"] * 2e-6 + server.stats()["billed_completion_tokens"] * 5e-6
    m = json.loads(Path("out/result.metrics.json").read_text())
    assert out["cost_usd"].sum() == pytest.approx(m["cost"]["this_run"], abs=1e-6) == pytest.approx(billed, abs=1e-6)


def test_complete_on_ray_keeps_its_answers_in_the_default_store(cluster: Any, server: FakeLLMServer) -> None:
    """complete(engine="ray") without checkpoint_dir: the answers outlive the call, as on the local engine,
    so the same call made again sends nothing, and a local call finds Ray's answers too."""
    import pipeline

    df = pl.DataFrame(texts(120))
    settings = dict(prompt="Summarise: {text}", base_url=f"{server.url}/v1", model="fake-model", progress=False)
    first = pipeline.complete(df, engine="ray", workers=2, **settings)
    assert first.height == 120 and set(first["status"]) == {"ok"}
    assert len(chat_requests(server)) == 120
    server.reset()
    again = pipeline.complete(df, engine="ray", workers=2, **settings)
    assert chat_requests(server) == [] and set(again["attempts"]) == {0}
    assert again.drop("attempts", "latency_ms", "cost_usd", strict=False).equals(
        first.drop("attempts", "latency_ms", "cost_usd", strict=False)
    )
    local = pipeline.complete(df, **settings)
    assert chat_requests(server) == [] and local["completion"].to_list() == first["completion"].to_list()


def test_image_columns_on_ray_match_the_local_engine(cluster: Any, server: FakeLLMServer) -> None:
    """Paths, bytes and a missing file: the actors read each row's image as they send it, so the same
    bytes reach the server and the output equals the local engine's; the API over a Dataset takes them too."""
    from tests import imagefiles
    from tests.test_images import label

    Path("img").mkdir()
    for i in range(40):
        Path(f"img/{i}.png").write_bytes(imagefiles.png(24, 16, seed=i))
    rows = pl.DataFrame(
        {"id": list(range(41)), "photo": [f"img/{i}.png" for i in range(40)] + ["img/gone.png"],
         "logo": [imagefiles.gif(4, 4 + i % 3) for i in range(41)], "text": [f"item {i}" for i in range(41)]}
    )  # fmt: skip
    write_table("in.parquet", rows)
    base = [a.replace("in.csv", "in.parquet") for a in args(server, "--image-column", "photo", "--image-column", "logo",
                                                            "--batch-size", "10", "--max-error-rate", "0.1")]  # fmt: skip
    local = run_cli(*base, "-o", "out/local.parquet")
    assert local.exit_code == 0, local.output
    server.reset()
    on_ray = run_cli(*base, "-o", "out/ray.parquet", *RAY)
    assert on_ray.exit_code == 0, on_ray.output
    out = pl.read_parquet("out/ray.parquet")
    same_output(out, pl.read_parquet("out/local.parquet"))
    assert (
        out["completion"][3]
        == f"echo: Summarise: item 3 {label(Path('img/3.png').read_bytes())} {label(rows['logo'][3], 'image/gif')}"
    )
    assert out["error"][40].startswith("not sent: column 'photo': file img/gone.png does not exist")
    assert len(chat_requests(server)) == 40
    # Resumed on Ray: nothing sent again.
    server.reset()
    assert run_cli(*base, "-o", "out/ray.parquet", *RAY).exit_code == 0 and chat_requests(server) == []

    import pipeline.ray

    ds = ray.data.from_items([{"photo": f"img/{i}.png", "text": f"item {i}"} for i in range(6)], override_num_blocks=2)
    got = pipeline.ray.complete(ds, prompt="Describe: {text}", image_columns=["photo"], base_url=f"{server.url}/v1",
                                model="fake-model", workers=2)  # fmt: skip
    done = pl.concat([pl.DataFrame(pl.from_arrow(ray.get(ref))) for ref in got.to_arrow_refs()])
    assert done["completion"][5] == f"echo: Describe: item 5 {label(Path('img/5.png').read_bytes())}"


def test_ray_complete_on_a_dataset_keeps_its_answers_in_the_default_store(cluster: Any, server: FakeLLMServer) -> None:
    """pipeline.ray.complete() without checkpoint_dir or cache_dir: consumed once, the answers are kept; the
    same call made again (a new lazy dataset, consumed) sends nothing."""
    import pipeline.ray

    items = [{"id": i, "text": f"item {i}"} for i in range(80)]
    settings = dict(prompt="Label: {text}", base_url=f"{server.url}/v1", model="fake-model", progress=False)

    def consumed() -> pl.DataFrame:
        out = pipeline.ray.complete(ray.data.from_items(items, override_num_blocks=4), workers=2, **settings)
        return pl.concat([pl.DataFrame(pl.from_arrow(ray.get(ref))) for ref in out.to_arrow_refs()])

    first = consumed()
    assert first.height == 80 and set(first["status"]) == {"ok"} and len(chat_requests(server)) == 80
    server.reset()
    again = consumed()
    assert chat_requests(server) == [] and again["completion"].to_list() == first["completion"].to_list()
