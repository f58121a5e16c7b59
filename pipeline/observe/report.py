"""The run report: one self-contained HTML page about a run, readable offline.

It is drawn from what lies beside the output, never from the engine: the output (or, before
the run has finished, its checkpoint's answers) and the metrics file, read by `facts`; the
job's earlier runs, read by `history`; the charts drawn by `charts`. This module lays out the
page: the job and its date first, then the figures, the charts (each with its own legend),
sample answers, errors with examples, the trend across runs, cost and settings (secrets
masked, whatever wrote the metrics file). Without a metrics file the page still shows
everything the output knows and says what is missing.

Charts are inline SVG, so the page has no script and loads nothing.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline.observe import charts, history
from pipeline.observe.facts import Facts, default_metrics, read_facts, read_metrics
from pipeline.observe.show import _view  # the prefix detection and the lazy, any-format read of `pipeline show`

CELL_CHARS = 300
# Settings whose values could be secrets are masked, whatever wrote the metrics file: a key must never reach the page.
_SECRET_NAME = re.compile(r"(^|_|-)(api_?key|key|secret|password|token|authorization|auth)$", re.IGNORECASE)
_SECRET_HEADER = re.compile(r"authorization|api[-_]?key|token|secret|cookie", re.IGNORECASE)


def build_report(output: str, *, metrics: str | None = None, checkpoint_dir: str | None = None) -> str:
    """The report's HTML for `output` (Parquet, CSV or JSONL; or its checkpoint before it exists).

    `metrics` defaults to `<output stem>.metrics.json` beside the output; a missing one is
    said on the page, an unreadable one too. Raises InputError for an output it cannot read."""
    view = _view(output, checkpoint_dir)
    facts = read_facts(view)
    metrics_path = Path(metrics) if metrics else default_metrics(output)
    data, metrics_note = read_metrics(metrics_path, explicit=metrics is not None)
    runs = history.runs(metrics_path, data) if data is not None and metrics_path is not None else []
    return _page(output, facts, data, metrics_note, runs)


def write_report(path: str | Path, page: str) -> None:
    """Write atomically (temp file, fsync, rename): a reader never sees half a page."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_report_path(output: str) -> Path:
    p = Path(output)
    return p.with_name(p.stem + ".report.html")


def report_after_run(output_path: str, metrics_path: str | None, checkpoint_dir: str | None, report_path: str) -> str | None:
    """Build and write the report at the end of a run. Returns None, or what went wrong: a run
    must not fail (or change its exit code) because its report could not be drawn."""
    try:
        write_report(report_path, build_report(output_path, metrics=metrics_path, checkpoint_dir=checkpoint_dir))
    except Exception as exc:  # any failure of drawing, whatever the library raises
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the run report {report_path} could not be written: {first}"
    return None


