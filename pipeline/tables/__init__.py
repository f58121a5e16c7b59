"""Tables in and out: reading inputs (local or object storage), writing outputs, and the state kept beside them.

- `source`, `cells`: scan CSV, Parquet and JSON Lines in batches (bounded memory), cells as the user wrote them.
- `sink`: write the output (Parquet, CSV, JSON Lines or stdout) by temp file and atomic rename.
- `storage`, `objectstore`: where a path points (local or `s3://`) and how to reach it.
- `interchange`, `responses`: OpenAI batch-request files in, batch-output lines (responses as received) out.
- `checkpoint`, `remote_state`: the crash-safe journal of answers a re-run resumes from, locally or in a bucket.
- `cache`: answers shared across jobs, keyed by request.
- `statedir`, `scratch`: the user's state folder, and temporary folders a later run cleans up after a kill.
"""
