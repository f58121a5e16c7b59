"""The run report: one self-contained HTML page about a run, readable offline.

It is drawn from two things beside the output, and never from the engine:

- the output itself (or, before the run has finished, its checkpoint's answers),
  read lazily through `pipeline.observe.show`'s view and reduced in polars to a few
  small tables: status counts, latency and completion-token histograms and
  quantiles, errors grouped by message with a few example rows. Only the
  columns needed are read, so a 1M-row output costs a scan, not a loop;
- the metrics file (`<output stem>.metrics.json`, schema "pipeline.metrics/1"):
  the per-second timeline (cumulative counters, differentiated here into
  rates), retries and 429s, cost, the limits and the settings. Without it the
  report still draws everything the output knows and says what is missing.

Charts are Altair specs rendered to SVG by vl-convert (an embedded V8 and the
Vega libraries, no network) and inlined, so the page has no script and loads
nothing. Both libraries are imported inside the functions that use them: they
cost about half a second, which `pipeline --help` and `pipeline run` must not pay.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.observe.show import View, _view  # the prefix detection and the lazy, any-format read of `pipeline show`

METRICS_SCHEMA = "pipeline.metrics/1"
MAX_POINTS = 600  # timeline points per chart: a long run is bucketed so the page stays small
BINS = 40
SMOOTH = 5  # timeline points per moving rate
EXAMPLES = 3  # example rows per error group
ERROR_GROUPS = 10
INPUT_COLUMNS_SHOWN = 3
CELL_CHARS = 300
# Settings whose values could be secrets are masked, whatever wrote the metrics file: a key must never reach the page.
_SECRET_NAME = re.compile(r"(^|_|-)(api_?key|key|secret|password|token|authorization|auth)$", re.IGNORECASE)
_SECRET_HEADER = re.compile(r"authorization|api[-_]?key|token|secret|cookie", re.IGNORECASE)
_ATTEMPTS = r" \(after \d+ attempts?\)$"  # the engine's suffix on an error message; grouping ignores it


@dataclass
class Facts:
    """What the output says, reduced to small tables."""

    source: str
    unit: str
    note: str
    counts: dict[str, int]
    latency: pl.DataFrame  # histogram: start, end, rows
    latency_q: dict[str, float | None]
    tokens: pl.DataFrame  # histogram of completion tokens
    tokens_sum: dict[str, int | None]
    hit_length: int
    errors: pl.DataFrame  # group, rows
    examples: pl.DataFrame  # group, row, error, input columns...
    input_columns: list[str] = field(default_factory=list)


def build_report(output: str, *, metrics: str | None = None, checkpoint_dir: str | None = None) -> str:
    """The report's HTML for `output` (Parquet, CSV or JSONL; or its checkpoint before it exists).

    `metrics` defaults to `<output stem>.metrics.json` beside the output; a missing one is
    said on the page, an unreadable one too. Raises InputError for an output it cannot read."""
    view = _view(output, checkpoint_dir)
    facts = _facts(view)
    metrics_path = Path(metrics) if metrics else _default_metrics(output)
    data, metrics_note = _read_metrics(metrics_path, explicit=metrics is not None)
    return _page(output, facts, data, metrics_note)


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


# --- reading -----------------------------------------------------------------------------------------


def _default_metrics(output: str) -> Path | None:
    p = Path(output)
    if output == "-" or (p.is_dir() and not any(p.glob("part-*.parquet"))):
        return None
    return p.with_name(p.stem + ".metrics.json")  # a folder of parts too: out/parts.metrics.json


def _read_metrics(path: Path | None, *, explicit: bool) -> tuple[dict[str, Any] | None, str]:
    if path is None:
        return None, "no metrics file"
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        if explicit:
            raise InputError(
                f"--metrics {path} does not exist. Give the metrics file the run wrote, or leave --metrics out."
            ) from None
        return None, f"no metrics file ({path.name} not found)"
    except (OSError, orjson.JSONDecodeError) as exc:
        return None, f"metrics file {path.name} unreadable ({str(exc).splitlines()[0]})"
    if not isinstance(data, dict) or data.get("schema") != METRICS_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        return None, f"metrics file {path.name} has schema {found!r}, not {METRICS_SCHEMA!r}"
    return data, ""


def _facts(view: View) -> Facts:
    p = view.prefix
    result_names = {p + c for c in ("completion", "prompt_tokens", "completion_tokens", "total_tokens", "finish_reason")}
    result_names |= {p + c for c in ("model", "status", "error", "attempts", "latency_ms", "request_key", "tokens_estimated")}
    first_result = min((view.names.index(n) for n in result_names if n in view.names), default=len(view.names))
    inputs = view.names[:first_result][:INPUT_COLUMNS_SHOWN]

    def col(name: str, dtype: pl.DataType) -> pl.Expr:
        # A CSV output is read as text, a column may be missing in an old output: cast softly, null when absent.
        if p + name in view.names:
            return pl.col(p + name).cast(dtype, strict=False).alias(name)
        return pl.lit(None, dtype=dtype).alias(name)

    frame = view.frame.select(
        *inputs,
        col("status", pl.String()),
        col("error", pl.String()),
        col("finish_reason", pl.String()),
        col("latency_ms", pl.Float64()),
        col("prompt_tokens", pl.Int64()),
        col("completion_tokens", pl.Int64()),
    )
    group = pl.col("error").fill_null("(no message)").str.replace(_ATTEMPTS, "").alias("group")
    errors = frame.filter(pl.col("status") == "error").with_row_index("n")
    try:
        # One streaming pass per figure rather than collect_all: collect_all shares the scan between the
        # queries by caching it whole, which held every row of a 10M-row output in memory (3 GB measured).
        counts, lat_q, tok, errs = (
            q.collect(engine="streaming")
            for q in [
                frame.group_by("status").len().sort("status"),
                frame.select(
                    pl.col("latency_ms").quantile(0.5, "linear").alias("p50"),
                    pl.col("latency_ms").quantile(0.95, "linear").alias("p95"),
                    pl.col("latency_ms").quantile(0.99, "linear").alias("p99"),
                    pl.col("latency_ms").min().alias("min"),
                    pl.col("latency_ms").max().alias("max"),
                    pl.col("completion_tokens").min().alias("tmin"),
                    pl.col("completion_tokens").max().alias("tmax"),
                ),
                frame.select(
                    pl.col("prompt_tokens").sum().alias("prompt"),
                    pl.col("completion_tokens").sum().alias("completion"),
                    (pl.col("finish_reason") == "length").sum().alias("length"),
                ),
                errors.group_by(group)
                .agg(pl.len().alias("rows"), pl.col("n").min().alias("first"))
                .sort(["rows", "first"], descending=[True, False]),
            ]
        )
        q = lat_q.row(0, named=True)
        latency = _histogram(frame, "latency_ms", q["min"], q["max"], integer=False)
        tokens = _histogram(frame, "completion_tokens", q["tmin"], q["tmax"], integer=True)
        top = errs.head(ERROR_GROUPS)
        # A few rows per group, each look-up stopping at its first EXAMPLES matches: never every error row
        # with its input columns in memory (an output of a million failed rows is one group).
        numbered = frame.with_row_index("row", offset=1).filter(pl.col("status") == "error").with_columns(group)
        found = [
            numbered.filter(pl.col("group") == g)
            .head(EXAMPLES)
            .select("group", "row", "error", *inputs)
            .collect(engine="streaming")
            for g in top["group"].to_list()
        ]
        examples = pl.concat(found) if found else pl.DataFrame(schema={"group": pl.String, "row": pl.UInt32, "error": pl.String})
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(
            f"Cannot read {view.label}: {str(exc).splitlines()[0]}. Give the --output of a `pipeline run`."
        ) from None
    t = tok.row(0, named=True)
    return Facts(
        source=view.label,
        unit=view.unit,
        note=view.note,
        counts={str(s): n for s, n in counts.iter_rows()},
        latency=latency,
        latency_q={k: q[k] for k in ("p50", "p95", "p99")},
        tokens=tokens,
        tokens_sum={"prompt": t["prompt"], "completion": t["completion"]},
        hit_length=int(t["length"] or 0),
        errors=top.select("group", "rows"),
        examples=examples,
        input_columns=inputs,
    )


def _histogram(frame: pl.LazyFrame, name: str, lo: float | None, hi: float | None, *, integer: bool) -> pl.DataFrame:
    """Counts in BINS equal bins from lo to hi, computed by polars: the chart gets BINS rows, not the column."""
    if lo is None or hi is None:
        return pl.DataFrame(schema={"start": pl.Float64, "end": pl.Float64, "rows": pl.UInt32})
    width = max((hi - lo) / BINS, 1.0 if integer else 1e-9)
    if integer:
        width = float(int(width) + (width > int(width)))
    b = ((pl.col(name) - lo) / width).floor().clip(0, BINS - 1 if hi > lo else 0)
    return (
        frame.filter(pl.col(name).is_not_null())
        .group_by(b.alias("b"))
        .len("rows")
        .select((pl.col("b") * width + lo).alias("start"), (pl.col("b") * width + lo + width).alias("end"), "rows")
        .sort("start")
        .collect(engine="streaming")
    )


def _rates(timeline: list[dict[str, Any]], counters: dict[str, str]) -> pl.DataFrame:
    """Per-second rates from the cumulative timeline, over at most MAX_POINTS buckets; long format (t, series, per_s)."""
    names = list(counters)
    tl = pl.DataFrame(timeline).select(
        "t", *[pl.col(c).cast(pl.Float64) if c in timeline[0] else pl.lit(0.0).alias(c) for c in names]
    )
    tl = tl.sort("t")
    span = float(tl.select(pl.col("t").max() - pl.col("t").min()).item() or 0)
    step = max(span / MAX_POINTS, 1.0)
    # The last sample of each bucket; samples may be irregular (the metrics thin a long timeline), so divide by real dt.
    tl = (
        tl.with_columns((pl.col("t") / step).floor().alias("bucket"))
        .group_by("bucket", maintain_order=True)
        .last()
        .drop("bucket")
    )

    # A moving rate over SMOOTH samples: one answer every few seconds is a steady pace, not a comb of spikes.
    # Before SMOOTH samples exist, the rate since the start.
    def rate(c: str) -> pl.Expr:
        moving = pl.col(c).diff(n=SMOOTH) / pl.col("t").diff(n=SMOOTH)
        since_start = (pl.col(c) - pl.col(c).first()) / (pl.col("t") - pl.col("t").first())
        return pl.coalesce(moving, since_start).clip(lower_bound=0).alias(counters[c])

    rates = tl.select("t", (pl.col("t") - pl.col("t").first()).alias("dt"), *[rate(c) for c in names])
    rates = rates.filter(pl.col("dt") > 0).drop("dt")  # the first sample (or several at one instant) has no rate yet
    return rates.unpivot(index="t", variable_name="series", value_name="per_s")


# --- drawing -----------------------------------------------------------------------------------------


def _svg(chart: Any) -> str:
    import vl_convert as vlc

    svg: str = vlc.vegalite_to_svg(chart.to_dict())
    return svg


def _charts(facts: Facts, m: dict[str, Any] | None, max_tokens: int | None) -> dict[str, str]:
    import altair as alt

    width = 460
    out: dict[str, str] = {}
    timeline = (m or {}).get("timeline") or []
    if len(timeline) >= 2:
        thr = _rates(timeline, {"rows": "rows/s", "prompt_tokens": "prompt tokens/s", "completion_tokens": "completion tokens/s"})
        base = alt.Chart(thr).mark_line(interpolate="step-after").encode(x=alt.X("t:Q", title="seconds since start"))
        rows = base.transform_filter(alt.datum.series == "rows/s").encode(y=alt.Y("per_s:Q", title="rows/s"))
        toks = base.transform_filter(alt.datum.series != "rows/s").encode(
            y=alt.Y("per_s:Q", title="tokens/s"), color=alt.Color("series:N", title=None, legend=alt.Legend(orient="top"))
        )
        out["throughput"] = _svg(alt.vconcat(rows.properties(width=width, height=120), toks.properties(width=width, height=120)))
        trouble = _rates(
            timeline, {"retries": "retries/s", "limited_rate": "429 rate/s", "limited_concurrency": "429 concurrency/s"}
        )
        out["retries"] = _svg(
            alt.Chart(trouble)
            .mark_line(interpolate="step-after")
            .encode(
                x=alt.X("t:Q", title="seconds since start"),
                y=alt.Y("per_s:Q", title="per second"),
                color=alt.Color("series:N", title=None, legend=alt.Legend(orient="top")),
            )
            .properties(width=width, height=200)
        )
    if facts.latency.height:
        bars = (
            alt.Chart(facts.latency)
            .mark_bar(color="#4c78a8")
            .encode(x=alt.X("start:Q", bin="binned", title="latency (ms)"), x2="end:Q", y=alt.Y("rows:Q", title="rows"))
        )
        marks = pl.DataFrame(
            [{"q": k, "ms": v, "label": f"{k} {v:,.0f} ms"} for k, v in facts.latency_q.items() if k != "p99" and v is not None]
        )
        rule = alt.Chart(marks).mark_rule(color="#e45756", strokeDash=[4, 3]).encode(x="ms:Q")
        text = (
            alt.Chart(marks)
            .mark_text(align="left", dx=4, dy=-4, color="#e45756")
            .encode(x="ms:Q", y=alt.value(10), text="label:N")
        )
        out["latency"] = _svg((bars + rule + text).properties(width=width, height=220))
    if facts.tokens.height:
        chart = (
            alt.Chart(facts.tokens)
            .mark_bar(color="#72b7b2")
            .encode(x=alt.X("start:Q", bin="binned", title="completion tokens"), x2="end:Q", y=alt.Y("rows:Q", title="rows"))
        )
        if max_tokens:
            limit = pl.DataFrame({"x": [float(max_tokens)], "label": [f"max_tokens {max_tokens}"]})
            chart = chart + alt.Chart(limit).mark_rule(color="#e45756", strokeDash=[4, 3]).encode(x="x:Q")
            chart = chart + alt.Chart(limit).mark_text(align="right", dx=-4, dy=-4, color="#e45756").encode(
                x="x:Q", y=alt.value(10), text="label:N"
            )
        out["tokens"] = _svg(chart.properties(width=width, height=220))
    kinds = _error_kinds(facts, m)
    if kinds.height:
        out["errors"] = _svg(
            alt.Chart(kinds)
            .mark_bar(color="#e45756")
            .encode(y=alt.Y("kind:N", sort="-x", title=None), x=alt.X("rows:Q", title="rows"))
            .properties(width=width - 160, height=max(40, 22 * kinds.height))
        )
    return out


def _error_kinds(facts: Facts, m: dict[str, Any] | None) -> pl.DataFrame:
    """Errors by kind as the engine labelled them (metrics), else by message (the output only has the text)."""
    by_kind = ((m or {}).get("requests") or {}).get("errors_by_kind") or {}
    if by_kind:
        return pl.DataFrame({"kind": list(by_kind), "rows": [int(v) for v in by_kind.values()]}).filter(pl.col("rows") > 0)
    return facts.errors.select(pl.col("group").str.slice(0, 60).alias("kind"), "rows")


# --- the page ----------------------------------------------------------------------------------------


def _page(output: str, facts: Facts, m: dict[str, Any] | None, metrics_note: str) -> str:
    config = _redact((m or {}).get("config") or {})
    max_tokens = config.get("max_tokens") if isinstance(config.get("max_tokens"), int) else None
    charts = _charts(facts, m, max_tokens)
    no_metrics = f"{metrics_note}: timeline not available" if m is None else "the run has fewer than two timeline samples"
    run = (m or {}).get("run") or {}
    total = sum(facts.counts.values())
    ok, err = facts.counts.get("ok", 0), facts.counts.get("error", 0)
    e = html.escape
    parts: list[str] = []
    title = f"Run report: {Path(output).name}"
    parts.append(f"<h1>{e(title)}</h1>")
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
    smooth = f"moving rates over {SMOOTH} samples of the run's timeline (one a second)" if "throughput" in charts else ""
    parts.append(_section("Throughput over time", charts.get("throughput"), no_metrics, "throughput", smooth))
    parts.append(
        _section(
            "Latency",
            charts.get("latency"),
            f"no latencies in these {facts.unit}s",
            "latency",
            f"p50 {_ms(q['p50'])} · p95 {_ms(q['p95'])} · p99 {_ms(q['p99'])}, over the {facts.unit}s with an answer",
        )
    )
    length_note = f"{facts.hit_length:,} {facts.unit}{'s' if facts.hit_length != 1 else ''} hit max_tokens (finish_reason length)"
    parts.append(
        _section("Completion tokens", charts.get("tokens"), f"no completion tokens in these {facts.unit}s", "tokens", length_note)
    )
    parts.append(_section("Retries and 429s over time", charts.get("retries"), no_metrics, "retries", _retry_note(m)))
    parts.append("</div>")

    parts.append(_errors(facts, charts.get("errors")))
    parts.append(_cost(m))
    parts.append(_settings(m, config))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = f" {run['version']}" if run.get("version") else ""
    parts.append(
        f'<p class="foot">pipeline{e(str(version))} · report drawn {stamp} · rebuild with <code>pipeline report {e(output)}</code></p>'
    )
    return _HEAD.replace("{title}", e(title)) + "\n".join(parts) + "\n</body>\n</html>\n"


def _section(title: str, svg: str | None, missing: str, name: str, caption: str = "") -> str:
    body = f'<div class="chart">{svg}</div>' if svg else f'<p class="missing">{html.escape(missing)}</p>'
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
.lead { color: #444; margin: 0 0 12px; } .note { background: #fff7e0; border-left: 4px solid #f0b400; padding: 6px 10px; }
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