def _charts(facts: Facts, m: dict[str, Any] | None, max_tokens: int | None, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every chart the page has, as SVG, by section (the throughput section has two)."""
    out: dict[str, Any] = {}
    timeline = (m or {}).get("timeline") or []
    if len(timeline) >= 2:
        limit_rpm, label = _pace_limit(m or {})
        out["throughput"] = [charts.throughput(timeline, limit_rpm, label), charts.token_rates(timeline)]
        out["in-flight"] = charts.in_flight(timeline)
        out["retries"] = charts.retries(timeline)
    if facts.latency.height:
        out["latency"] = charts.latency(facts.latency, facts.latency_q)
    if facts.tokens.height:
        out["tokens"] = charts.completion_tokens(facts.tokens, max_tokens)
    kinds = _error_kinds(facts, m)
    if kinds.height:
        out["errors"] = charts.error_kinds(kinds)
    out["trend"] = charts.trend(runs)
    return out


def _pace_limit(m: dict[str, Any]) -> tuple[float | None, str]:
    """The one request pace of a run whose timeline does not say it per second: the learned or given one."""
    limits = m.get("limits") or {}
    given = (limits.get("given") or {}).get("rpm") or (m.get("config") or {}).get("rpm")
    rpm = limits.get("pace_rpm") or limits.get("rpm") or given
    if not isinstance(rpm, int | float) or rpm <= 0:
        return None, ""
    source = limits.get("pace_source") or ("user" if given else None)
    return float(rpm), f"pace {rpm:,.0f} requests/min" + (f" ({source})" if source else "")


def _error_kinds(facts: Facts, m: dict[str, Any] | None) -> pl.DataFrame:
    """Errors by kind as the engine labelled them (metrics), else by message (the output only has the text)."""
    by_kind = ((m or {}).get("requests") or {}).get("errors_by_kind") or {}
    if by_kind:
        return pl.DataFrame({"kind": list(by_kind), "rows": [int(v) for v in by_kind.values()]}).filter(pl.col("rows") > 0)
    return facts.errors.select(pl.col("group").str.slice(0, 60).alias("kind"), "rows")


# --- the page ----------------------------------------------------------------------------------------


def _page(output: str, facts: Facts, m: dict[str, Any] | None, metrics_note: str, runs: list[dict[str, Any]]) -> str:
    config = _redact((m or {}).get("config") or {})
    max_tokens = config.get("max_tokens") if isinstance(config.get("max_tokens"), int) else None
    drawn = _charts(facts, m, max_tokens, runs)
    no_metrics = f"{metrics_note}: timeline not available" if m is None else "the run has fewer than two timeline samples"
    run = (m or {}).get("run") or {}
    total = sum(facts.counts.values())
    ok, err = facts.counts.get("ok", 0), facts.counts.get("error", 0)
    e = html.escape
    parts: list[str] = []
    title = f"Run report: {Path(output).name}"
    parts.append(f"<h1>{e(title)}</h1>")
    parts.append(f'<p class="job">{_job_line(output, run, config)}</p>')
    lead = f"{e(facts.source)}"
    if run:
        lead += f" · outcome <b>{e(str(run.get('outcome', '?')))}</b> (exit {e(str(run.get('exit_code', '?')))})"
        if run.get("reason"):
            lead += f": {e(str(run['reason']))}"
    parts.append(f'<p class="lead">{lead}</p>')
    if facts.note:
        parts.append(f'<p class="note">{e(facts.note)}</p>')
    if m is None:
        parts.append(
            f'<p class="note">{e(metrics_note)}: the timeline, retries, 429s, cost and settings are not available; the rest is from the {facts.unit}s.</p>'
        )

    q = facts.latency_q
    tiles = [
        (f"{facts.unit}s", f"{total:,}"),
        ("ok", f"{ok:,}"),
        ("error", f"{err:,}"),
        ("latency p50", _ms(q["p50"])),
        ("latency p95", _ms(q["p95"])),
        ("hit max_tokens", f"{facts.hit_length:,}"),
        ("prompt tokens", _int(facts.tokens_sum["prompt"])),
        ("completion tokens", _int(facts.tokens_sum["completion"])),
    ]
    if run.get("wall_s") is not None:
        tiles.append(("wall time", f"{float(run['wall_s']):,.1f} s"))
    rps = ((m or {}).get("throughput") or {}).get("rows_per_s")
    if rps is not None:
        tiles.append(("rows/s", f"{float(rps):,.2f}"))
    parts.append(
        '<div class="tiles">'
        + "".join(f'<div class="tile" data-name="{e(k)}"><span>{e(k)}</span><b>{e(v)}</b></div>' for k, v in tiles)
        + "</div>"
    )

    parts.append('<div class="grid">')
    smooth = (
        f"moving rates over {charts.SMOOTH} samples of the run's timeline (one a second); the dashed line is the request "
        "pace in force, where there was one"
        if "throughput" in drawn
        else ""
    )
    parts.append(_section("Throughput over time", drawn.get("throughput"), no_metrics, "throughput", smooth))
    in_flight = "no requests in flight recorded in the timeline" if "throughput" in drawn else no_metrics
    parts.append(
        _section(
            "Requests in flight",
            drawn.get("in-flight"),
            in_flight,
            "in-flight",
            "requests sent and not yet answered, each second",
        )
    )
    parts.append(
        _section(
            "Latency",
            drawn.get("latency"),
            f"no latencies in these {facts.unit}s",
            "latency",
            f"p50 {_ms(q['p50'])} · p95 {_ms(q['p95'])} · p99 {_ms(q['p99'])}, over the {facts.unit}s with an answer",
        )
    )
    length_note = f"{facts.hit_length:,} {facts.unit}{'s' if facts.hit_length != 1 else ''} hit max_tokens (finish_reason length)"
    parts.append(
        _section("Completion tokens", drawn.get("tokens"), f"no completion tokens in these {facts.unit}s", "tokens", length_note)
    )
    parts.append(_section("Retries and 429s over time", drawn.get("retries"), no_metrics, "retries", _retry_note(m)))
    parts.append("</div>")

    parts.append(_models(facts, m))
    parts.append(_samples(facts))
    parts.append(_errors(facts, drawn.get("errors")))
    parts.append(_trend(runs, drawn.get("trend")))
    parts.append(_cost(m))
    parts.append(_settings(m, config))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = f" {run['version']}" if run.get("version") else ""
    parts.append(
        f'<p class="foot">pipeline{e(str(version))} · report drawn {stamp} · rebuild with <code>pipeline report {e(output)}</code></p>'
    )
    return _HEAD.replace("{title}", e(title)) + "\n".join(parts) + "\n</body>\n</html>\n"


def _job_line(output: str, run: dict[str, Any], config: dict[str, Any]) -> str:
    """The job and when it ran, first on the page: whoever opens it next morning asks that before anything."""
    e = html.escape
    inputs = config.get("input") or []
    job = f"Job <b>{e(output)}</b>" + (f" from {e(', '.join(map(str, inputs)))}" if inputs else "")
    if config.get("model"):
        job += f", model {e(str(config['model']))}"
    elif config.get("models"):
        names = [str(x.get("model") if isinstance(x, dict) else x) for x in config["models"]]
        job += f", models {e(', '.join(names))}"
    started, ended = _when(run.get("started_at")), _when(run.get("ended_at"))
    if started:
        job += f" · run of <b>{e(started)}</b>" + (
            f" to {e(ended[11:] if ended[:10] == started[:10] else ended)}" if ended else ""
        )
    else:
        job += " · no metrics file: when it ran is not known"
    return job


def _when(stamp: Any) -> str:
    """An ISO timestamp from the metrics as 2026-11-26 22:00:00 UTC; '' when absent or unreadable."""
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return ""
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _samples(facts: Facts) -> str:
    """A handful of answers as they came, with the input they answer (the errors follow, with theirs)."""
    e = html.escape
    if facts.answers.height == 0:
        return f'<section id="samples"><h2>Sample answers</h2><p class="missing">no {facts.unit}s with status ok</p></section>'
    head = "".join(f"<th>{e(c)}</th>" for c in ("row", *facts.input_columns, "completion"))
    body = "".join(
        "<tr>"
        + f"<td>{r['__row']:,}</td>"
        + "".join(f"<td>{e(_cell(r[c]))}</td>" for c in facts.input_columns)
        + f"<td>{e(_cell(r['__answer']))}</td></tr>"
        for r in facts.answers.iter_rows(named=True)
    )
    caption = f'<p class="caption">the first {facts.answers.height} answered {facts.unit}s; examples of errors are below</p>'
    return (
        f'<section id="samples"><h2>Sample answers</h2>{caption}<table class="examples"><tr>{head}</tr>{body}</table></section>'
    )


def _models(facts: Facts, m: dict[str, Any] | None) -> str:
    """Several models compared, a row each: their rows of the output (ok, errors, latency, tokens, cost),
    and this run's requests and 429s from the metrics. Nothing for a run of one model."""
    if facts.by_model is None:
        return ""
    e = html.escape
    sent = {str(x.get("model")): x for x in (m or {}).get("models") or []}
    head = "".join(
        f"<th>{e(c)}</th>"
        for c in ("model", "rows", "ok", "error", "latency p50", "latency p95", "prompt tokens", "completion tokens",
                  "cost", "requests this run", "429s this run")
    )  # fmt: skip
    body = []
    for r in facts.by_model.iter_rows(named=True):
        run = sent.get(str(r["model"])) or {}
        limited = (run.get("requests") or {}).get("rate_limited") or {}
        cells = [
            _cell(r["model"]), _int(r["rows"]), _int(r["ok"]), _int(r["error"]), _ms(r["p50"]), _ms(r["p95"]),
            _int(r["prompt_tokens"]), _int(r["completion_tokens"]), _money(r["cost_usd"]),
            _int((run.get("requests") or {}).get("sent")),
            _int((limited.get("rate") or 0) + (limited.get("concurrency") or 0)) if limited else "—",
        ]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    caption = (
        f"each model's {facts.unit}s of this output (answers kept from earlier runs included); requests and 429s are "
        "this run's, from the metrics file"
    )
    return (
        f'<section id="models"><h2>Models compared</h2><p class="caption">{e(caption)}</p>'
        f'<table class="examples"><tr>{head}</tr>{"".join(body)}</table></section>'
    )


def _trend(runs: list[dict[str, Any]], svg: str | None) -> str:
    if svg is None:
        why = "this is the first run of this job with a metrics file" if len(runs) < 2 else "no figures to compare"
        return f'<section id="trend"><h2>Across runs</h2><p class="missing">{html.escape(why)}</p></section>'
    caption = (
        f"{len(runs)} runs of this job, oldest first: rows/s, rows with errors and cost of each run (from the "
        "<output>.runs.jsonl file each run adds a line to, and earlier metrics files of this output beside it)"
    )
    return _section("Across runs", svg, "", "trend", caption)


def _section(title: str, svg: str | list[str] | None, missing: str, name: str, caption: str = "") -> str:
    svgs = [svg] if isinstance(svg, str) else svg or []
    body = "".join(f'<div class="chart">{one}</div>' for one in svgs) or f'<p class="missing">{html.escape(missing)}</p>'
    cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
    return f'<section id="{name}"><h2>{html.escape(title)}</h2>{cap}{body}</section>'


def _retry_note(m: dict[str, Any] | None) -> str:
    if m is None:
        return ""
    req = m.get("requests") or {}
    limited = req.get("rate_limited") or {}
    return (
        f"{_int(req.get('sent'))} requests sent, {_int(req.get('retries'))} retries; 429s: "
        f"{_int(limited.get('rate'))} rate, {_int(limited.get('concurrency'))} concurrency; "
        f"{_int(req.get('outage_holds'))} outage holds"
    )


def _errors(facts: Facts, svg: str | None) -> str:
    e = html.escape
    if facts.errors.height == 0:
        return f'<section id="errors"><h2>Errors</h2><p class="missing">no {facts.unit}s with status error</p></section>'
    chart = f'<div class="chart">{svg}</div>' if svg else ""
    head = "".join(f"<th>{e(c)}</th>" for c in ("row", *facts.input_columns, "error"))
    blocks = []
    for grp, rows in facts.errors.iter_rows():
        sample = facts.examples.filter(pl.col("group") == grp)
        body = "".join(
            "<tr>"
            + f"<td>{r['row']:,}</td>"
            + "".join(f"<td>{e(_cell(r[c]))}</td>" for c in facts.input_columns)
            + f"<td>{e(_cell(r['error']))}</td></tr>"
            for r in sample.iter_rows(named=True)
        )
        blocks.append(
            f'<h3>{rows:,} {facts.unit}{"s" if rows != 1 else ""}: {e(_cell(grp))}</h3><table class="examples"><tr>{head}</tr>{body}</table>'
        )
    return f'<section id="errors"><h2>Errors</h2>{chart}{"".join(blocks)}</section>'


def _cost(m: dict[str, Any] | None) -> str:
    if m is None:
        body = '<p class="missing">no metrics file: cost not available</p>'
    elif not m.get("cost"):
        body = '<p class="missing">no prices configured (price_in, price_out): cost not computed</p>'
    else:
        c = m["cost"]
        rows = [
            ("this run", _money(c.get("this_run"))),
            ("all runs on this output", _money(c.get("all_runs"))),
            ("ceiling (max_cost)", _money(c.get("max_cost")) if c.get("max_cost") is not None else "none"),
            ("ceiling reached", "yes" if c.get("ceiling_reached") else "no"),
            ("price in / out per million tokens", f"{c.get('price_in')} / {c.get('price_out')}"),
        ]
        body = _table(rows)
    tokens = (m or {}).get("tokens") or {}
    if tokens:
        body += _table(
            [
                ("prompt tokens (this run)", _int(tokens.get("prompt"))),
                ("completion tokens (this run)", _int(tokens.get("completion"))),
                ("rows with estimated tokens", _int(tokens.get("estimated_rows"))),
            ]
        )
    return f'<section id="cost"><h2>Cost</h2>{body}</section>'


def _settings(m: dict[str, Any] | None, config: dict[str, Any]) -> str:
    if m is None:
        return '<section id="settings"><h2>Settings</h2><p class="missing">no metrics file: settings not available</p></section>'
    rows = [(k, _value(v)) for k, v in config.items() if v not in (None, {}, [], "")]  # unset settings left out: shorter
    body = _table(rows) if rows else '<p class="missing">no settings in the metrics file</p>'
    extra = ""
    for name in ("rows", "limits", "paths"):
        block = m.get(name)
        if isinstance(block, dict) and block:
            extra += f"<h3>{name}</h3>" + _table([(k, _value(v)) for k, v in _redact(block).items()])
    return f'<section id="settings"><h2>Settings</h2>{body}{extra}</section>'


def _redact(values: dict[str, Any]) -> dict[str, Any]:
    """A copy with anything that could be a secret masked: api_key_env (a variable's name) stays, its value never came here."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if _SECRET_NAME.search(k) and not k.endswith("_env") and v is not None:
            out[k] = "(hidden)"
        elif k == "headers" and isinstance(v, dict):
            out[k] = {h: "(hidden)" if _SECRET_HEADER.search(h) else x for h, x in v.items()}
        elif isinstance(v, dict):
            out[k] = _redact(v)
        else:
            out[k] = v
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    e = html.escape
    return '<table class="kv">' + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>"


def _value(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v, default=str).decode()


def _cell(v: Any) -> str:
    text = "null" if v is None else str(v)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f} ms"


def _int(v: Any) -> str:
    return "—" if v is None else f"{int(v):,}"


def _money(v: Any) -> str:
    return "—" if v is None else f"{float(v):,.4f}"


_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1160px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 0 0 6px; } h3 { font-size: 14px; margin: 14px 0 4px; }
.job { color: #222; margin: 0 0 4px; } .lead { color: #444; margin: 0 0 12px; } .note { background: #fff7e0; border-left: 4px solid #f0b400; padding: 6px 10px; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; margin: 12px 0 18px; }
.tile { border: 1px solid #ddd; border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.tile span { display: block; color: #666; font-size: 12px; } .tile b { font-size: 18px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap: 18px; }
section { border: 1px solid #e4e4e4; border-radius: 6px; padding: 12px 14px; margin-bottom: 18px; overflow-x: auto; }
.chart svg { max-width: 100%; height: auto; } .caption { color: #555; margin: 0 0 6px; } .missing { color: #888; font-style: italic; }
table { border-collapse: collapse; margin: 4px 0 10px; } th, td { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left; vertical-align: top; }
table.kv th { color: #555; font-weight: 500; white-space: nowrap; } table.examples td { max-width: 420px; word-break: break-word; }
.foot { color: #888; font-size: 12px; }
</style>
</head>
<body>
"""
