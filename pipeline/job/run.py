"""`Job.execute()`: one checked job from start to RunResult, in three steps.

It holds what the run needs (the checkpoint, the output, the answer cache),
each closed on every way out, then:

1. send (send.py, or batch.py in batch mode): every answer into the checkpoint;
2. commit (commit.py): the output made whole, the run judged: an ending;
3. report (record.py): the metrics file and the HTML report.

An interrupt (Ctrl-C, SIGTERM, a caller's cancel) saves every answer received,
writes the metrics file and lets the cancellation through; a crash still leaves
the metrics file a CI job looks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import polars as pl

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.engines.online import Engine
from pipeline.job import record
from pipeline.job.batch import batch_step, refuse_open_batches
from pipeline.job.commit import commit, empty_run, stopped
from pipeline.job.send import send
from pipeline.limits import spend
from pipeline.observe import metrics
from pipeline.observe.stats import RunStats
from pipeline.outcomes import RunResult
from pipeline.plan import Plan
from pipeline.tables import remote_state, storage
from pipeline.tables.cache import AnswerCache, scope_for
from pipeline.tables.checkpoint import STORED_SCHEMA, Checkpoint
from pipeline.tables.responses import ResponseLog
from pipeline.tables.sink import Sink, open_sink

INTERRUPT_GRACE_S = 5.0  # how long a first Ctrl-C waits for the requests in flight (the CLI and the Python API)


class Job:
    """One checked job: `await job.execute()` sends it; `job.result` is set on every way out but a crash."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: Plan,
        *,
        stats: RunStats,
        clock: metrics.Clock,
        say: Callable[[str], None],
        stream: TextIO,
        secrets: tuple[str, ...],
        api_key: str | None,
        headers: dict[str, str],
        sink: Sink | None,
        checkpoint: Path,
        files: bool,
        notebook: bool,
        remote: storage.Url | None = None,
        access: tuple[tuple[str | None, dict[str, str]], ...] = (),
    ) -> None:
        self.cfg, self.plan, self.stats, self.clock = cfg, plan, stats, clock
        self.say, self.stream, self.notebook = say, stream, notebook
        self.secrets, self.api_key, self.headers = secrets, api_key, headers
        self.access = access  # with several models: each one's key and headers, in the plan's order
        self.checkpoint_path = checkpoint  # a local folder: the checkpoint, or the working copy of a remote one
        self.remote = remote  # where the checkpoint lives in object storage, if it does
        self.checkpoint_shown = f"{remote}/" if remote is not None else str(checkpoint)  # as messages name it
        self.resume_hint = "Run the same command again to resume."  # after an interrupt; the API says its own
        self._sink = sink  # the API's table out, else the output file is opened by the run
        self.holds_table = sink is not None  # the caller gets the rows back in memory, whatever the ending
        self.files = files
        self.earlier_cost: float | None = None  # what the answers the checkpoint held cost, for the cost across runs
        self.done_before = pl.DataFrame(schema=STORED_SCHEMA)  # the checkpoint's answers when this run began
        self.result: RunResult | None = None
        self.attempts_before: dict[str, int] = {}  # batch submissions a row had, for the online fallback's attempts
        self.counted_folded = 0  # answers of batches already counted in this run's tokens
        self.responses: ResponseLog | None = None  # responses as received, for an output of batch-output lines
        self.engine: Engine | None = None  # while the local engine sends: what an interrupt winds down

    async def execute(self) -> RunResult:
        """Send the job and return what it did. Raises UserError for a problem found before anything was
        sent; on cancellation (Ctrl-C, SIGTERM, a caller's cancel) saves everything answered, sets
        `self.result` (outcome interrupted) and lets the CancelledError through."""
        try:
            ending = await self._steps()
        except errors.UserError as exc:  # exit 2, found before anything was sent
            if not isinstance(exc, errors.JobBusy) and record.metrics_path(self) is not None:  # the holder writes its own
                record.mark_refused(self.cfg, self.clock, exc, self.stats)
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            message = (
                f"pipeline: interrupted. {self.stats.rows_done} rows were finished; every answer received is saved in "
                f"{self.checkpoint_shown}. {self.resume_hint}"
            )
            self.say("\n" + message)
            self.result = record.finish(self, metrics.Ending("interrupted", message))
            raise
        except BaseException as exc:  # a bug: still leave the file a CI job looks for, then let the traceback out
            record.finish(self, metrics.Ending("crashed", f"{type(exc).__name__}: {exc}"))
            raise
        self.result = record.finish(self, ending)  # 3. report
        record.report(self, ending)
        return self.result

    async def wind_down(self, grace: float) -> None:
        """The first Ctrl-C: send nothing more and wait up to `grace` seconds for the requests in flight,
        so their answers are saved; the caller then cancels. Returns at once when the local engine is not
        sending (not started yet, batch mode, the Ray engine)."""
        if self.engine is not None:
            await self.engine.wind_down(grace)

    async def _steps(self) -> metrics.Ending:
        """Hold what the run needs, then 1. send and 2. commit."""
        if self.stats.total_rows == 0:
            with self._open_sink() as sink:
                return empty_run(self, sink)
        cfg = self.cfg
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            checkpoint = stack.enter_context(self._open_checkpoint())
            sink = stack.enter_context(self._open_sink())
            done = self._answered_before(checkpoint)
            checkpoint.start_journal()
            cache = None
            if cfg.cache_dir is not None and not self.plan.models:  # several models: a cache each, opened with its lane
                scope = scope_for(cfg.provider, cfg.setting("base_url"))
                cache = stack.enter_context(AnswerCache(cfg.cache_dir, scope, max_mb=cfg.cache_max_mb).open())
            if cfg.mode == "batch":
                if cfg.engine == "ray":
                    self.say("pipeline: batch mode: the provider's batch API runs the requests; no Ray actors are started")
                early, done = await batch_step(self, checkpoint, done, stack, cache)
                if early is not None:  # batches still running (exit 3), or a refusal
                    return early
            else:
                refuse_open_batches(self)
            sent = await send(self, stack, checkpoint=checkpoint, sink=sink, done=done, cache=cache)
            if sent.ending is not None:
                return sent.ending
            if sent.stop is not None:
                return stopped(self, sent.stop, sink if sent.whole else None, sent.appended, started)
            return commit(self, sink, started)

    def _answered_before(self, checkpoint: Checkpoint) -> pl.DataFrame:
        """The answers earlier runs left (none with --fresh, but their cost is still counted)."""
        done = checkpoint.load()
        if done.height:
            self.earlier_cost = spend.answered_cost(self.cfg, done)
        if self.cfg.fresh:
            done = done.clear()
        elif done.height:
            self.say(
                f"pipeline: resuming: the checkpoint {self.checkpoint_shown} holds {done.height} answered requests; "
                "rows that match them are not sent again"
            )
        self.done_before = done  # what earlier runs paid for: this run's spend is counted apart
        return done

    @contextlib.contextmanager
    def _open_sink(self) -> Iterator[Sink]:
        """The output, aborted on every way out but a commit (abort is a no-op after one)."""
        output = self.plan.output
        if self._sink is not None:
            sink = self._sink
        elif self.plan.renderer.spec.verbatim and (
            self.cfg.output_format == "openai-batch" or str(output).lower().endswith((".jsonl", ".ndjson"))
        ):
            from pipeline.tables.interchange import BatchOutputSink  # answers to batch requests, as batch-output lines

            assert output is not None
            sink = BatchOutputSink(output, self.cfg.result_prefix, responses_in=self.checkpoint_path)
            self.responses = ResponseLog(self.checkpoint_path, self.secrets)
        else:
            assert output is not None  # preflight refuses a run with neither
            sink = open_sink(output, self.cfg.result_prefix, bom=self.cfg.csv_bom)
        try:
            yield sink
        finally:
            sink.abort()
            if self.responses is not None:
                self.responses.close()

    @contextlib.contextmanager
    def _open_checkpoint(self) -> Iterator[Checkpoint]:
        checkpoint = remote_state.open_checkpoint(self.checkpoint_path, self.remote, self.say)
        checkpoint.open()
        try:
            if isinstance(self.plan.output, storage.Url):  # held: no live run of this job is uploading it
                remote_state.clean_output_leftovers(self.plan.output, self.say)
            yield checkpoint
        finally:
            checkpoint.close(discard_unused=True)
