"""What a run shows and leaves behind for people: nothing here is on the hot path beyond cheap counters.

- `stats`: the run's counters and per-second timeline.
- `progress`: the progress bar, the status line and the closing summary.
- `metrics`: the metrics JSON file (schema `pipeline.metrics/1`); `history`: a line per run, for trends.
- `report`, `facts`, `charts`: the HTML run report, drawn from the metrics and the output.
- `show`: `pipeline show`: an output or checkpoint read back.
- `estimate`: `pipeline estimate`: rows, tokens, cost and time before anything is sent.
"""
