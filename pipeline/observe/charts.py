"""The run report's charts: Altair specs rendered to SVG by vl-convert, offline.

Each function takes small tables (a histogram, the metrics timeline, a few runs) and returns an
SVG, or None when there is nothing to draw. Each chart carries its own legend (a legend placed
on a stack of charts sits above all of them, beside the wrong one), and every axis that counts
rows or requests has integer ticks. Altair and vl-convert are imported inside the functions:
they cost about half a second that `pipeline --help` and `pipeline run` must not pay.
"""

from __future__ import annotations

from typing import Any

import polars as pl

MAX_POINTS = 600  # timeline points per chart: a long run is bucketed so the page stays small
SMOOTH = 5  # timeline points per moving rate
WIDTH = 460
LIMIT_COLOR = "#e45756"
ROWS_SERIES, PACE_SERIES = "rows/s", "pace in force, requests/s"
IN_FLIGHT_SERIES, LIMIT_SERIES = "in flight", "limit (learned or given)"


def svg(chart: Any) -> str:
    import vl_convert as vlc

    drawn: str = vlc.vegalite_to_svg(chart.to_dict())
    return drawn


def _count_axis(title: str) -> Any:
    """An axis of counts: whole numbers only (no "0.5 rows")."""
    import altair as alt

    return alt.Axis(title=title, format="d", tickMinStep=1)


def _legend() -> Any:
    import altair as alt

    return alt.Legend(orient="top", title=None)


def _measured_and_limit(measured: str, limit: str) -> dict[str, Any]:
    """Colour and dash of a chart's two series: what happened, solid; the limit it ran under, dashed red.
    The domain is given, so the styles do not follow the names' alphabetical order."""
    import altair as alt

    domain = [measured, limit]
    return {
        "color": alt.Color("series:N", legend=_legend(), scale=alt.Scale(domain=domain, range=["#4c78a8", LIMIT_COLOR])),
        "strokeDash": alt.StrokeDash("series:N", legend=None, scale=alt.Scale(domain=domain, range=[[1, 0], [5, 3]])),
    }


def _bucketed(timeline: list[dict[str, Any]], names: list[str]) -> pl.DataFrame:
    """The timeline's `names` (0 where a sample lacks one), the last sample of each of at most MAX_POINTS buckets."""
    tl = pl.DataFrame(timeline, infer_schema_length=None)
    tl = tl.select(
        "t", *[pl.col(c).cast(pl.Float64) if c in tl.columns else pl.lit(None, dtype=pl.Float64).alias(c) for c in names]
    )
    tl = tl.sort("t")
    span = float(tl.select(pl.col("t").max() - pl.col("t").min()).item() or 0)
    step = max(span / MAX_POINTS, 1.0)
    return (
        tl.with_columns((pl.col("t") / step).floor().alias("bucket"))
        .group_by("bucket", maintain_order=True)
        .last()
        .drop("bucket")
    )


def rates(timeline: list[dict[str, Any]], counters: dict[str, str]) -> pl.DataFrame:
    """Per-second rates from the cumulative timeline, over at most MAX_POINTS buckets; long format (t, series, per_s)."""
    names = list(counters)
    # The samples may be irregular (the metrics thin a long timeline), so divide by the real dt.
    tl = _bucketed(timeline, names).with_columns(pl.col(names).fill_null(0.0))

    # A moving rate over SMOOTH samples: one answer every few seconds is a steady pace, not a comb of spikes.
    # Before SMOOTH samples exist, the rate since the start.
    def rate(c: str) -> pl.Expr:
        moving = pl.col(c).diff(n=SMOOTH) / pl.col("t").diff(n=SMOOTH)
        since_start = (pl.col(c) - pl.col(c).first()) / (pl.col("t") - pl.col("t").first())
        return pl.coalesce(moving, since_start).clip(lower_bound=0).alias(counters[c])

    out = tl.select("t", (pl.col("t") - pl.col("t").first()).alias("dt"), *[rate(c) for c in names])
    out = out.filter(pl.col("dt") > 0).drop("dt")  # the first sample (or several at one instant) has no rate yet
    return out.unpivot(index="t", variable_name="series", value_name="per_s")


def throughput(timeline: list[dict[str, Any]], limit_rpm: float | None, limit_label: str) -> str:
    """Rows/s over time, and the request pace in force drawn on it: per sample when the timeline has it,
    else the one limit the run had (`limit_rpm`, a line across the chart)."""
    import altair as alt

    rows = rates(timeline, {"rows": ROWS_SERIES})
    paced = _bucketed(timeline, ["pace_rpm"]).drop_nulls("pace_rpm")
    layers: list[Any] = []
    series = rows
    if paced.height:
        pace = paced.select("t", pl.lit(PACE_SERIES).alias("series"), (pl.col("pace_rpm") / 60).alias("per_s"))
        series = pl.concat([rows, pace])
    x = alt.X("t:Q", title="seconds since start")
    layers.append(
        alt.Chart(series)
        .mark_line(interpolate="step-after")
        .encode(
            x=x,
            y=alt.Y("per_s:Q", title="per second"),
            **_measured_and_limit(ROWS_SERIES, PACE_SERIES),
        )
    )
    if not paced.height and limit_rpm:
        limit = pl.DataFrame({"y": [limit_rpm / 60], "label": [limit_label]})
        layers.append(alt.Chart(limit).mark_rule(color=LIMIT_COLOR, strokeDash=[5, 3]).encode(y="y:Q"))
        layers.append(
            alt.Chart(limit)
            .mark_text(align="left", dx=4, dy=-6, color=LIMIT_COLOR)
            .encode(x=alt.value(0), y="y:Q", text="label:N")
        )
    return svg(alt.layer(*layers).properties(width=WIDTH, height=150))


