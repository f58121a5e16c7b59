"""How a run ends: one table of outcomes, each with its exit code and its exception.

A scheduler reads the exit code, a dashboard the `outcome` word in the metrics
file, a Python caller the exception class; all three come from this module, so
they cannot drift apart (the CLI's --help and the docs' exit-code page are
generated from it too). Codes 0, 2, 3 and 130 kept the meaning they always had;
the causes that used to share exit 1 each have their own code now, and 1 is
left to a crash (a bug: Python's own code for an uncaught exception).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import errors

Outcome = Literal[
    "completed",
    "empty_input",
    "crashed",
    "usage_error",
    "input_error",
    "batch_pending",
    "error_rate",
    "spend_ceiling",
    "auth_refused",
    "quota_exhausted",
    "server_unavailable",
    "requests_refused",
    "output_failed",
    "interrupted",
    "output_closed",
]

EXIT_CODES: dict[Outcome, int] = {
    "completed": 0,
    "empty_input": 0,
    "crashed": 1,
    "usage_error": 2,
    "input_error": 2,
    "batch_pending": 3,
    "error_rate": 4,
    "spend_ceiling": 5,
    "auth_refused": 6,
    "quota_exhausted": 7,
    "server_unavailable": 8,
    "requests_refused": 9,
    "output_failed": 10,
    "interrupted": 130,
    "output_closed": 141,
}
EXIT_OK, EXIT_CRASHED, EXIT_USAGE, EXIT_BATCH_PENDING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# The exception each ending raises from complete() (and from RunResult.raise_for_outcome()).
EXCEPTIONS: dict[Outcome, type[errors.PipelineError]] = {
    "usage_error": errors.UserError,
    "input_error": errors.InputError,
    "batch_pending": errors.BatchPending,
    "error_rate": errors.ErrorRateExceeded,
    "spend_ceiling": errors.SpendCeilingReached,
    "auth_refused": errors.AuthError,
    "quota_exhausted": errors.QuotaExhausted,
    "server_unavailable": errors.ServerUnavailable,
    "requests_refused": errors.RequestsRefused,
    "output_failed": errors.OutputFailed,
    "output_closed": errors.OutputClosed,
    "crashed": errors.RunStopped,
}

# What each outcome means, and what helps: the docs' table.
ABOUT: dict[Outcome, tuple[str, str]] = {
    "completed": ("every row has its result, no more failed than --max-error-rate allows", ""),
    "empty_input": ("the input had no rows: the output is written empty", ""),
    "crashed": ("a bug: a traceback is shown; the metrics file is still written", "report it"),
    "usage_error": ("bad usage, config or input, found before anything was sent", "fix the command or the config"),
    "input_error": ("the input broke part-way (a later batch); the answers so far are kept", "fix the input, run again"),
    "batch_pending": ("batch mode: batches still running at the provider, or its API down for a while", "the same command later"),
    "error_rate": ("finished, but more rows failed than --max-error-rate allows", "run again: rows that failed for a reason that may pass are retried"),
    "spend_ceiling": ("--max-cost or --max-tokens-total reached; the rows not sent are marked", "raise the ceiling, run again"),
    "auth_refused": ("the provider refused the API key (401/403, an invalid key)", "fix the key"),
    "quota_exhausted": ("the account is out of credit or quota", "top it up"),
    "server_unavailable": ("the server was unreachable, failed every request, or asked to wait, longer than --max-wait", "run again later"),
    "requests_refused": ("every request got the same permanent refusal (a wrong model, path or parameter)", "fix the job"),
    "output_failed": ("the output could not be written (a full disk, an upload refused); every answer is kept", "fix the place, run again"),
    "interrupted": ("Ctrl-C or SIGTERM, after every answer received was saved", "run again to resume"),
    "output_closed": ("stdout was closed by its reader (--output - piped into head)", ""),
}  # fmt: skip

# What each code tells a scheduler, for --help (the table above, by code).
MEANINGS: dict[int, str] = {
    0: "done (also an input with no rows: the output is written empty)",
    1: "crashed: a bug, with a traceback",
    2: "bad usage, config or input: nothing sent (or, rarely, the input broke part-way; the answers are kept)",
    3: "batch mode: batches still running; run the same command again to collect them",
    4: "finished, but more rows failed than --max-error-rate allows (a re-run retries them)",
    5: "stopped at the spend ceiling (--max-cost, --max-tokens-total)",
    6: "stopped: the provider refused the API key",
    7: "stopped: the account is out of credit or quota",
    8: "stopped: the server was unreachable or failing for longer than --max-wait (try again later)",
    9: "stopped: every request was refused alike (check the model, --base-url and the parameters)",
    10: "the output could not be written (every answer is kept in the checkpoint)",
    130: "interrupted by Ctrl-C or SIGTERM (every answer is kept; run again to resume)",
    141: "stdout closed by its reader (--output - piped into head)",
}


def table_markdown() -> str:
    """The outcomes as a Markdown table, for the docs' exit-code page."""
    lines = ["| exit | outcome | what happened | what helps | Python |", "|---|---|---|---|---|"]
    for outcome, code in sorted(EXIT_CODES.items(), key=lambda item: item[1]):
        happened, helps = ABOUT[outcome]
        cls = EXCEPTIONS.get(outcome)
        raised = f"`pipeline.{cls.__name__}`" if cls is not None else ""
        raised = {"interrupted": "`pipeline.Interrupted`", "crashed": "the bug's own exception"}.get(outcome, raised)
        lines.append(f"| {code} | `{outcome}` | {happened} | {helps} | {raised} |")
    return "\n".join(lines) + "\n"


