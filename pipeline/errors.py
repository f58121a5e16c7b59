"""One exception tree for the whole package.

    PipelineError
    ├── UserError                 exit 2, raised before any request is sent
    │   ├── ConfigError           a bad config file, key, value or flag
    │   └── InputError            a missing/unreadable/empty table, a missing column
    │       └── JobBusy           another run holds this job's checkpoint
    ├── RunStopped                a run that ended without doing all its work; `result` is its
    │   │                         RunResult, `frame` (complete() only) the rows so far, unsent ones marked
    │   ├── BatchPending          exit 3: batches still running; the same call again collects them
    │   ├── ErrorRateExceeded     exit 4: more rows failed than max_error_rate allows
    │   ├── SpendCeilingReached   exit 5: --max-cost / --max-tokens-total reached
    │   ├── AuthError             exit 6: the provider refused the key (401/403, "invalid key")
    │   ├── QuotaExhausted        exit 7: the account is out of credit or quota
    │   ├── ServerUnavailable     exit 8: unreachable, or failing every request, past --max-wait
    │   ├── RequestsRefused       exit 9: every request refused alike (the model, path or parameters)
    │   ├── OutputFailed          exit 10: the output could not be written (the answers are kept)
    │   └── OutputClosed          exit 141: stdout closed by its reader (`-o - | head`)
    └── RequestError              one request failed; the row records `kind` and message
        ├── TransientError        worth another attempt (after `retry_after` if given)
        │   ├── RateLimited       429, ModelsLab's "Rate limit exceeded"; `scope` says rate or concurrency
        │   ├── ServerError       408, 409, 5xx, 529; `overloaded` for 503/529
        │   ├── TransportError    connection refused/reset, server disconnected
        │   ├── RequestTimeout    no answer within --timeout
        │   ├── MalformedReply    unparseable body (a truncated reply is often transient)
        │   └── InvalidOutput     a reply that breaks the JSON Schema: asked again, with the reason
        ├── PermanentError        another attempt would get the same answer (other 4xx, 501, 505)
        │   └── ErrorReply        HTTP 200 carrying an error or no completion
        └── FatalError            one answer that stops the whole run: every row would fail the same way
            ├── KeyRefused        401/403, invalid key              -> the run's AuthError
            ├── OutOfQuota        out of credits or quota           -> the run's QuotaExhausted
            └── WaitTooLong       a limit that resets later than --max-wait (a daily limit, an outage)
                                                                    -> the run's ServerUnavailable

    Interrupted                   a KeyboardInterrupt: the Python API's Ctrl-C, after the
                                  checkpoint is flushed; `result` says how far the run got

A RequestError is what one answer was; a RunStopped is how a whole run ended.
`pipeline.outcomes` maps each ending to its exit code, its word in the metrics
file and its RunStopped class. `pipeline.complete()` raises the RunStopped of a
run stopped early; `pipeline.run()` returns the RunResult, and
`result.raise_for_outcome()` raises it.

Lower-level errors (aiohttp, polars, pyarrow, pydantic) are translated into this
tree where they cross a module boundary, so callers never catch library types.
Messages must never contain an API key.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(PipelineError):
    """A mistake the user can fix; reported as one paragraph, exit code 2."""


class ConfigError(UserError):
    """A bad config file, key, value or flag (an unknown key says which valid one is nearest)."""


class InputError(UserError):
    """A missing, unreadable or malformed input table, a missing column, or an output that cannot be written."""


class JobBusy(InputError):
    """Another run holds this job's checkpoint: two runs of one job would pay twice."""


class RunStopped(PipelineError):
    """A run that ended without doing all its work. Every answer received is kept in the checkpoint.

    `result` is the run's RunResult (`outcome`, `exit_code`, counts, paths); `frame`, from
    `complete()`, is the table so far: every input row, the rows not sent marked as errors."""

    outcome = "stopped"
    exit_code = 1

    def __init__(self, message: str, result: object = None, frame: object = None) -> None:
        super().__init__(message)
        self.result = result
        self.frame = frame


class BatchPending(RunStopped):
    """Batch mode: batches are still running; the same call again collects them."""

    outcome, exit_code = "batch_pending", 3


