"""Step 2, commit: the output made whole, and the run judged.

Every way sending can end meets here and leaves with an ending: the outcome
word, its exit code (pipeline/outcomes.py) and the message the user reads,
which says what was kept and what will help (run again, fix the key, wait).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import polars as pl

from pipeline import errors, outcomes
from pipeline.limits import spend
from pipeline.observe import metrics
from pipeline.observe.progress import plural, summary
from pipeline.tables.sink import Sink, describe, result_frame

if TYPE_CHECKING:
    from pipeline.job.run import Job


def commit(job: Job, sink: Sink, started: float) -> metrics.Ending:
    """Every row has its result: make the output whole, say what the run did, and judge it."""
    cfg, stats = job.cfg, job.stats
    if (failed := write_output(job, sink)) is not None:
        return failed
    wall = time.monotonic() - started
    spend.note_run(stats, cfg, job.done_before)
    output = describe(job.plan.output) if job.plan.output is not None else None
    job.say(summary(stats, wall, output, job.checkpoint_shown))
    if stats.ceiling_reached:  # before the error rate: the rows not sent are errors, for the reason said here
        message = spend.stop_message(stats, cfg, str(job.checkpoint_path))
        job.say(message)
        return metrics.Ending("spend_ceiling", message)
    return verdict(job)


def stopped(job: Job, cause: errors.FatalError, sink: Sink | None, appended: int, started: float) -> metrics.Ending:
    """A fatal answer stopped the sending: write the output when every row has its result (`sink`;
    those not sent marked), say what was kept and how to go on, and end with the cause's outcome."""
    outcome: outcomes.Outcome = "spend_ceiling" if job.stats.ceiling_reached else outcomes.of_fatal(cause)
    code = outcomes.EXIT_CODES[outcome]
    if outcome == "output_closed":  # the user's own `| head`: nothing to fix, nothing to advise
        message = f"pipeline: stopped: {cause.message.rstrip('.')}; every answer received is kept in {job.checkpoint_shown}."
        job.say(message)
        return metrics.Ending(outcome, message)
    written = ""
    if sink is not None:
        if (failed := write_output(job, sink)) is not None:
            return failed
        if job.plan.output is not None:
            written = f" The output {describe(job.plan.output)} has every row; those not sent say why in 'error'."
    kept = f"{appended} answers from this run are kept in {job.checkpoint_shown}"
    if appended and isinstance(cause, errors.WaitTooLong):  # its message says when to come back
        then = f"  Nothing more was sent; the requests in flight came back. {kept}; rows answered are not sent again."
    elif not appended:
        then = "  Nothing was answered, so nothing was kept; fix the cause and run again."
    else:
        then = (
            f"  Every further request would fail the same way, so nothing more was sent. {kept}; "
            "fix the cause and run the same command again to resume."
        )
    message = (
        f"pipeline: stopped: {str(cause).rstrip('.')}.\n{then}{written}\n  exit {code} ({outcome}): {outcomes.MEANINGS[code]}"
    )
    job.say(message)
    if appended:  # what this run did get, for the log
        job.say(summary(job.stats, time.monotonic() - started, None, job.checkpoint_shown))
    return metrics.Ending(outcome, message)


def verdict(job: Job) -> metrics.Ending:
    """Exit 0, or 4 when more rows failed than --max-error-rate allows, with advice only where it helps."""
    cfg, stats = job.cfg, job.stats
    rate = stats.errors / stats.rows_done if stats.rows_done else 0.0
    if rate <= cfg.max_error_rate:
        return metrics.Ending("completed")
    not_sent, images = stats.error_kinds.get("not_sent", 0), stats.images_not_sent
    advice = ["The output has every row, with the reason in 'error'."]
    failed = stats.errors - not_sent - images
    retryable = min(stats.retryable_errors, failed)
    if retryable:
        advice.append(
            f"Run the same command again to retry the {plural(retryable, 'row')} whose requests failed for a reason "
            "that may pass (server errors, timeouts, rate limits)."
        )
    if failed - retryable:
        refused = failed - retryable
        advice.append(
            f"{plural(refused, 'row was', 'rows were')} refused for good (see 'errors by kind' above): a re-run "
            "would get the same answer; change those rows, the prompt, the parameters or the model."
        )
    if not_sent:
        advice.append(
            f"{plural(not_sent, 'row was', 'rows were')} not sent because a prompt cell is null or empty: a re-run "
            "cannot fix that; fill the cells in, give the placeholder a default ({notes:} or {notes:n/a}), pass "
            "--null-as-empty, or allow such rows with --max-error-rate."
        )
    if images:
        advice.append(
            f"{plural(images, 'row was', 'rows were')} not sent because of an image or PDF (missing, unreadable, of a "
            "type or size the provider does not take, or changed while the run read it; the reason is in 'error'): "
            "fix those files and run the same command again; rows already answered are not sent again."
        )
    message = (
        f"pipeline: {stats.errors:,} of {plural(stats.rows_done, 'row')} failed ({rate:.1%}), above --max-error-rate "
        f"{cfg.max_error_rate:g}: exit 4 (error_rate). " + " ".join(advice)
    )
    job.say(message)
    return metrics.Ending("error_rate", message)


def write_output(job: Job, sink: Sink) -> metrics.Ending | None:
    """Make the output whole; an ending when it cannot be (every answer is in the checkpoint all the same)."""
    try:
        sink.commit()
    except errors.FatalError as closed:  # stdout closed by its reader as the last rows went out
        return stopped(job, closed, None, 0, time.monotonic())
    except OSError as exc:  # a full disk, an upload refused
        message = (
            f"pipeline: stopped: the output could not be written: {exc}\n  Every answer is kept in "
            f"{job.checkpoint_shown}; fix the cause and run the same command again: nothing is sent again: exit 10."
        )
        job.say(message)
        return metrics.Ending("output_failed", message)
    return None


def empty_run(job: Job, sink: Sink) -> metrics.Ending:
    """No rows (a scheduled job's empty partition): an empty output with every column, and success.
    Nothing is sent, no model is started and no checkpoint is made: there is nothing to resume."""
    plan = job.plan
    results = result_frame([])
    sink.write(*plan.layout.shape(pl.DataFrame(schema=plan.table.schema), results))
    sink.commit()
    where = f"\n  output: {describe(plan.output)}" if plan.output is not None else ""
    message = (
        f"pipeline: 0 rows in {job.clock.elapsed():.1f} s: the input {plan.table.label} has no rows, so nothing was sent{where}"
    )
    job.say(message)
    return metrics.Ending("empty_input", message)