def token_rates(timeline: list[dict[str, Any]]) -> str:
    import altair as alt

    toks = rates(timeline, {"prompt_tokens": "prompt tokens/s", "completion_tokens": "completion tokens/s"})
    chart = (
        alt.Chart(toks)
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X("t:Q", title="seconds since start"),
            y=alt.Y("per_s:Q", title="tokens/s"),
            color=alt.Color("series:N", legend=_legend()),
        )
    )
    return svg(chart.properties(width=WIDTH, height=130))


def in_flight(timeline: list[dict[str, Any]]) -> str | None:
    """Requests on the wire over time, under the limit the gate had learned or was given; None for a
    timeline without the figure (older metrics files, the Ray engine)."""
    import altair as alt

    tl = _bucketed(timeline, ["in_flight", "concurrency"])
    if not (tl.get_column("in_flight").max() or 0):
        return None
    long = tl.rename({"in_flight": IN_FLIGHT_SERIES, "concurrency": LIMIT_SERIES}).unpivot(
        index="t", variable_name="series", value_name="requests"
    )
    chart = (
        alt.Chart(long.drop_nulls("requests"))
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X("t:Q", title="seconds since start"),
            y=alt.Y("requests:Q", axis=_count_axis("requests")),
            **_measured_and_limit(IN_FLIGHT_SERIES, LIMIT_SERIES),
        )
    )
    return svg(chart.properties(width=WIDTH, height=160))


def retries(timeline: list[dict[str, Any]]) -> str:
    import altair as alt

    trouble = rates(timeline, {"retries": "retries/s", "limited_rate": "429 rate/s", "limited_concurrency": "429 concurrency/s"})
    chart = (
        alt.Chart(trouble)
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X("t:Q", title="seconds since start"),
            y=alt.Y("per_s:Q", title="per second"),
            color=alt.Color("series:N", legend=_legend()),
        )
    )
    return svg(chart.properties(width=WIDTH, height=200))


def latency(histogram: pl.DataFrame, quantiles: dict[str, float | None]) -> str:
    import altair as alt

    bars = (
        alt.Chart(histogram)
        .mark_bar(color="#4c78a8")
        .encode(x=alt.X("start:Q", bin="binned", title="latency (ms)"), x2="end:Q", y=alt.Y("rows:Q", axis=_count_axis("rows")))
    )
    marks = pl.DataFrame(
        [{"q": k, "ms": v, "label": f"{k} {v:,.0f} ms"} for k, v in quantiles.items() if k != "p99" and v is not None]
    )
    rule = alt.Chart(marks).mark_rule(color=LIMIT_COLOR, strokeDash=[4, 3]).encode(x="ms:Q")
    text = (
        alt.Chart(marks).mark_text(align="left", dx=4, dy=-4, color=LIMIT_COLOR).encode(x="ms:Q", y=alt.value(10), text="label:N")
    )
    return svg((bars + rule + text).properties(width=WIDTH, height=220))


def completion_tokens(histogram: pl.DataFrame, max_tokens: int | None) -> str:
    import altair as alt

    chart = (
        alt.Chart(histogram)
        .mark_bar(color="#72b7b2")
        .encode(
            x=alt.X("start:Q", bin="binned", title="completion tokens"), x2="end:Q", y=alt.Y("rows:Q", axis=_count_axis("rows"))
        )
    )
    if max_tokens:
        limit = pl.DataFrame({"x": [float(max_tokens)], "label": [f"max_tokens {max_tokens}"]})
        chart = chart + alt.Chart(limit).mark_rule(color=LIMIT_COLOR, strokeDash=[4, 3]).encode(x="x:Q")
        chart = chart + alt.Chart(limit).mark_text(align="right", dx=-4, dy=-4, color=LIMIT_COLOR).encode(
            x="x:Q", y=alt.value(10), text="label:N"
        )
    return svg(chart.properties(width=WIDTH, height=220))


def error_kinds(kinds: pl.DataFrame) -> str:
    import altair as alt

    chart = (
        alt.Chart(kinds)
        .mark_bar(color=LIMIT_COLOR)
        .encode(y=alt.Y("kind:N", sort="-x", title=None), x=alt.X("rows:Q", axis=_count_axis("rows")))
    )
    return svg(chart.properties(width=WIDTH - 160, height=max(40, 22 * kinds.height)))


def trend(runs: list[dict[str, Any]]) -> str | None:
    """Rows/s, errors and cost, one point a run, oldest first; None with fewer than two runs."""
    import altair as alt

    if len(runs) < 2:
        return None
    frame = pl.DataFrame(
        {
            "run": list(range(1, len(runs) + 1)),
            "started": [str(r.get("started_at") or "")[:16].replace("T", " ") for r in runs],
            "rows/s": [_number(r.get("rows_per_s")) for r in runs],
            "errors": [_number(r.get("errors")) for r in runs],
            "cost": [_number(r.get("cost")) for r in runs],
        }
    )
    x = alt.X("started:O", title="run started (UTC)", sort=None, axis=alt.Axis(labelAngle=-40))
    panels = []
    for name, axis in (("rows/s", alt.Axis(title="rows/s")), ("errors", _count_axis("errors")), ("cost", alt.Axis(title="cost"))):
        if frame.get_column(name).null_count() == frame.height:
            continue  # no prices, say: nothing to draw
        panels.append(
            alt.Chart(frame.drop_nulls(name))
            .mark_line(point=True, color=LIMIT_COLOR if name == "errors" else "#4c78a8")
            .encode(x=x, y=alt.Y(f"{name}:Q", axis=axis))
            .properties(width=200, height=140, title=name)
        )
    return svg(alt.hconcat(*panels)) if panels else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
