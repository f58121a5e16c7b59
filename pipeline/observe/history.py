"""The runs of one job over time, for the report's trend: rows/s, errors and cost, run after run.

A job's metrics file is rewritten by every run, so each run also appends one line to a runs file
beside it (`<output stem>.runs.jsonl` next to `<output stem>.metrics.json`): when it started, how
it ended, its counts, its speed and its cost. Only figures: no message, no setting, nothing that
could hold a secret. The file keeps the last KEEP runs. The report reads it, and also any other
metrics file in the same folder written for the same output (a nightly job that names its
metrics by date), so the trend is there whichever way a job keeps its files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

SCHEMA = "pipeline.runs/1"
KEEP = 500  # runs kept in the file; older lines are dropped when it grows past twice that
OTHER_FILES = 100  # other metrics files read for the trend, the newest first
METRICS_SUFFIX = ".metrics.json"


def runs_path(metrics_file: Path) -> Path:
    """`out/x.metrics.json` -> `out/x.runs.jsonl` (a metrics file named otherwise: its stem + .runs.jsonl)."""
    name = metrics_file.name
    stem = name.removesuffix(METRICS_SUFFIX) if name.endswith(METRICS_SUFFIX) else metrics_file.stem
    return metrics_file.with_name(stem + ".runs.jsonl")


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """One run's line: the figures the trend draws, from its metrics document."""
    run, rows, req, tokens = (data.get(k) or {} for k in ("run", "rows", "requests", "tokens"))
    cost = data.get("cost") or {}
    return {
        "schema": SCHEMA,
        "started_at": run.get("started_at"),
        "outcome": run.get("outcome"),
        "exit_code": run.get("exit_code"),
        "wall_s": run.get("wall_s"),
        "rows": rows.get("total"),
        "ok": rows.get("ok"),
        "errors": rows.get("error"),
        "from_checkpoint": rows.get("from_checkpoint"),
        "requests": req.get("sent"),
        "rows_per_s": (data.get("throughput") or {}).get("rows_per_s"),
        "prompt_tokens": tokens.get("prompt"),
        "completion_tokens": tokens.get("completion"),
        "cost": cost.get("this_run"),
        "output": (data.get("paths") or {}).get("output"),
    }


def record(metrics_file: Path, data: dict[str, Any]) -> None:
    """Append this run's line to the runs file beside `metrics_file`. Never fails a run: the metrics
    file is what counts, and a folder that took it takes this."""
    path = runs_path(metrics_file)
    with contextlib.suppress(OSError):
        with path.open("ab") as f:
            f.write(orjson.dumps(summary(data)) + b"\n")
        if path.stat().st_size > 400 * KEEP:  # roughly twice KEEP lines: trim, by a temporary file and a rename
            lines = path.read_bytes().splitlines()[-KEEP:]
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(b"\n".join(lines) + b"\n")
            os.replace(tmp, path)


def runs(metrics_file: Path, current: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of this job that left a trace beside `metrics_file`, oldest first, `current` included,
    each once (by its start time)."""
    found: dict[str, dict[str, Any]] = {}
    path = runs_path(metrics_file)
    with contextlib.suppress(OSError):
        for raw in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                line = orjson.loads(raw)
                if isinstance(line, dict) and line.get("started_at"):
                    found[str(line["started_at"])] = line
    output = (current.get("paths") or {}).get("output")
    with contextlib.suppress(OSError):
        others = [(p.stat().st_mtime, p) for p in metrics_file.parent.glob("*" + METRICS_SUFFIX) if p != metrics_file]
        for _, other in sorted(others, reverse=True)[:OTHER_FILES]:  # the newest: a folder of years of nightly files stays quick
            if other.stat().st_size > 16 * 2**20:
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                data = orjson.loads(other.read_bytes())
                if isinstance(data, dict) and output is not None and (data.get("paths") or {}).get("output") == output:
                    line = summary(data)
                    if line["started_at"]:
                        found.setdefault(str(line["started_at"]), line)
    this = summary(current)
    if this["started_at"]:
        found[str(this["started_at"])] = this
    return [found[k] for k in sorted(found)]
