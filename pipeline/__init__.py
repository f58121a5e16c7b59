"""pipeline: batch LLM inference over tables.

    import pipeline
    out = pipeline.complete(df, prompt="Summarise: {text}", base_url="http://127.0.0.1:8080/v1", model="m")
    result = pipeline.run("configs/summarise-reviews.yaml")

The names below are imported on first use (PEP 562), so `import pipeline` and
the CLI's start-up load neither polars nor aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pipeline.answers import clear_answers
    from pipeline.api import acomplete, arun, complete, run
    from pipeline.config import RunConfig
    from pipeline.errors import (
        AuthError,
        BatchPending,
        ConfigError,
        ErrorRateExceeded,
        FatalError,
        InputError,
        Interrupted,
        JobBusy,
        OutputClosed,
        OutputFailed,
        PipelineError,
        QuotaExhausted,
        RequestsRefused,
        RunStopped,
        ServerUnavailable,
        SpendCeilingReached,
        UserError,
        WaitTooLong,
    )
    from pipeline.outcomes import RunResult

_WHERE = {
    **dict.fromkeys(("complete", "acomplete", "run", "arun"), "pipeline.api"),
    "clear_answers": "pipeline.answers",
    "RunConfig": "pipeline.config",
    "RunResult": "pipeline.outcomes",
    **dict.fromkeys(
        (
            "AuthError",
            "BatchPending",
            "ConfigError",
            "ErrorRateExceeded",
            "FatalError",
            "InputError",
            "Interrupted",
            "JobBusy",
            "OutputClosed",
            "OutputFailed",
            "PipelineError",
            "QuotaExhausted",
            "RequestsRefused",
            "RunStopped",
            "ServerUnavailable",
            "SpendCeilingReached",
            "UserError",
            "WaitTooLong",
        ),
        "pipeline.errors",
    ),
}
__all__ = [  # what `from pipeline import *` and type checkers see; _WHERE says where each lives
    "AuthError",
    "BatchPending",
    "ConfigError",
    "ErrorRateExceeded",
    "FatalError",
    "InputError",
    "Interrupted",
    "JobBusy",
    "OutputClosed",
    "OutputFailed",
    "PipelineError",
    "QuotaExhausted",
    "RequestsRefused",
    "RunConfig",
    "RunResult",
    "RunStopped",
    "ServerUnavailable",
    "SpendCeilingReached",
    "UserError",
    "WaitTooLong",
    "acomplete",
    "arun",
    "clear_answers",
    "complete",
    "run",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
