"""Tables handed over in memory (the Python API): the result given back in the kind that came in.

A notebook that passes a pandas DataFrame to `complete()` keeps working in pandas: the answer is
that same frame (its index, its columns' dtypes) with the result columns added, not a polars frame
it has to convert back. An Arrow table gets an Arrow table with its own schema kept; polars stays
polars. Only the added columns are converted; the input columns are the caller's own.
"""

from __future__ import annotations

from typing import Any

import polars as pl


def like(original: Any, result: pl.DataFrame, inputs: int) -> Any:
    """`result` (the input's `inputs` columns, then the added ones) as the kind of `original`.

    A run with `limit` has fewer rows than the input: the first ones, in order, as the result has."""
    if isinstance(original, pl.DataFrame | pl.LazyFrame):
        return result
    added = result.select(result.columns[inputs:])
    module = type(original).__module__.split(".")[0]
    if module == "pandas":
        import pandas as pd

        rows = original.iloc[: result.height]
        extra = added.to_pandas()
        extra.index = rows.index  # the caller's index: assigning a result column back aligns on it
        return pd.concat([rows, extra], axis=1)
    import pyarrow as pa

    table = pa.Table.from_batches([original]) if isinstance(original, pa.RecordBatch) else original
    table = table.slice(0, result.height)
    arrow = added.to_arrow()
    for i in range(arrow.num_columns):
        table = table.append_column(arrow.schema.field(i), arrow.column(i))
    if isinstance(original, pa.RecordBatch):
        return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    return table