class ErrorRateExceeded(RunStopped):
    """The run finished, but more rows failed than max_error_rate allows."""

    outcome, exit_code = "error_rate", 4


class SpendCeilingReached(RunStopped):
    """--max-cost or --max-tokens-total was reached; the rows not sent are marked."""

    outcome, exit_code = "spend_ceiling", 5


class AuthError(RunStopped):
    """The provider refused the API key (or its permissions): fix the key, then run again."""

    outcome, exit_code = "auth_refused", 6


class QuotaExhausted(RunStopped):
    """The account is out of credit or quota: top it up, then run again."""

    outcome, exit_code = "quota_exhausted", 7


class ServerUnavailable(RunStopped):
    """The server could not be reached, failed every request, or asked for a wait, longer than --max-wait:
    run again later."""

    outcome, exit_code = "server_unavailable", 8


class RequestsRefused(RunStopped):
    """Every request got the same permanent refusal (a wrong model, path or parameter): fix the job."""

    outcome, exit_code = "requests_refused", 9


class OutputFailed(RunStopped):
    """The output could not be written (a full disk, an upload refused); every answer is in the checkpoint."""

    outcome, exit_code = "output_failed", 10


class OutputClosed(RunStopped):
    """stdout was closed by its reader (`--output - | head`): the run stopped as asked."""

    outcome, exit_code = "output_closed", 141


class Interrupted(KeyboardInterrupt):
    """A run of the Python API stopped by Ctrl-C (or a notebook's stop button) after saving every answer.

    A KeyboardInterrupt, not a PipelineError, so `except Exception` in a caller's code does not swallow
    the user's interrupt. `result` is the run's RunResult (outcome "interrupted"); `partial`, from
    `complete()`, the rows answered so far with their result columns (a polars DataFrame)."""

    def __init__(self, message: str, result: object = None, partial: object = None) -> None:
        super().__init__(message)
        self.result = result
        self.partial = partial


class RequestError(PipelineError):
    """One attempt at one request failed.

    `kind` is a short stable label for the summary's "errors by kind" table
    (e.g. ``http_429``, ``timeout``); `retry_after` is the server's requested
    wait in seconds, if it named one.
    """

    transient = False
    fatal = False

    def __init__(self, message: str, *, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0])


class TransientError(RequestError):
    transient = True


class RateLimited(TransientError):
    """Over a limit. `scope` says which kind, because the cure differs:

    - "rate": requests or tokens per unit of time; slow everyone down.
    - "concurrency": too many requests in flight (ModelsLab's "Maximum N queued
      requests allowed"); only this row waits, and fewer go out at once.
      `limit` is N when the server named it.
    - "unknown": no telling; treated as a rate limit.
    """

    def __init__(
        self, message: str, *, kind: str, retry_after: float | None = None, scope: str = "unknown", limit: int | None = None
    ) -> None:
        super().__init__(message, kind=kind, retry_after=retry_after)
        self.scope = scope
        self.limit = limit


class ServerError(TransientError):
    """408, 409, 5xx. `overloaded` (503, 529) means busy, not broken: fewer requests at once help."""

    def __init__(self, message: str, *, kind: str, retry_after: float | None = None, overloaded: bool = False) -> None:
        super().__init__(message, kind=kind, retry_after=retry_after)
        self.overloaded = overloaded


class TransportError(TransientError):
    pass


class RequestTimeout(TransientError):
    pass


class MalformedReply(TransientError):
    pass


class InvalidOutput(TransientError):
    """The model answered, but not with JSON that fits the schema; `raw` is what it said."""

    def __init__(self, message: str, *, raw: str) -> None:
        super().__init__(message, kind="invalid_output")
        self.raw = raw


class PermanentError(RequestError):
    pass


class ErrorReply(PermanentError):
    pass


class FatalError(RequestError):
    """An answer every row would get alike: the run stops (exit 1) after saving the requests in flight."""

    fatal = True


class KeyRefused(FatalError):
    """401/403, or a body that says the key is invalid."""


class OutOfQuota(FatalError):
    """402, or a body that says the credit or quota is used up."""


class WaitTooLong(FatalError):
    """The server asked for a wait longer than --max-wait, or stayed down that long."""
