"""What a run shows and leaves behind for people: nothing here is on the hot path beyond cheap counters.

- `stats`: the run's counters and per-second timeline.
- `progress`: the progress bar, the status line and the closing summary.
- `metrics`: the metrics JSON file (schema `pipeline.metrics/1`).
- `report`: the HTML run report drawn from the metrics and the output (`facts` reads them, `charts` draws).
- `history`: the runs file beside the metrics (one line a run), for the report's trend across runs.
- `show`: `pipeline show`: an output or checkpoint read back.
- `estimate`: `pipeline estimate`: rows, tokens, cost and time before anything is sent.
"""
