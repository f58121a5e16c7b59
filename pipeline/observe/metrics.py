"""The metrics file: what one run did, as JSON a machine can read (`jq '.rows.error' out/x.metrics.json`).

Built once at the end of a run from the settings, the run's counters and how
it ended; the only thing collected while running is a sample of the counters
each second (`sampler`), so the hot path pays nothing per row. The schema is
versioned (`SCHEMA`) and described by `metrics.schema.json` beside this file;
fields are only ever added to a version, never renamed.

No secret reaches the file: the config is written with every header value
replaced by "***" (the API key itself is never in the config, only the name of
its variable), and as a last guard every secret the run holds is masked in the
finished text, so a key echoed into an error message cannot leak through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import orjson

from pipeline.config import RunConfig
from pipeline.models import configs
from pipeline.observe.stats import RunStats
from pipeline.outcomes import EXIT_CODES, NOT_SENT, Outcome
from pipeline.tables import storage

SCHEMA = "pipeline.metrics/1"
SCHEMA_FILE = Path(__file__).with_name("metrics.schema.json")
MASK = "***"


@dataclass(frozen=True)
class Ending:
    """How a run ended: a word for machines (its exit code follows from it, see pipeline.outcomes),
    and the message the user was shown. "crashed" is a bug's way out (a traceback, exit 1): the file
    is still written for the job that waits on it."""

    outcome: Outcome
    reason: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]


@dataclass
class Clock:
    """When the run started, on both clocks: wall time for the file, monotonic for durations."""

    started_at: datetime
    started: float

    @classmethod
    def now(cls) -> Clock:
        return cls(started_at=datetime.now(UTC), started=time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def default_path(cfg: RunConfig) -> Path:
    """`--metrics`, else beside the output (out/x.parquet: out/x.metrics.json); for stdout or object storage,
    beside the (local) checkpoint. For an object (`--metrics s3://...`, an s3:// output) this is the local
    copy that `remote_path` names the upload of."""
    if cfg.metrics:
        return _local(cfg.metrics)
    if cfg.output is not None and cfg.output != "-" and not cfg.output.startswith("s3://"):
        out = Path(cfg.output)
        return out.with_name(out.stem + ".metrics.json")
    folder = cfg.checkpoint_path
    return folder.with_name(folder.name.removesuffix(".checkpoint") + ".metrics.json")


def report_path(cfg: RunConfig) -> Path | None:
    """Where the HTML report goes (None with --no-report), as the metrics name it."""
    if not cfg.make_report:
        return None
    if cfg.report:
        return _local(cfg.report)
    return default_path(cfg).with_name(default_path(cfg).name.removesuffix(".metrics.json") + ".report.html")


def remote_path(cfg: RunConfig, kind: Literal["metrics", "report"]) -> storage.Url | None:
    """Where the metrics file or the report is uploaded: its own s3:// setting, else beside an s3:// output
    (s3://b/out/x.parquet: s3://b/out/x.metrics.json), where an ephemeral worker's successor finds it."""
    given = cfg.metrics if kind == "metrics" else cfg.report
    if given:
        return storage.Url.parse(given) if storage.is_remote(given) else None
    if cfg.output is not None and storage.is_remote(cfg.output):
        out = storage.Url.parse(cfg.output)
        return out.with_name(f"{out.stem}.{'metrics.json' if kind == 'metrics' else 'report.html'}")
    return None


def _local(given: str) -> Path:
    return storage.local_copy(storage.Url.parse(given)) if storage.is_remote(given) else Path(given)


async def sampler(stats: RunStats, clock: Clock) -> None:
    """Sample the counters once per `stats.sample_every` seconds until cancelled.

    Due times are absolute (start + k x interval), so a slow tick does not make every later sample late."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() - clock.elapsed()
    stats.sample(clock.elapsed())
    due = t0
    while True:
        due += stats.sample_every
        await asyncio.sleep(max(0.0, due - loop.time()))
        stats.sample(loop.time() - t0)


def _version() -> str:
    try:
        return version("pipeline")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _config(cfg: RunConfig) -> dict[str, Any]:
    data = cfg.model_dump(mode="json", by_alias=True)
    # Header values may hold a key or a $VAR naming one; the names alone say what was sent.
    data["headers"] = dict.fromkeys(cfg.headers, MASK)
    for entry in data.get("models") or []:
        if entry.get("headers"):
            entry["headers"] = dict.fromkeys(entry["headers"], MASK)
    return data


def _models(cfg: RunConfig, stats: RunStats) -> list[dict[str, Any]]:
    """Each model's figures side by side: its rows of this output (ok, errors), and this run's requests,
    429s, tokens, latencies and cost; a run of one model has one entry, the run's own figures."""

    found = []
    each = configs(cfg)
    for c in each:
        s = stats if len(each) == 1 else stats.models.get(c.model or "") or RunStats()
        priced = c.price_in is not None and c.price_out is not None
        found.append(
            {
                "model": c.setting("model"),
                "provider": c.provider,
                "base_url": c.setting("base_url"),
                "rows": {"done": s.rows_done, "ok": s.ok, "error": s.errors},
                "requests": {
                    "sent": s.requests_sent,
                    "rate_limited": {"rate": s.limited_rate, "concurrency": s.limited_concurrency},
                    "outage_holds": s.breaker_opened,
                },
                "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens},
                "cost_usd": round(s.spent_usd, 6) if priced else None,
                "latency_ms": {"p50": _quantile(s, 0.5), "p95": _quantile(s, 0.95)},
                "limits": {"pace_rpm": s.pace_rpm, "pace_source": s.pace_source, "concurrency": s.concurrency},
            }
        )
    return found


def _cost(cfg: RunConfig, stats: RunStats, earlier_cost: float | None) -> dict[str, Any] | None:
    from pipeline.limits.spend import priced  # here: spend imports this module's neighbours

    if not priced(cfg):  # with several models, each may have its own prices
        return None
    # What this run's requests were billed, as the engines priced them row by row: the output's cost_usd
    # of the rows sent by this run adds up to it. Counted live, so a run stopped early has it too.
    this_run = stats.spent_usd
    earlier = stats.earlier_cost if stats.earlier_cost is not None else (earlier_cost or 0.0)
    all_runs = this_run + earlier
    return {
        "price_in": cfg.price_in,
        "price_out": cfg.price_out,
        "batch_discount": cfg.mode == "batch",  # the prices above, halved: what batch mode pays
        "this_run": round(this_run, 6),
        "all_runs": round(all_runs, 6),
        "max_cost": cfg.max_cost,
        "ceiling_reached": stats.ceiling_reached,
        "ceiling": stats.ceiling_what,
    }


def _quantile(stats: RunStats, q: float) -> float | None:
    value = stats.latency_quantile(q)
    return None if value is None else round(value, 1)


def build(
    cfg: RunConfig,
    stats: RunStats,
    ending: Ending,
    clock: Clock,
    *,
    earlier_cost: float | None = None,
    paths: tuple[Path | str, Path | str | None, Path | str | None] | None = None,
) -> dict[str, Any]:
    """The metrics of one run as a plain dict (schema `SCHEMA`).

    `earlier_cost` is what the answers the checkpoint held before this run cost, for the cost across runs. `paths` is (checkpoint, metrics file, report) as the run used them, where they are
    not the settings' defaults (the API's DataFrame out has no output to put them beside)."""
    wall = clock.elapsed()
    stats.roll_up()  # several models: what each one's governor learned, as the run's
    if not stats.timeline or stats.timeline[-1]["t"] < wall:
        stats.sample(wall)  # the last state, so the timeline ends where the run did
    not_sent_kinds = sum(stats.error_kinds.get(k, 0) for k in ("not_sent", "spend_ceiling", *NOT_SENT)) + stats.images_not_sent
    worked = stats.rows_done - stats.from_checkpoint - stats.from_cache  # rows answered without a request take no time
    return {
        "schema": SCHEMA,
        "run": {
            "started_at": clock.started_at.isoformat(timespec="milliseconds"),
            "ended_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "wall_s": round(wall, 3),
            "exit_code": ending.exit_code,
            "outcome": ending.outcome,
            "reason": ending.reason,
            "version": _version(),
        },
        "rows": {
            "total": stats.total_rows,
            "ok": stats.ok,
            "error": stats.errors,
            "from_checkpoint": stats.from_checkpoint,
            "from_cache": stats.from_cache,
            # Rows no request was made for: cells that cannot be sent, a ceiling, and those a stop left unread.
            "not_sent": not_sent_kinds + max(0, stats.total_rows - stats.rows_done),
            "shared": stats.shared,
            "done": stats.rows_done,
            "sent": stats.rows_sent,
            # Of the rows in error, those that failed for a reason that may pass (5xx, timeouts, 429s): a re-run may answer them.
            "retryable": stats.retryable_errors,
        },
        "requests": {
            "sent": stats.requests_sent,
            "retries": stats.retries,
            "errors_by_kind": dict(stats.error_kinds.most_common()),
            "rate_limited": {"rate": stats.limited_rate, "concurrency": stats.limited_concurrency},
            "outage_holds": stats.breaker_opened,
        },
        "tokens": {
            "prompt": stats.prompt_tokens,
            "completion": stats.completion_tokens,
            "estimated_rows": stats.estimated_rows,
            # Under a spend ceiling, what the server billed: every attempt's usage, retries included.
            "billed_prompt": stats.spent_tokens_in,
            "billed_completion": stats.spent_tokens_out,
        },
        "cost": _cost(cfg, stats, earlier_cost),
        "throughput": {
            "rows_per_s": round(worked / wall, 3) if wall > 0 else 0.0,
            "latency_ms": {"p50": _quantile(stats, 0.5), "p95": _quantile(stats, 0.95), "p99": _quantile(stats, 0.99)},
        },
        "limits": {
            "adapt": cfg.adapt,
            "pace_rpm": stats.pace_rpm,
            "pace_source": stats.pace_source,
            "pace_detail": stats.pace_detail or None,
            "pace_tpm": stats.pace_tpm,
            "pace_tpm_source": stats.pace_tpm_source,
            "concurrency": stats.concurrency,
            "concurrency_ceiling": stats.concurrency_ceiling,
            "concurrency_named": stats.concurrency_named,
            "given": {"rpm": cfg.rpm, "tpm": cfg.tpm, "concurrency": cfg.concurrency},
        },
        "timeline": stats.timeline,
        "timeline_interval_s": stats.sample_every,
        "latency_histogram": [[round(ms, 2), n] for ms, n in stats.latency_histogram()],
        "config": _config(cfg),
        "models": _models(cfg, stats),
        "paths": {
            "output": cfg.output,
            "checkpoint": str(paths[0]) if paths else str(cfg.checkpoint_path),
            "metrics": (str(paths[1]) if paths[1] else None) if paths else str(default_path(cfg)),
            "report": (str(paths[2]) if paths[2] else None) if paths else (str(p) if (p := report_path(cfg)) else None),
        },
    }


def dumps(metrics: dict[str, Any], secrets: tuple[str, ...] = ()) -> bytes:
    """The file's bytes, with any secret that slipped into a message masked."""
    text = orjson.dumps(metrics, option=orjson.OPT_INDENT_2).decode()
    for secret in secrets:
        if len(secret) >= 4:  # a one- or two-character "secret" would mask ordinary text
            # As JSON would spell it inside a string (a key with a quote or backslash is escaped there).
            text = text.replace(orjson.dumps(secret).decode()[1:-1], MASK)
    return text.encode() + b"\n"


def write(path: Path, data: bytes) -> None:
    """Atomically: a temporary file in the same folder, fsynced, renamed over the target, so a reader (or a
    CI job after a crash) sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut only once the folder is synced
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
