"""The result columns a job writes: the twelve every output has, then those its settings add.

    completion ... tokens_estimated    every output (RESULT_COLUMNS), in this order
    cost_usd                           with --price-in and --price-out
    tool_calls                         with --tools
    completions, finish_reasons        with --n N (N > 1)
    sample_index                       with --n N --explode, instead of the two lists
    requested_model                    with several models (--model a --model b, or models:)
    <extracted fields>                 with --schema, or --tools with --tool-columns

A column a setting adds is written only when the setting is given, so an existing job's output keeps
exactly its columns (a consumer that checks the schema, a warehouse table of fixed width); the
checkpoint keeps every field whatever the settings (pipeline/tables/checkpoint.py), so a resume that
adds prices finds each answer's cost.

With --explode, each row of n samples becomes n rows, one a sample, in input order (the samples of a
row together, by sample_index); the request's tokens and cost are on its first sample's row (null on
the others), so that they still add up to what was billed. A row with no answer stays one row.

With several models, each input row comes as one row per model, in the order the models are given
(the rows of one input row together), and `requested_model` says which model the row asked: the
name as given, on every row, an error's included (`model` is the name the server answered with).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipeline.requests.structured import Structured
from pipeline.tables.checkpoint import RESULT_COLUMNS

SAMPLE = "sample_index"
LISTS = ("completions", "finish_reasons")
MODEL = "requested_model"
# Every column a job may add after the base ones, in the order they are written.
ADDED = ("cost_usd", "tool_calls", *LISTS, SAMPLE, MODEL)
_ROW = "__row"
_PER_REQUEST = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")  # on the first sample only


@dataclass(frozen=True)
class Layout:
    """Which result columns a job writes, and how a batch of results becomes them."""

    structured: Structured | None = None
    cost: bool = False  # prices are set
    tools: bool = False  # the requests offer tools
    samples: bool = False  # n > 1: every choice's text and finish reason
    explode: bool = False  # ...as one row each
    models: tuple[str, ...] = ()  # several models: each input row is a row per model, in this order

    @property
    def added(self) -> list[str]:
        """The result columns after the base ones."""
        names = ["cost_usd"] if self.cost else []
        if self.tools:
            names.append("tool_calls")
        if self.samples:
            names.extend([SAMPLE] if self.explode else LISTS)
        if self.models:
            names.append(MODEL)
        return names

    @property
    def names(self) -> list[str]:
        """Every result column, in output order (extracted fields not included)."""
        return [*RESULT_COLUMNS, *self.added]

    @property
    def extracted(self) -> list[str]:
        return self.structured.output_columns() if self.structured else []

    def shape(self, inputs: pl.DataFrame, results: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """A batch's input rows and results (a `result_frame`) as the output's rows: one per sample with
        --explode, the job's result columns only, then the extracted fields. With several models the rows
        come a model after another for each input row (the batch was widened so), and each is named."""
        if self.models:
            rounds = results.height // len(self.models)  # the batch holds whole rounds of the models
            results = results.with_columns(pl.Series(MODEL, list(self.models) * rounds, pl.String))
        if self.samples and self.explode:
            inputs, results = _explode(inputs, results)
        results = results.select(self.names)
        if self.structured is not None:
            results = self.structured.add_columns(results)
        return inputs, results


def _explode(inputs: pl.DataFrame, results: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per sample: the input row repeated, completion and finish_reason that sample's, its index.
    A row with no answer (no list) stays one row with a null index."""
    numbered = results.with_row_index(_ROW)
    has = pl.col("completions").is_not_null() & (pl.col("completions").list.len() > 0)
    rows = numbered.with_columns(pl.when(has).then(pl.col(c)).alias(c) for c in LISTS).explode(list(LISTS))
    index = pl.when(pl.col("completions").is_not_null()).then(pl.int_range(pl.len()).over(_ROW)).cast(pl.Int64)
    rows = rows.with_columns(index.alias(SAMPLE))
    rows = rows.with_columns(
        pl.coalesce(pl.col("completions"), pl.col("completion")).alias("completion"),
        pl.when(pl.col(SAMPLE).is_not_null())
        .then(pl.col("finish_reasons"))
        .otherwise(pl.col("finish_reason"))
        .alias("finish_reason"),
        *(pl.when(pl.col(SAMPLE).fill_null(0) == 0).then(pl.col(c)).alias(c) for c in _PER_REQUEST),
    )
    return inputs[rows.get_column(_ROW)], rows.drop(_ROW)
