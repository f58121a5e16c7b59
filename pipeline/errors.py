"""One exception tree for the whole package.

    PipelineError
    ├── UserError                 exit 2, raised before any request is sent
    │   ├── ConfigError           a bad config file, key, value or flag
    │   └── InputError            a missing/unreadable/empty table, a missing column
    ├── RunStopped                the API's complete(): a run stopped before its output (bad key, no
    │                             quota, a wait too long); `result` says what was kept
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
        └── FatalError            stops the whole run: every row would fail the same way
            ├── AuthError         401/403, invalid key
            ├── QuotaExhausted    out of credits or quota
            └── WaitTooLong       a limit that resets later than --max-wait (a daily limit, an outage)

    Interrupted                   a KeyboardInterrupt: the Python API's Ctrl-C, after the
                                  checkpoint is flushed; `result` says how far the run got

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


class RunStopped(PipelineError):
    """The Python API's `complete()`: a fatal answer stopped the run before it could return its table.
    Every answer received is kept in the checkpoint; `result` is the run's RunResult."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class Interrupted(KeyboardInterrupt):
    """A run of the Python API stopped by Ctrl-C (or a notebook's stop button) after saving every answer.

    A KeyboardInterrupt, not a PipelineError, so `except Exception` in a caller's code does not swallow
    the user's interrupt. `result` is the run's RunResult (outcome "interrupted")."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


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


class AuthError(FatalError):
    """401 or 403: the key is missing, wrong, or not allowed to do this."""


class QuotaExhausted(FatalError):
    """The account is out of credits or quota."""


class WaitTooLong(FatalError):
    """The server asked for a wait longer than --max-wait, or stayed down that long."""
