"""Step 3, report: what a run leaves for machines and people once it has ended, whatever its ending.

The metrics file (written on every way out, a crash included), the line of the
job's history the report's trend reads, and the HTML report; for an s3:// job,
both uploaded beside the output. A refused command (exit 2) only marks an
earlier run's metrics file, so nothing stale is read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.observe import history, metrics
from pipeline.observe.stats import RunStats
from pipeline.outcomes import RunResult
from pipeline.tables import remote_state, storage

if TYPE_CHECKING:
    from pipeline.job.run import Job


def finish(job: Job, ending: metrics.Ending) -> RunResult:
    """Write the metrics file (where the run writes one) and return the run's result."""
    path, report = metrics_path(job), report_path(job, ending)
    data = metrics.build(
        job.cfg,
        job.stats,
        ending,
        job.clock,
        earlier_cost=job.earlier_cost,
        paths=(job.checkpoint_shown, shown(job, path, "metrics"), shown(job, report, "report")),
    )
    if path is not None:
        try:
            metrics.write(path, metrics.dumps(data, job.secrets))
            history.record(path, data)  # the line the report's trend across runs reads
        except OSError as exc:  # reported, never another exit code: the run's own outcome is what counts
            job.say(f"pipeline: could not write the metrics file {path}: {exc.strerror or exc}")
        else:
            _publish(job, path, "metrics")
    return RunResult.from_metrics(
        data, job.cfg.output, job.checkpoint_shown, shown(job, path, "metrics"), shown(job, report, "report")
    )


def report(job: Job, ending: metrics.Ending) -> None:
    """Draw the HTML report beside the output (after the metrics file, which it reads). A report that
    cannot be drawn is said, never an exit code."""
    path = report_path(job, ending)
    if path is None:
        return
    from pipeline.observe.report import report_after_run  # altair and vl-convert: only once the run is over

    metrics_file = metrics.default_path(job.cfg)
    failed = report_after_run(str(_local_output(job)), str(metrics_file), str(job.checkpoint_path), str(path))
    if not failed:
        _publish(job, path, "report")
    job.say(f"pipeline: {failed}" if failed else f"  report: {shown(job, path, 'report')}")


def mark_refused(cfg: RunConfig, clock: metrics.Clock, exc: errors.UserError, stats: RunStats | None = None) -> None:
    """A run refused before sending (exit 2) overwrites the metrics file an earlier run of the job left, with
    outcome usage_error: a dashboard must not read last night's success as tonight's. Where there is no such
    file, nothing is created: a refused command leaves nothing behind."""
    if cfg.output is None and cfg.metrics is None and cfg.checkpoint_dir is None:
        return  # no output given (the error says so): no place for a metrics file either
    path = metrics.default_path(cfg)
    if not path.is_file():
        return
    data = metrics.build(cfg, stats or RunStats(), metrics.Ending("usage_error", f"pipeline: error: {exc}"), clock,
                         paths=(cfg.checkpoint_path, path, None))  # fmt: skip
    with contextlib.suppress(OSError):  # the place itself may be what is wrong: the error being raised says so
        metrics.write(path, metrics.dumps(data, ()))


def metrics_path(job: Job) -> Path | None:
    return metrics.default_path(job.cfg) if job.files or job.cfg.metrics else None


def report_path(job: Job, ending: metrics.Ending) -> Path | None:
    """Where the report goes, if one is drawn. Not after an interrupt (whoever pressed Ctrl-C wants the
    prompt back; `pipeline report` draws it later), nor for stdout or a DataFrame, which leave no
    output to read, nor before any answer."""
    if not (job.files and job.cfg.output not in (None, "-")) or ending.outcome in ("interrupted", "crashed"):
        return None
    path, output = metrics.report_path(job.cfg), _local_output(job)
    if path is None or output is None:
        return None
    if not output.exists() and not job.checkpoint_path.exists():
        return None
    return path


def shown(job: Job, path: Path | None, kind: Literal["metrics", "report"]) -> str | None:
    """The metrics file or the report as the user finds it: in the bucket, for an object, else the file."""
    if path is None:
        return None
    url = metrics.remote_path(job.cfg, kind)
    return str(url) if url is not None else str(path)


def _publish(job: Job, path: Path, kind: Literal["metrics", "report"]) -> None:
    """Upload the metrics file or the report where `--metrics s3://...` or an s3:// output puts it."""
    if (url := metrics.remote_path(job.cfg, kind)) is not None:
        remote_state.publish(path, url, job.say)


def _local_output(job: Job) -> Path | None:
    """The output as a local file: itself, or an object output's local copy."""
    output = job.plan.output
    return storage.local_copy(output) if isinstance(output, storage.Url) else output