# Why a row was not sent when the run stopped before reaching it, by outcome.
NOT_SENT: dict[Outcome, str] = {
    "auth_refused": "the provider refused the key",
    "quota_exhausted": "the account is out of credit or quota",
    "server_unavailable": "the server was unavailable for longer than --max-wait",
    "requests_refused": "every request was refused alike",
    "output_closed": "the output was closed by its reader",
    "input_error": "the input could not be read",
}


def of_fatal(err: errors.FatalError) -> Outcome:
    """The ending a fatal answer gives the run."""
    if isinstance(err, errors.KeyRefused):
        return "auth_refused"
    if isinstance(err, errors.OutOfQuota):
        return "quota_exhausted"
    if isinstance(err, errors.WaitTooLong) or err.kind in ("connect", "outage", "daily_limit", "wait_too_long"):
        return "server_unavailable"
    if err.kind == "broken_pipe":
        return "output_closed"
    if err.kind == "config":  # a key variable unset on a Ray node: the job's settings, found late
        return "input_error"
    if err.kind in ("auth", "http_401", "http_403"):  # a stop passed on by another Ray actor
        return "auth_refused"
    if err.kind == "quota":
        return "quota_exhausted"
    return "requests_refused"


def not_sent_note(outcome: Outcome) -> str:
    """The error text of a row the run never sent because it stopped early."""
    return f"not sent: the run stopped early ({NOT_SENT.get(outcome, outcome.replace('_', ' '))})"


@dataclass(frozen=True)
class RunResult:
    """What one run did: how it ended, its counts, what it cost and where it left its files.

    `outcome` is a word of the table above and `exit_code` its code, what `pipeline run`
    exits with; `reason` what the user was told when the run did not simply complete.
    `metrics` is the whole metrics document (schema pipeline.metrics/1), written to
    `metrics_file` when there is one."""

    outcome: Outcome
    exit_code: int
    reason: str | None
    rows: int
    ok: int
    errors: int
    from_checkpoint: int
    from_cache: int
    not_sent: int
    requests: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # this run, in the prices' currency; None with no price
    cost_all_runs: float | None  # this output, the checkpoint's earlier answers included
    wall_s: float
    output: str | None
    checkpoint: str | None
    metrics_file: str | None
    report_file: str | None
    metrics: dict[str, Any] = field(repr=False)

    @property
    def succeeded(self) -> bool:
        """Exit 0: every row answered, or no more errors than max_error_rate allows."""
        return self.exit_code == EXIT_OK

    def raise_for_outcome(self) -> RunResult:
        """Raise the ending's exception unless the run succeeded (then return self): for an
        orchestrator's task that should fail with the cause, `pipeline.run(...).raise_for_outcome()`."""
        if self.succeeded:
            return self
        message = self.reason or f"the run ended {self.outcome}"
        if self.outcome == "interrupted":
            raise errors.Interrupted(message, self)
        cls = EXCEPTIONS.get(self.outcome, errors.RunStopped)
        if issubclass(cls, errors.RunStopped):
            raise cls(message, self)
        raise cls(message)

    @classmethod
    def from_metrics(
        cls, data: dict[str, Any], output: str | None, checkpoint: str, metrics_file: str | None, report: str | None
    ) -> RunResult:
        run, rows, requests, tokens, cost = data["run"], data["rows"], data["requests"], data["tokens"], data["cost"]
        return cls(
            outcome=run["outcome"],
            exit_code=run["exit_code"],
            reason=run["reason"],
            rows=rows["total"],
            ok=rows["ok"],
            errors=rows["error"],
            from_checkpoint=rows["from_checkpoint"],
            from_cache=rows["from_cache"],
            not_sent=rows["not_sent"],
            requests=requests["sent"],
            retries=requests["retries"],
            prompt_tokens=tokens["prompt"],
            completion_tokens=tokens["completion"],
            cost=cost["this_run"] if cost else None,
            cost_all_runs=cost["all_runs"] if cost else None,
            wall_s=run["wall_s"],
            output=output,
            checkpoint=checkpoint,
            metrics_file=metrics_file,
            report_file=report,
            metrics=data,
        )
