"""What the run report says, read from beside the output: small tables, never the engine.

- The output itself (or, before the run has finished, its checkpoint's answers), read lazily
  through `pipeline.observe.show`'s view and reduced in polars: status counts, latency and
  completion-token histograms and quantiles, errors grouped by message with a few example rows,
  and the first few answers. Only the columns needed are read, so a 1M-row output costs a scan,
  not a loop.
- The metrics file (`<output stem>.metrics.json`, schema "pipeline.metrics/1"), read whole: it
  is small (its timeline is bounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.observe.show import View
from pipeline.tables.columns import MODEL

METRICS_SCHEMA = "pipeline.metrics/1"
BINS = 40
SAMPLES = 5  # answers shown as they came, beside the errors' examples
EXAMPLES = 3  # example rows per error group
ERROR_GROUPS = 10
INPUT_COLUMNS_SHOWN = 3
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
    answers: pl.DataFrame = field(default_factory=pl.DataFrame)  # the first SAMPLES ok rows: row, input columns, completion
    # Several models: a row each, in the order they come (model, rows, ok, error, p50, p95, prompt, completion, cost).
    by_model: pl.DataFrame | None = None


def default_metrics(output: str) -> Path | None:
    p = Path(output)
    if output == "-" or (p.is_dir() and not any(p.glob("part-*.parquet"))):
        return None
    return p.with_name(p.stem + ".metrics.json")  # a folder of parts too: out/parts.metrics.json


def read_metrics(path: Path | None, *, explicit: bool) -> tuple[dict[str, Any] | None, str]:
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


def read_facts(view: View) -> Facts:
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
        answers = (
            view.frame.with_row_index("__row", offset=1)
            .filter(col("status", pl.String()) == "ok")
            .head(SAMPLES)
            .select("__row", *inputs, col("completion", pl.String()).alias("__answer"))
            .collect(engine="streaming")
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(
            f"Cannot read {view.label}: {str(exc).splitlines()[0]}. Give the --output of a `pipeline run`."
        ) from None
    t = tok.row(0, named=True)
    return Facts(
        by_model=_by_model(view),
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
        answers=answers,
    )


def _by_model(view: View) -> pl.DataFrame | None:
    """Each model's rows of the output side by side (one streaming pass), when the run asked several."""
    p, model = view.prefix, view.prefix + MODEL
    if model not in view.names:
        return None

    def num(name: str) -> pl.Expr:
        if p + name in view.names:
            return pl.col(p + name).cast(pl.Float64, strict=False)
        return pl.lit(None, dtype=pl.Float64)

    status = pl.col(p + "status").cast(pl.String)
    cost = num("cost_usd").sum() if p + "cost_usd" in view.names else pl.lit(None, dtype=pl.Float64)
    try:
        return (
            view.frame.group_by(pl.col(model).alias("model"), maintain_order=True)
            .agg(
                pl.len().alias("rows"),
                (status == "ok").sum().alias("ok"),
                (status == "error").sum().alias("error"),
                num("latency_ms").quantile(0.5, "linear").alias("p50"),
                num("latency_ms").quantile(0.95, "linear").alias("p95"),
                num("prompt_tokens").sum().alias("prompt_tokens"),
                num("completion_tokens").sum().alias("completion_tokens"),
                cost.alias("cost_usd"),
            )
            .collect(engine="streaming")
        )
    except (pl.exceptions.PolarsError, OSError):
        return None  # the page says what the rest of the output says; this table is left out


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
