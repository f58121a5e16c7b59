"""The Python API: the engine of `pipeline run` for notebooks and orchestrators.

    import pipeline
    df = pipeline.complete(reviews, prompt="Summarise: {text}", base_url="http://127.0.0.1:8080/v1", model="m")
    result = pipeline.run("configs/summarise-reviews.yaml", limit=100)

Settings are the keyword arguments of the one settings model (`RunConfig`) that
also makes the CLI's flags and reads YAML, so every flag is a keyword by the
same name (`--max-tokens` is `max_tokens=`, `--no-adapt` is `adapt=False`).
Errors are the package's exception tree: `UserError` (a `ConfigError` or an
`InputError`, raised before anything is sent), `RunStopped` from `complete()`
when a fatal answer stopped the run, and `Interrupted`, a KeyboardInterrupt,
after Ctrl-C has saved every answer.

The sync forms run their own event loop, or, inside one that is already
running (Jupyter), a private loop in a worker thread; the async forms run on
the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import polars as pl

from pipeline import answers, errors
from pipeline.job import INTERRUPT_GRACE_S, Job, prepare_job
from pipeline.outcomes import EXCEPTIONS, EXIT_INTERRUPTED, RunResult
from pipeline.settings import ConfigLike, settings_config
from pipeline.tables import frames, source
from pipeline.tables.scratch import Scratch
from pipeline.tables.sink import Sink

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")


@overload
def complete(table: pl.DataFrame | pl.LazyFrame, **settings: Any) -> pl.DataFrame: ...
@overload
def complete(table: Any, **settings: Any) -> Any: ...


def complete(table: Any, **settings: Any) -> Any:
    """Send one request per row of `table` and return the table with the result columns.

    `table`: a polars DataFrame or LazyFrame, a pyarrow Table or RecordBatch, or a pandas DataFrame;
    the result is of the same kind (a polars DataFrame for a LazyFrame), its input columns the ones
    given (a pandas frame keeps its index and dtypes, an Arrow table its schema).
    `settings`: those of `pipeline run` by their YAML names (`prompt`, `provider`, `base_url`,
    `model`, `system`, `max_tokens`, `schema`, `rpm`, ...), plus `config` (a YAML path or a
    mapping they are laid over). Input and output files are not used: the table comes in and
    goes out. Output: every input column, then completion, prompt_tokens, ..., request_key,
    tokens_estimated (and the schema's fields), one row per input row, in order, as a CLI
    run writes them. `model=["a", "b"]` (or `models=[...]`, whose entries may be mappings with
    their own provider, base_url, api_key_env, parameters and prices) asks each model: a row per
    input row and model, in that order, with a requested_model column.

    `checkpoint_dir`: a folder that keeps every answer as it comes; calling again with the same
    folder resumes (answered rows are not sent again). Without it (and without `cache_dir`) the
    answers go to the user's default answer store (`pipeline.answers`): calling the same
    complete() again, here or in a new process, sends only what was never answered
    (`fresh=True` sends every row and keeps nothing). `metrics`: a path for the metrics JSON file.
    `api_key`: the key itself, for a notebook with no environment variable; held in memory for
    the call only (never written to the checkpoint, the metrics or any message).

    Raises UserError (ConfigError, InputError) before anything is sent, RunStopped when a
    fatal answer (bad key, no quota) stopped the run, Interrupted after Ctrl-C (its `partial`
    holds the rows answered so far).
    """
    return _sync(lambda: acomplete(table, **settings))


async def acomplete(table: Any, **settings: Any) -> Any:
    """`complete` on the caller's event loop."""
    config = settings.pop("config", None)
    api_key = _key(settings.pop("api_key", None))
    frame = _as_frame(table)
    cfg = settings_config(config, settings, api=True)
    if cfg.mode == "batch" and not cfg.checkpoint_dir and not cfg.wait:
        raise errors.ConfigError(
            "complete(mode='batch') returns before its batches finish: give checkpoint_dir= so a later call collects "
            "them (without it the record of the batches would be gone, and a second call would pay again), or wait=True."
        )
    cfg = answers.with_default_store(cfg)  # without a place of the caller's, the answers outlive the call
    sink = MemorySink(cfg.result_prefix)
    with Scratch("pipeline-answers-") as scratch:  # a killed kernel's folder is removed by the next call
        if cfg.checkpoint_dir:
            checkpoint = Path(cfg.checkpoint_dir)
        elif cfg.mode == "batch":  # open batches outlive an interrupt: their ledger must too
            checkpoint = answers.batch_checkpoint(cfg)
        else:
            checkpoint = Path(scratch) / "answers.checkpoint"
        job = await asyncio.to_thread(
            prepare_job,
            cfg,
            table=source.in_memory(frame),
            sink=sink,
            checkpoint=checkpoint,
            files=False,
            notebook=_in_notebook(),
            say=None if cfg.progress else _log,
            api_key=api_key,
        )
        job.checkpoint_shown, job.resume_hint = answers.where(cfg), answers.resume_hint(cfg)
        result = await _execute(job, partial=lambda: answers.answered_so_far(job, MemorySink(cfg.result_prefix)))
        if cfg.mode == "batch" and not cfg.checkpoint_dir and result.outcome in ("completed", "empty_input"):
            shutil.rmtree(checkpoint, ignore_errors=True)  # all collected: the answers are in the default store
    if result.outcome in ("completed", "empty_input", "error_rate", "spend_ceiling") and sink.frame is not None:
        # The rows carry their status: failed or unsent rows are rows, not an exception. In the kind given.
        return frames.like(table, sink.frame, len(frame.collect_schema()))
    raise _stopped(result, sink.frame)


def _stopped(result: RunResult, frame: pl.DataFrame | None) -> errors.PipelineError:
    """The exception of a run that did not finish its work: AuthError for a refused key, ServerUnavailable for a
    server down past max_wait, ... (pipeline.outcomes), with the RunResult and the rows so far."""
    message = result.reason or f"the run ended {result.outcome}"
    cls = EXCEPTIONS.get(result.outcome, errors.RunStopped)
    if issubclass(cls, errors.RunStopped):
        return cls(message, result, frame)
    return cls(message)


def run(config: ConfigLike = None, **settings: Any) -> RunResult:
    """Run a job exactly as `pipeline run CONFIG --flag ...` does (files in, files out, the
    checkpoint, the metrics file and the report beside the output) and return its RunResult
    instead of an exit code: `result.outcome`, `result.ok`, `result.errors`, `result.cost`,
    `result.output`, ... `result.exit_code` is what the CLI would exit with.

    `config`: a YAML file's path, a mapping of settings, a RunConfig, or None; `settings` are laid
    over it, as flags are over a config file. Raises UserError before anything is sent and
    Interrupted after Ctrl-C; a run that stops (a bad key, the spend ceiling, the error rate)
    returns its result, with `result.succeeded` False and the reason in `result.reason`.
    `api_key`: the key itself, held in memory only, as for `complete()`."""
    return _sync(lambda: arun(config, **settings))


async def arun(config: ConfigLike = None, **settings: Any) -> RunResult:
    """`run` on the caller's event loop."""
    api_key = _key(settings.pop("api_key", None))
    cfg = settings_config(config, settings, api=False)
    job = await asyncio.to_thread(prepare_job, cfg, notebook=_in_notebook(), say=None if cfg.progress else _log, api_key=api_key)
    return await _execute(job)


def _key(value: Any) -> str | None:
    """api_key= as given: text, or None to read the config's variable. Never echoed: it is a secret."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise errors.ConfigError(
            "api_key= takes the key as non-empty text (or leave it out to read the variable named by api_key_env)."
        )
    return value.strip()


class MemorySink(Sink):
    """The output kept in memory, in order, for `complete()`: the frames of every batch, joined at commit."""

    def __init__(self, result_prefix: str = "") -> None:
        super().__init__(result_prefix)
        self._frames: list[pl.DataFrame] = []
        self.frame: pl.DataFrame | None = None

    def _append(self, frame: pl.DataFrame) -> None:
        self._frames.append(frame)

    def commit(self) -> None:
        if self._frames:
            self.frame = self._frames[0] if len(self._frames) == 1 else pl.concat(self._frames, how="vertical_relaxed")
        self._frames = []

    def abort(self) -> None:
        self._frames = []


async def _execute(job: Job, partial: Callable[[], pl.DataFrame] | None = None) -> RunResult:
    root = asyncio.current_task()
    if root is not None and getattr(root, "_pipeline_sync", False):
        root._pipeline_job = job  # type: ignore[attr-defined]  # what a Ctrl-C winds down (_on_interrupt)
    try:
        return await job.execute()
    except (asyncio.CancelledError, KeyboardInterrupt):
        if job.result is None or job.result.exit_code != EXIT_INTERRUPTED:
            raise
        if _cancelled_by_caller():
            raise  # the caller's own cancel: asyncio's contract is that CancelledError comes back
        rows = None
        if partial is not None:  # the rows answered so far, for a caller who wants them now
            try:
                rows = partial()
            except Exception:  # never in the way of the interrupt itself: the answers are kept all the same
                logging.getLogger("pipeline").exception("pipeline: the rows answered so far could not be gathered")
        raise errors.Interrupted(job.result.reason or "interrupted", job.result, rows) from None


def _cancelled_by_caller() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0 and not getattr(task, "_pipeline_sync", False)


def _sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end from sync code: on a new loop, or in a worker thread when this
    thread already runs one (Jupyter). A first Ctrl-C (the notebook's stop button) sends nothing more and
    gives the requests in flight a few seconds to come back, as `pipeline run` does: they are paid for, and
    their answers are kept. Then the run is cancelled, it saves what it has, and Interrupted follows. A
    second Ctrl-C stops at once."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_marked(make, interrupts=threading.current_thread() is threading.main_thread()))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pool:
        loop_and_task: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []

        async def main() -> T:
            task = asyncio.current_task()
            assert task is not None
            loop_and_task.append((asyncio.get_running_loop(), task))
            return await _marked(make)

        def interrupt() -> None:
            for loop, task in loop_and_task:
                with contextlib.suppress(RuntimeError):  # its loop closed just now: the run has ended
                    loop.call_soon_threadsafe(_on_interrupt, loop, task)

        future = pool.submit(asyncio.run, main())
        presses = told = 0
        while True:
            try:  # a press may land anywhere in here: each is counted, and told to the run once
                while told < min(presses, 2):
                    told += 1
                    interrupt()  # the first winds the run down, the second cancels it
                if future.done():
                    break
                # In short waits: a signal may reach any thread, and a thread blocked in one long wait only
                # runs Python's handler (the KeyboardInterrupt) once that wait ends, after the whole run.
                concurrent.futures.wait([future], timeout=0.2)
            except KeyboardInterrupt:
                presses += 1
        try:
            return future.result()
        except errors.Interrupted:
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise KeyboardInterrupt from None


def _on_interrupt(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    """A Ctrl-C, on the call's loop: the first winds its run down (nothing more is sent; the requests in
    flight get INTERRUPT_GRACE_S to come back), then cancels it; a second, or one before the run has
    started sending, cancels at once."""
    job = getattr(task, "_pipeline_job", None)
    if job is None or getattr(task, "_pipeline_winding", None) is not None or task.done():
        task.cancel()
        return

    async def wind_down() -> None:
        await job.wind_down(INTERRUPT_GRACE_S)
        if not task.done():  # every row may have come back in the meantime: then the call just returns
            task.cancel()

    task._pipeline_winding = loop.create_task(wind_down())  # type: ignore[attr-defined]  # held: not collected


async def _marked(make: Callable[[], Coroutine[Any, Any, T]], *, interrupts: bool = False) -> T:
    """The coroutine as the root of its loop: a cancel it gets is an interrupt, not a caller's cancel.
    With `interrupts` (a loop of our own in the main thread), Ctrl-C goes through `_on_interrupt`."""
    task = asyncio.current_task()
    if task is not None:
        task._pipeline_sync = True  # type: ignore[attr-defined]
    if not interrupts or task is None:
        return await make()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, _on_interrupt, loop, task)
    try:
        return await make()
    finally:
        loop.remove_signal_handler(signal.SIGINT)  # Python's own handler again


def _as_frame(table: Any) -> pl.DataFrame | pl.LazyFrame:
    """polars as it is; pyarrow and pandas converted (pandas through Arrow, as polars does)."""
    if isinstance(table, pl.DataFrame | pl.LazyFrame):
        return table
    module = type(table).__module__.split(".")[0]
    if module == "pyarrow":
        converted = pl.from_arrow(_arrow(table))
        assert isinstance(converted, pl.DataFrame)
        return converted
    if module == "pandas" and hasattr(table, "columns"):
        return pl.from_pandas(table)
    raise errors.InputError(
        f"complete() takes a polars DataFrame or LazyFrame, a pyarrow Table or a pandas DataFrame, "
        f"not {type(table).__name__}. For a file, call pipeline.run(input=...), or read it with polars first."
    )


def _arrow(table: Any) -> pa.Table:
    import pyarrow as pa

    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise errors.InputError(f"complete() takes a pyarrow Table or RecordBatch, not {type(table).__name__}.")
    return table


def _log(message: str) -> None:
    """Where messages go with progress=False: the `pipeline` logger, at INFO, for an orchestrator's log."""
    logging.getLogger("pipeline").info(message.strip())


def _in_notebook() -> bool:
    """Inside a Jupyter kernel: the progress bar is tqdm's widget (stderr there is no terminal)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"
