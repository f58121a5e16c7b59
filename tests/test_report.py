"""The run report: built from real output files, metrics files and checkpoints, checked for its content,
its size on a 1M-row output, and rendered in a real headless Chromium (driven over the DevTools protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import polars as pl
import pytest

from pipeline.observe.report import build_report, report_after_run, write_report
from pipeline.tables.checkpoint import RESULT_SCHEMA
from tests.conftest import run_cli, write_table
from tests.fakeserver import FakeLLMServer

SECRET = "sk-test-NEVER-SHOWN-123"


def output_rows(n: int = 100, *, prefix: str = "") -> pl.DataFrame:
    """An output as `pipeline run` writes it: every 10th row failed (two kinds), every 7th ok row hit max_tokens."""
    df = pl.DataFrame({"_i": pl.int_range(0, n, eager=True)}).with_columns(
        pl.col("_i").alias("id"), pl.format("review number {} says it is fine", pl.col("_i")).alias("text")
    )
    frame = df.select(
        "id",
        "text",
        pl.when(pl.col("_i") % 10 == 3).then(None).otherwise(pl.lit("fine")).alias("completion"),
        pl.when(pl.col("_i") % 10 == 3).then(None).otherwise(pl.lit(20)).alias("prompt_tokens"),
        pl.when(pl.col("_i") % 10 == 3)
        .then(None)
        .otherwise(pl.when(pl.col("_i") % 7 == 0).then(64).otherwise(pl.col("_i") % 50 + 1))
        .alias("completion_tokens"),
        pl.lit(None, dtype=pl.Int64).alias("total_tokens"),
        pl.when(pl.col("_i") % 10 == 3)
        .then(None)
        .otherwise(pl.when(pl.col("_i") % 7 == 0).then(pl.lit("length")).otherwise(pl.lit("stop")))
        .alias("finish_reason"),
        pl.lit("tiny").alias("model"),
        pl.when(pl.col("_i") % 10 == 3).then(pl.lit("error")).otherwise(pl.lit("ok")).alias("status"),
        pl.when(pl.col("_i") % 20 == 3)
        .then(pl.lit("HTTP 503 Service Unavailable (after 4 attempts)"))
        .when(pl.col("_i") % 10 == 3)
        .then(pl.lit("HTTP 400: context length exceeded (after 1 attempt)"))
        .otherwise(None)
        .alias("error"),
        pl.lit(1).alias("attempts"),
        pl.when(pl.col("_i") % 10 == 3).then(None).otherwise(pl.col("_i").cast(pl.Float64) % 100 * 10 + 100).alias("latency_ms"),
        pl.format("key{}", pl.col("_i")).alias("request_key"),
        pl.lit(False).alias("tokens_estimated"),
    )
    return frame.rename({c: prefix + c for c in RESULT_SCHEMA})


def metrics_dict(rows: int = 100, *, seconds: int = 30) -> dict[str, Any]:
    """A metrics file as the run writes it (schema pipeline.metrics/1), with a cumulative per-second timeline."""
    timeline = []
    for t in range(seconds + 1):
        done = rows * t // seconds
        timeline.append(
            {
                "t": float(t),
                "rows": done,
                "ok": done * 9 // 10,
                "errors": done // 10,
                "prompt_tokens": done * 20,
                "completion_tokens": done * 30,
                "requests": done + t // 3,
                "retries": t // 3,
                "limited_rate": t // 5,
                "limited_concurrency": t // 10,
                "concurrency": 8,
                "in_flight": min(8, 1 + t % 9),
                "pace_rpm": 600.0 if t < seconds // 2 else 450.0,
            }
        )
    return {
        "schema": "pipeline.metrics/1",
        "run": {
            "started_at": "2026-11-26T22:00:00Z",
            "ended_at": "2026-11-26T22:00:30Z",
            "wall_s": float(seconds),
            "exit_code": 0,
            "outcome": "done",
            "reason": "",
            "version": "0.1.0",
        },
        "rows": {"total": rows, "ok": rows * 9 // 10, "error": rows // 10, "from_checkpoint": 0, "not_sent": 0, "shared": 0},
        "requests": {
            "sent": rows + 10,
            "retries": 10,
            "errors_by_kind": {"http_503": rows // 20, "http_400": rows // 20},
            "rate_limited": {"rate": 6, "concurrency": 3},
            "outage_holds": 0,
        },
        "tokens": {"prompt": rows * 20, "completion": rows * 30, "estimated_rows": 0},
        "cost": {
            "price_in": 0.15,
            "price_out": 0.6,
            "this_run": 0.0021,
            "all_runs": 0.0042,
            "max_cost": 1.5,
            "ceiling_reached": False,
        },
        "throughput": {"rows_per_s": rows / seconds, "latency_ms": {"p50": 600.0, "p95": 1050.0, "p99": 1090.0}},
        "limits": {"rpm": 600, "concurrency": 8},
        "timeline": timeline,
        "latency_histogram": [[100, 5], [500, 40]],
        "config": {
            "model": "tiny-model-7b",
            "max_tokens": 64,
            "api_key_env": "MY_VLLM_KEY",
            "api_key": SECRET,  # never written by the run; the report must hide it even if it were
            "headers": {"Authorization": f"Bearer {SECRET}", "X-Team": "nightly"},
            "temperature": 0.2,
        },
        "paths": {"output": "out/result.parquet"},
    }


def write_run(folder: Path, rows: pl.DataFrame, metrics: dict[str, Any] | None, name: str = "result.parquet") -> Path:
    out = write_table(folder / name, rows)
    if metrics is not None:
        (folder / (out.stem + ".metrics.json")).write_bytes(orjson.dumps(metrics))
    return out


def tile(page: str, name: str) -> str:
    m = re.search(rf'<div class="tile" data-name="{re.escape(name)}"><span>[^<]*</span><b>([^<]*)</b>', page)
    assert m, f"no tile {name}"
    return html.unescape(m.group(1))


def section(page: str, name: str) -> str:
    m = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
    assert m, f"no section {name}"
    return m.group(1)


def assert_offline(page: str) -> None:
    """Nothing to fetch: no script, stylesheet, image or font from anywhere (the SVG namespaces are names, not loads)."""
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    assert "@import" not in page


def test_report_of_a_run_with_errors_shows_its_numbers_charts_and_examples(tmp_path: Path) -> None:
    rows = output_rows(100)
    out = write_run(tmp_path / "out", rows, metrics_dict(100))
    page = build_report(str(out))

    assert tile(page, "rows") == "100"
    assert tile(page, "ok") == "90"
    assert tile(page, "error") == "10"
    answered = rows.filter(pl.col("status") == "ok")
    p50 = answered["latency_ms"].quantile(0.5, "linear")
    p95 = answered["latency_ms"].quantile(0.95, "linear")
    assert p50 is not None and p95 is not None
    assert tile(page, "latency p50") == f"{p50:,.0f} ms"
    assert tile(page, "latency p95") == f"{p95:,.0f} ms"
    length = answered.filter(pl.col("finish_reason") == "length").height
    assert length > 0
    assert tile(page, "hit max_tokens") == str(length)
    assert f"{length} rows hit max_tokens (finish_reason length)" in section(page, "tokens")

    # Every chart drawn as inline SVG, with the marks of its data (p50/p95 lines and max_tokens labelled).
    for name in ("throughput", "latency", "tokens", "retries", "errors"):
        assert "<svg" in section(page, name), name
    assert f"p50 {p50:,.0f} ms" in section(page, "latency")
    assert "max_tokens 64" in section(page, "tokens")
    assert "rows/s" in section(page, "throughput") and "completion tokens/s" in section(page, "throughput")
    assert "429 rate/s" in section(page, "retries") and "110 requests sent, 10 retries" in section(page, "retries")

    # Errors: the kinds (from the metrics), then each message with a few example rows and their input.
    errors = section(page, "errors")
    assert "http_503" in errors and "http_400" in errors
    assert "5 rows: HTTP 503 Service Unavailable</h3>" in errors
    assert "5 rows: HTTP 400: context length exceeded</h3>" in errors
    assert "HTTP 503 Service Unavailable (after 4 attempts)" in errors
    assert "<td>4</td><td>3</td><td>review number 3 says it is fine</td>" in errors  # row 4 of the output is id 3
    assert errors.count("<tr><td>") == 6  # three examples of each of the two messages

    cost = section(page, "cost")
    assert "0.0021" in cost and "0.0042" in cost and "1.5000" in cost
    settings = section(page, "settings")
    assert "tiny-model-7b" in settings and "MY_VLLM_KEY" in settings and "nightly" in settings
    assert SECRET not in page
    assert "outcome <b>done</b> (exit 0)" in page
    assert_offline(page)


def test_report_without_metrics_draws_what_the_output_knows_and_says_what_is_missing(tmp_path: Path) -> None:
    out = write_run(tmp_path, output_rows(50), None)
    page = build_report(str(out))
    assert "no metrics file (result.metrics.json not found): timeline not available" in section(page, "throughput")
    assert "<svg" not in section(page, "throughput") and "<svg" not in section(page, "retries")
    assert "<svg" in section(page, "latency") and "<svg" in section(page, "tokens") and "<svg" in section(page, "errors")
    assert "no metrics file: cost not available" in section(page, "cost")
    assert "no metrics file: settings not available" in section(page, "settings")
    assert tile(page, "error") == "5"


def test_report_with_no_answers_at_all(tmp_path: Path) -> None:
    n = 20
    rows = pl.DataFrame(
        {
            "id": list(range(n)),
            "text": [f"t{i}" for i in range(n)],
            **{c: pl.Series([None] * n, dtype=t) for c, t in RESULT_SCHEMA.items()},
        }
    ).with_columns(
        pl.lit("error").alias("status"),
        pl.lit("not sent: spend ceiling reached").alias("error"),
    )
    m = metrics_dict(n, seconds=1) | {"timeline": []}
    m["requests"]["errors_by_kind"] = {"not_sent": n}
    out = write_run(tmp_path, rows, m)
    page = build_report(str(out))
    assert tile(page, "ok") == "0" and tile(page, "error") == "20"
    assert tile(page, "latency p50") == "—"
    assert "no latencies in these rows" in section(page, "latency")
    assert "no completion tokens in these rows" in section(page, "tokens")
    assert "fewer than two timeline samples" in section(page, "throughput")
    assert "20 rows: not sent: spend ceiling reached</h3>" in section(page, "errors")
    assert "<svg" in section(page, "errors")


def test_report_of_a_prefixed_csv_output(tmp_path: Path) -> None:
    out = write_run(tmp_path, output_rows(40, prefix="llm_"), metrics_dict(40), name="tickets.csv")
    page = build_report(str(out))
    assert tile(page, "ok") == "36" and tile(page, "error") == "4"
    assert "<svg" in section(page, "latency")
    assert "review number 3 says it is fine" in section(page, "errors")


def test_report_from_the_checkpoint_before_the_output_exists(tmp_path: Path) -> None:
    folder = tmp_path / "result.checkpoint"
    folder.mkdir()
    output_rows(30).select(list(RESULT_SCHEMA)).cast(RESULT_SCHEMA).write_parquet(folder / "results.parquet")  # type: ignore[arg-type]
    page = build_report(str(tmp_path / "result.parquet"))
    assert "does not exist yet" in page
    assert tile(page, "answers") == "30" and tile(page, "error") == "3"
    assert "<svg" in section(page, "latency")


def test_report_of_a_million_rows_stays_small(tmp_path: Path) -> None:
    n = 1_000_000
    t0 = time.perf_counter()
    out = write_run(tmp_path, output_rows(n), metrics_dict(n, seconds=3 * 3600))
    t1 = time.perf_counter()
    page = build_report(str(out))
    t2 = time.perf_counter()
    size = len(page.encode())
    print(f"\n1M rows: output written in {t1 - t0:.1f} s; report built in {t2 - t1:.1f} s, {size / 1e3:,.0f} kB")
    assert size < 2_000_000
    assert tile(page, "rows") == "1,000,000" and tile(page, "error") == "100,000"
    assert section(page, "errors").count("<tr><td>") == 6  # still three examples per message, not every failed row
    assert section(page, "samples").count("<tr><td>") == 5  # and five answers, not every row


def test_write_report_is_atomic_and_report_after_run_never_raises(tmp_path: Path) -> None:
    out = write_run(tmp_path, output_rows(20), metrics_dict(20))
    target = tmp_path / "deep" / "r.html"
    assert report_after_run(str(out), None, None, str(target)) is None
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in target.parent.iterdir()] == ["r.html"]  # no temp file left

    message = report_after_run(str(tmp_path / "missing.parquet"), None, None, str(tmp_path / "x.html"))
    assert message is not None and "could not be written" in message and "missing.parquet" in message
    assert not (tmp_path / "x.html").exists()
    (tmp_path / "bad.metrics.json").write_text("{not json")
    assert report_after_run(str(out), str(tmp_path / "bad.metrics.json"), None, str(target)) is None  # said on the page instead
    assert "unreadable" in target.read_text()
    write_report(target, "<p>new</p>")
    assert target.read_text() == "<p>new</p>"


def test_cli_report_writes_next_to_the_output_and_reports_mistakes(tmp_path: Path) -> None:
    out = write_run(tmp_path / "out", output_rows(20), metrics_dict(20))
    result = run_cli("report", str(out))
    assert result.exit_code == 0, result.output
    target = tmp_path / "out" / "result.report.html"
    assert f"Report written to {target}" in result.output
    assert "<svg" in section(target.read_text(), "latency")

    result = run_cli("report", str(out), "-o", str(tmp_path / "elsewhere.html"), "--metrics", str(tmp_path / "none.json"))
    assert result.exit_code == 2
    assert "--metrics" in result.output and "none.json does not exist" in result.output

    result = run_cli("report", str(tmp_path / "nothing.parquet"))
    assert result.exit_code == 2 and "nothing.parquet does not exist" in result.output
    assert "Traceback" not in result.output


def test_cli_help_does_not_import_the_plotting_libraries() -> None:
    code = "import sys; from pipeline.cli import cli; assert not {'altair', 'vl_convert'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


def earlier_run(folder: Path, started_at: str, *, rows_per_s: float, errors: int, output: str = "out/result.parquet") -> Path:
    """A metrics file an earlier run of a job left, named by its date as a nightly job may name it."""
    m = metrics_dict(100)
    m["run"]["started_at"] = started_at
    m["throughput"]["rows_per_s"] = rows_per_s
    m["rows"]["error"] = errors
    m["cost"]["this_run"] = 0.001 * errors
    m["paths"]["output"] = output
    path = folder / f"result-{started_at[:10]}.metrics.json"
    path.write_bytes(orjson.dumps(m))
    return path


def svgs(part: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", part, re.S)


def svg_texts(svg: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def test_report_draws_each_legend_with_its_chart_the_pace_and_requests_in_flight(tmp_path: Path) -> None:
    out = write_run(tmp_path, output_rows(100), metrics_dict(100))
    page = build_report(str(out))
    rows_chart, tokens_chart = svgs(section(page, "throughput"))
    assert "rows/s" in svg_texts(rows_chart) and "pace in force, requests/s" in svg_texts(rows_chart)
    assert not any("tokens/s" in t for t in svg_texts(rows_chart))  # the tokens' legend is not on the rows' chart
    assert {"prompt tokens/s", "completion tokens/s"} <= set(svg_texts(tokens_chart))
    (in_flight,) = svgs(section(page, "in-flight"))
    assert {"in flight", "limit (learned or given)"} <= set(svg_texts(in_flight))

    # A run with one pace and no per-second figure (an older metrics file): the pace is a line across.
    m = metrics_dict(100)
    for sample in m["timeline"]:
        del sample["pace_rpm"], sample["in_flight"]
    m["limits"] = {"pace_rpm": 600.0, "pace_source": "header", "concurrency": 8}
    old = write_run(tmp_path / "old", output_rows(100), m)
    page = build_report(str(old))
    assert "pace 600 requests/min (header)" in svg_texts(svgs(section(page, "throughput"))[0])
    assert "no requests in flight recorded" in section(page, "in-flight")


def test_counts_have_whole_number_axes(tmp_path: Path) -> None:
    rows = output_rows(10)  # one failed row: the axis used to count "0.0, 0.1 ... 1.0 rows"
    m = metrics_dict(10)
    m["requests"]["errors_by_kind"] = {"http_400": 1}
    page = build_report(str(write_run(tmp_path, rows, m)))
    for name in ("errors", "latency", "tokens", "in-flight"):
        ticks = [t for t in svg_texts(svgs(section(page, name))[0]) if re.fullmatch(r"[\d.,]+", t)]
        assert ticks and all(re.fullmatch(r"[\d,]+", t) for t in ticks), (name, ticks)


def test_the_job_and_its_date_come_first_and_answers_are_shown(tmp_path: Path) -> None:
    m = metrics_dict(100)
    m["config"]["input"] = ["data/tickets.csv"]
    page = build_report(str(write_run(tmp_path, output_rows(100), m)))
    job = re.search(r'<p class="job">(.*?)</p>', page, re.S)
    assert job is not None and page.index('<p class="job">') < page.index('<div class="tiles">')
    text = html.unescape(re.sub(r"<[^>]+>", "", job.group(1)))
    assert f"Job {tmp_path / 'result.parquet'} from data/tickets.csv, model tiny-model-7b" in text
    assert "run of 2026-11-26 22:00:00 UTC to 22:00:30 UTC" in text
    samples = section(page, "samples")
    assert (
        samples.count("<tr><td>") == 5 and "<td>1</td><td>0</td><td>review number 0 says it is fine</td><td>fine</td>" in samples
    )


def test_trend_across_runs_from_earlier_metrics_files_of_the_same_job(tmp_path: Path) -> None:
    out = write_run(tmp_path, output_rows(100), metrics_dict(100))
    page = build_report(str(out))
    assert "first run of this job" in section(page, "trend") and "<svg" not in section(page, "trend")

    earlier_run(tmp_path, "2026-11-24T22:00:00Z", rows_per_s=2.5, errors=30)
    earlier_run(tmp_path, "2026-11-25T22:00:00Z", rows_per_s=3.0, errors=20)
    earlier_run(tmp_path, "2026-11-23T22:00:00Z", rows_per_s=9.0, errors=1, output="out/another-job.parquet")
    page = build_report(str(out))
    trend = section(page, "trend")
    assert "3 runs of this job" in trend  # the other job's file is not one of them
    texts = svg_texts(svgs(trend)[0])
    assert {"rows/s", "errors", "cost"} <= set(texts)
    assert "2026-11-24 22:00" in texts and "2026-11-26 22:00" in texts and "2026-11-23 22:00" not in texts


def test_each_run_adds_a_line_to_the_runs_file_and_the_report_draws_the_trend(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": i, "text": f"review {i} says fine"} for i in range(6)])
    job = ["run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "S: {text}", "-m", "m", "--base-url", f"{server.url}/v1",
           "--no-progress", "--price-in", "1", "--price-out", "2"]  # fmt: skip
    assert run_cli(*job, "--limit", "3").exit_code == 0
    assert run_cli(*job).exit_code == 0
    lines = [orjson.loads(raw) for raw in Path("out/r.runs.jsonl").read_bytes().splitlines()]
    assert [(r["rows"], r["ok"], r["from_checkpoint"], r["errors"]) for r in lines] == [(3, 3, 0, 0), (6, 6, 3, 0)]
    assert all(r["schema"] == "pipeline.runs/1" and r["cost"] is not None and r["started_at"] for r in lines)
    trend = section(Path("out/r.report.html").read_text(), "trend")
    assert "2 runs of this job" in trend and "<svg" in trend


# --- in a real browser -------------------------------------------------------------------------------


async def _open_in_chromium(urls: list[str]) -> list[dict[str, Any]]:
    """Open each page in headless Chromium over the DevTools protocol; for each, what rendered and what it complained of."""
    # Chromium's helper processes may still write to the profile as it goes: clean up what can be cleaned.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = await asyncio.create_subprocess_exec(
            "chromium",
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1200,2000",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so the renderer and zygote stop with it
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            for _ in range(300):  # the browser writes its port when it is listening
                if port_file.exists() and port_file.read_text().count("\n") >= 1:
                    break
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = await r.json()
                ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                    return [await _visit(ws, url) for url in urls]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def _visit(ws: aiohttp.ClientWebSocketResponse, url: str) -> dict[str, Any]:
    ids = iter(range(1, 1_000_000))
    problems: list[str] = []
    requests: list[str] = []

    async def call(method: str, **params: Any) -> dict[str, Any]:
        n = next(ids)
        await ws.send_str(orjson.dumps({"id": n, "method": method, "params": params}).decode())
        while True:
            msg = orjson.loads((await ws.receive()).data)
            if msg.get("id") == n:
                return dict(msg.get("result", {}))
            note(msg)

    def note(msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert", "warning"):
            problems.append(f"console.{p['type']}: {p['args']}")
        elif method == "Runtime.exceptionThrown":
            problems.append(f"exception: {p['exceptionDetails']}")
        elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            problems.append(f"log {p['entry']['level']}: {p['entry']['text']}")
        elif method == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])

    for domain in ("Runtime", "Log", "Network", "Page"):
        await call(f"{domain}.enable")
    await call("Page.navigate", url=url)
    while True:  # until the page has loaded, noting what it said on the way
        msg = orjson.loads((await ws.receive()).data)
        note(msg)
        if msg.get("method") == "Page.loadEventFired":
            break
    measured = await call(
        "Runtime.evaluate",
        returnByValue=True,
        expression="""JSON.stringify({
            charts: [...document.querySelectorAll('section .chart svg')].map(s => {
                const r = s.getBoundingClientRect();
                return {section: s.closest('section').id, width: r.width, height: r.height, marks: s.querySelectorAll('path, rect, line').length};
            }),
            title: document.title,
            text: document.body.innerText,
        })""",
    )
    await asyncio.sleep(0.2)  # late console messages
    while True:
        try:
            msg = await ws.receive(timeout=0.05)
        except TimeoutError:
            break
        note(orjson.loads(msg.data))
    return {"problems": problems, "requests": requests, **orjson.loads(measured["result"]["value"])}


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium); the report was not opened in a browser",
)
def test_report_renders_in_headless_chromium_with_its_charts_and_no_console_errors(tmp_path: Path) -> None:
    out = write_run(tmp_path, output_rows(200), metrics_dict(200))
    earlier_run(tmp_path, "2026-11-25T22:00:00Z", rows_per_s=5.0, errors=12)
    report = tmp_path / "result.report.html"
    write_report(report, build_report(str(out)))
    # A control page that does complain: proves the listener hears console errors, failed loads and exceptions.
    control = tmp_path / "control.html"
    control.write_text(
        '<html><body><img src="missing.png"><script>console.error("control error"); undefined_function();</script></body></html>'
    )
    seen, heard = asyncio.run(_open_in_chromium([report.as_uri(), control.as_uri()]))

    assert seen["problems"] == [], seen["problems"]
    assert seen["title"] == "Run report: result.parquet"
    assert all(url.startswith(("file:", "data:", "about:")) for url in seen["requests"]), seen["requests"]
    drawn = [c["section"] for c in seen["charts"] if c["width"] > 200 and c["height"] > 50 and c["marks"] > 10]
    expected = ["throughput", "throughput", "in-flight", "latency", "tokens", "retries", "errors", "trend"]
    assert drawn == expected, seen["charts"]  # rows/s and tokens/s apart, each with its own legend
    # The job and its date come first, before any figure.
    assert seen["text"].index("run of 2026-11-26 22:00:00 UTC") < seen["text"].index("latency p50")
    assert "HTTP 503 Service Unavailable (after 4 attempts)" in seen["text"]

    said = " | ".join(heard["problems"])
    assert "control error" in said and "undefined_function" in said, said
