"""The metrics file: written by the real CLI on every way a run ends, valid against its shipped schema,
readable as a CI job reads it (`jq '.rows.error'`), and free of secrets."""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pipeline.observe.metrics import SCHEMA_FILE
from pipeline.observe.stats import TIMELINE_MAX, RunStats
from tests.conftest import base_args, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer

DEFAULT = Path("out/result.metrics.json")  # beside out/result.parquet


def load(path: Path = DEFAULT) -> dict[str, Any]:
    """Read a metrics file as `jq` would, and check it against the schema the package ships."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.validate(data, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return data


def test_the_schema_file_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


def test_a_completed_run_writes_metrics_beside_the_output(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(20))
    result = run_cli(*base_args(server), "--price-in", "1.5", "--price-out", "3", "--header", "X-Team: team-secret-value")
    assert result.exit_code == 0, result.output
    m = load()
    assert m["schema"] == "pipeline.metrics/1"
    assert m["run"]["exit_code"] == 0 and m["run"]["outcome"] == "completed" and m["run"]["reason"] is None
    assert m["run"]["wall_s"] > 0 and m["run"]["started_at"] <= m["run"]["ended_at"]
    assert m["rows"] == {**m["rows"], "total": 20, "ok": 20, "error": 0, "from_checkpoint": 0, "not_sent": 0}
    assert m["requests"]["sent"] == 20 and m["requests"]["retries"] == 0 and m["requests"]["errors_by_kind"] == {}
    # The fake server's counts are deterministic: the prompt's 9 words + 3 in, "echo: " and those words out.
    assert m["tokens"] == {**m["tokens"], "prompt": 20 * 12, "completion": 20 * 10, "estimated_rows": 0}
    assert m["cost"]["this_run"] == pytest.approx((240 * 1.5 + 200 * 3) / 1e6)
    assert m["cost"]["all_runs"] == m["cost"]["this_run"] and m["cost"]["ceiling_reached"] is False
    lat = m["throughput"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert sum(n for _, n in m["latency_histogram"]) == 20
    assert m["timeline"][-1]["rows"] == 20 and m["timeline"][-1]["prompt_tokens"] == 240
    assert m["limits"]["adapt"] is True and m["limits"]["concurrency"] >= 1
    assert m["config"]["headers"] == {"X-Team": "***"} and m["config"]["prompt"] == "Summarise: {text}"
    assert m["paths"] == {
        "output": "out/result.parquet",
        "checkpoint": "out/result.checkpoint",
        "metrics": "out/result.metrics.json",
        "report": "out/result.report.html",
    }
    assert "team-secret-value" not in DEFAULT.read_text()
    assert not list(Path("out").glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_no_prices_no_cost_and_the_metrics_path_can_be_chosen(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    result = run_cli(*base_args(server), "--metrics", "ci/night.json", "--no-report")
    assert result.exit_code == 0, result.output
    m = load(Path("ci/night.json"))
    assert m["cost"] is None
    assert m["paths"]["metrics"] == "ci/night.json" and m["paths"]["report"] is None
    assert not DEFAULT.exists()


def test_error_rate_above_the_limit(server: FakeLLMServer) -> None:
    rows = [*texts(3), {"id": 3, "text": "bad [[fault:400]]"}, {"id": 4, "text": "down [[fault:500]]"}]
    write_table("in.csv", rows)
    result = run_cli(*base_args(server), "--max-attempts", "2")
    assert result.exit_code == 4
    m = load()
    assert m["rows"]["error"] == 2 and m["rows"]["ok"] == 3
    assert m["run"]["exit_code"] == 4 and m["run"]["outcome"] == "error_rate"
    assert "above --max-error-rate" in m["run"]["reason"] and m["run"]["reason"] in result.output
    assert m["requests"]["errors_by_kind"] == {"http_400": 1, "http_500": 1}
    assert m["requests"]["retries"] == 1 and m["requests"]["sent"] == 3 + 1 + 2


def test_a_null_prompt_cell_counts_as_not_sent(server: FakeLLMServer) -> None:
    write_table("in.parquet", [{"id": 0, "text": "fine"}, {"id": 1, "text": None}])
    result = run_cli(*base_args(server, inp="in.parquet"), "--max-error-rate", "1")
    assert result.exit_code == 0, result.output
    m = load()
    assert m["rows"]["not_sent"] == 1 and m["requests"]["errors_by_kind"] == {"not_sent": 1}


def test_a_fatal_stop_is_recorded_without_the_key() -> None:
    # Azure-style: the key travels in an api-key header, and the 401 echoes what that header held.
    with FakeLLMServer(api_key="right-key", auth_header="api-key") as server:
        write_table("in.csv", texts(50))
        args = [*base_args(server), "--header", "api-key: $TEST_KEY", "--concurrency", "2"]
        result = run_cli(*args, env={"TEST_KEY": "wrong-secret-key"})
    assert result.exit_code == 6
    assert not Path("out/result.parquet").exists()  # nothing was answered: no output of errors only
    m = load()
    assert m["run"]["outcome"] == "auth_refused" and m["run"]["exit_code"] == 6
    assert "HTTP 401" in m["run"]["reason"] and m["run"]["reason"] in result.output
    assert m["rows"]["ok"] == 0 and m["rows"]["not_sent"] >= 45
    assert m["config"]["headers"] == {"api-key": "***"}
    text = DEFAULT.read_text()
    assert "wrong-secret-key" not in text and "$TEST_KEY" not in text


def test_a_spend_ceiling_stop_is_recorded(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(40))
    result = run_cli(*base_args(server), "--price-in", "1000", "--price-out", "1000", "--max-cost", "0.6", "--concurrency", "1")
    assert result.exit_code == 5, result.output
    m = load()
    assert m["run"]["outcome"] == "spend_ceiling" and m["run"]["reason"] in result.output
    assert m["cost"]["ceiling_reached"] is True and m["cost"]["max_cost"] == 0.6 and m["cost"]["this_run"] <= 0.6
    assert 0 < m["rows"]["ok"] < 40 and m["rows"]["not_sent"] == m["requests"]["errors_by_kind"]["spend_ceiling"]
    assert m["rows"]["ok"] + m["rows"]["not_sent"] == 40


def test_an_empty_input_writes_metrics_too(server: FakeLLMServer) -> None:
    Path("in.csv").write_text("id,text\n")
    result = run_cli(*base_args(server))
    assert result.exit_code == 0, result.output
    m = load()
    assert m["run"]["outcome"] == "empty_input" and m["run"]["exit_code"] == 0
    assert m["rows"]["total"] == 0 and m["requests"]["sent"] == 0
    assert m["throughput"]["latency_ms"] == {"p50": None, "p95": None, "p99": None}


def test_a_usage_error_writes_no_metrics(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--prompt", "Summarise: {missing}")
    assert result.exit_code == 2
    assert not DEFAULT.exists()  # nothing ran: a CI job reads the exit code


def test_a_resumed_run_counts_rows_from_the_checkpoint(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(10))
    prices = ["--price-in", "1", "--price-out", "1"]
    assert run_cli(*base_args(server), "--limit", "4", *prices).exit_code == 0
    first = load()
    result = run_cli(*base_args(server), *prices)
    assert result.exit_code == 0, result.output
    m = load()
    assert m["rows"]["total"] == 10 and m["rows"]["from_checkpoint"] == 4 and m["rows"]["ok"] == 10
    assert m["requests"]["sent"] == 6
    assert m["cost"]["all_runs"] == pytest.approx(first["cost"]["this_run"] + m["cost"]["this_run"])


def test_stdout_output_puts_metrics_beside_the_checkpoint(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server, out="-"))
    assert result.exit_code == 0
    m = load(Path("in.stdout.metrics.json"))
    assert m["paths"]["checkpoint"] == "in.stdout.checkpoint" and m["paths"]["output"] == "-"


def test_an_interrupted_run_writes_metrics_with_its_outcome() -> None:
    with FakeLLMServer(latency=0.1) as server:  # 300 rows at up to 8 in flight: about 4 s, interrupted at about 1.5
        write_table("in.csv", texts(300))
        proc = spawn(*base_args(server), "--concurrency", "8", "--batch-size", "50")
        deadline = time.monotonic() + 60
        while len(server.requests) < 20:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "too few requests in time"
            time.sleep(0.05)
        time.sleep(1.2)  # past the first second, so the sampler has taken a sample of its own
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    m = load()
    assert m["run"]["outcome"] == "interrupted" and m["run"]["exit_code"] == 130
    assert m["run"]["reason"].startswith("pipeline: interrupted.")
    assert 0 < m["rows"]["ok"] < 300 and m["rows"]["not_sent"] == 300 - m["rows"]["ok"] - m["rows"]["error"]
    ts = [s["t"] for s in m["timeline"]]
    assert len(ts) >= 3 and ts == sorted(ts) and ts[0] < 0.5
    assert any(0.8 < b - a < 1.2 for a, b in itertools.pairwise(ts))  # a sample a second
    rows = [s["rows"] for s in m["timeline"]]
    assert rows == sorted(rows) and rows[-1] == m["rows"]["done"]  # cumulative, ending where the run did


def test_the_timeline_stays_bounded_on_a_long_run() -> None:
    stats, t = RunStats(), 0.0
    while t < 4 * 3600 - 1:  # four hours, sampled as the sampler does: every `sample_every` seconds
        stats.rows_done = int(t)
        stats.sample(t)
        t += stats.sample_every
    assert TIMELINE_MAX // 2 <= len(stats.timeline) <= TIMELINE_MAX + 1
    assert stats.sample_every == 4.0  # thinned twice
    ts = [s["t"] for s in stats.timeline]
    assert ts[0] == 0 and ts[-1] >= 4 * 3600 - 8
    assert {b - a for a, b in itertools.pairwise(ts)} == {4.0}  # still evenly spaced after thinning
