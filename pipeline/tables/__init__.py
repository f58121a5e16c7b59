"""Tables in and out: reading inputs (local or object storage), writing outputs, and the state kept beside them.

- `source`: scan CSV, Parquet and JSON Lines in batches (bounded memory).
- `sink`: write the output (Parquet, CSV, JSON Lines or stdout) by temp file and atomic rename.
- `storage`: where a path points (local or `s3://`) and how to reach it.
- `interchange`: OpenAI batch-request files in, batch-output lines out.
- `cells`: what a cell says: text kept as written, types only where nothing changes, --dtype, --null-value.
- `frames`: the API's tables in memory given back in the kind that came in (pandas, Arrow, polars).
- `checkpoint`: the crash-safe journal of answers a re-run resumes from.
- `cache`: answers shared across jobs, keyed by request.
"""
