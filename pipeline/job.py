"""One run of a job: the checks, then `Job.execute()`, which sends and returns a RunResult.

`prepare_job` makes every check that can fail because of the user (settings,
files, columns, the output's place, the key, the embedded model installed) and
raises UserError before anything is sent. `Job.execute()` is the rest of the
run as one coroutine: it opens the checkpoint, the sink, the embedded model if
one is needed and the transport, each closed on every way out, sends, writes
the metrics file and the report, and returns a RunResult.

What the user is told goes through `say`; how the event loop is run, signals,
exceptions shown to a person and exit codes belong to the callers: cli.py for
`pipeline run`, api.py for the Python API.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

import polars as pl

from pipeline import errors, outcomes
from pipeline.config import RunConfig
from pipeline.engines.online import Engine, prepare
from pipeline.limits import spend
from pipeline.limits.governor import Governor
from pipeline.limits.retry import RetryPolicy
from pipeline.observe import history, metrics
from pipeline.observe.progress import Progress, plural, summary
from pipeline.observe.stats import RunStats
from pipeline.outcomes import EXIT_OK, RunResult
from pipeline.plan import NOWHERE, Plan, preflight
from pipeline.providers import Provider, make_provider
from pipeline.providers.local_model import LocalServer, check_installed
from pipeline.providers.ratelimit import dialect_for
from pipeline.providers.transport import AiohttpTransport, Transport
from pipeline.requests.prompts import Renderer
from pipeline.tables import remote_state, source, storage
from pipeline.tables.cache import AnswerCache, scope_for
from pipeline.tables.checkpoint import RESULT_SCHEMA, Checkpoint, Result, read_done
from pipeline.tables.responses import ResponseLog
from pipeline.tables.sink import Sink, describe, open_sink, result_frame

BATCH_CALL_TIMEOUT = 3600.0  # seconds for one call of a batch API: uploads and results files run to 200 MB


def _anything_to_send(
    table: source.Table, cfg: RunConfig, renderer: Renderer, done: pl.DataFrame, cache: AnswerCache | None
) -> bool:
    """Whether any row still needs a request (a quick pass, used before starting the local model)."""
    for frame in source.batches(table, cfg.batch_size, cfg.limit):
        p = prepare(frame, renderer, done, cache)
        if any(
            key is not None and skip is None and row not in p.cached
            for row, (key, skip) in enumerate(zip(p.keys, p.skip, strict=True))
        ):
            return True
    return False


def build_engine(
    cfg: RunConfig,
    plan: Plan,
    *,
    provider: Provider,
    transport: Transport,
    base_url: str,
    checkpoint: Checkpoint,
    sink: Sink,
    stats: RunStats,
    notice: Callable[[str], None] = lambda message: None,
    cache: AnswerCache | None = None,
) -> Engine:
    """The engine and its governor for one run, from the validated settings."""
    concurrency = int(cfg.setting("concurrency"))
    governor = Governor(
        stats=stats,
        concurrency=concurrency,
        rpm=cfg.rpm,
        tpm=cfg.tpm,
        adapt=cfg.adapt,
        max_wait=cfg.max_wait,
        dialect=dialect_for(base_url, cfg.provider),
        max_tokens=plan.renderer.spec.max_tokens or 0,
        notice=notice,
        spend=spend.budget_for(cfg),
    )
    return Engine(
        provider=provider,
        transport=transport,
        governor=governor,
        policy=RetryPolicy(max_attempts=cfg.max_attempts, max_wait=cfg.max_wait),
        concurrency=concurrency,
        checkpoint=checkpoint,
        sink=sink,
        stats=stats,
        system_prompt=cfg.system,
        structured=plan.structured,
        cache=cache,
    )


def prepare_job(
    cfg: RunConfig,
    *,
    table: source.Table | None = None,
    sink: Sink | None = None,
    checkpoint: Path | None = None,
    say: Callable[[str], None] | None = None,
    stream: TextIO | None = None,
    files: bool = True,
    notebook: bool = False,
    api_key: str | None = None,
) -> Job:
    """Check everything the user could have got wrong, before anything is sent; raises UserError.

    `table` and `sink` are the API's DataFrame in and out (else the config's input
    and output files); `checkpoint` overrides the config's folder; `files` says
    whether the metrics file and the report are written (the API's DataFrame out
    writes them only when asked for by path); `api_key` is the API's key given in memory, else the
    config's variable is read."""
    clock = metrics.Clock.now()
    try:
        plan = preflight(cfg, writes=sink is None, table=table)
        api_key = api_key or cfg.api_key()
        headers, secrets = cfg.request_headers()  # before anything starts: a variable unset is exit 2
        if cfg.provider == "local" and cfg.setting("base_url") is None:
            check_installed()
        if cfg.cache_dir is not None:
            AnswerCache(cfg.cache_dir).open().close()  # a folder that cannot hold it is exit 2, before anything is sent
        stats = RunStats(total_rows=source.count_rows(plan.table, cfg.limit))
    except errors.UserError as exc:
        if files or cfg.metrics:
            mark_refused(cfg, clock, exc)
        raise
    err = stream or sys.stderr

    def to_stream(message: str) -> None:
        print(message, file=err, flush=True)

    return Job(
        cfg,
        plan,
        stats=stats,
        clock=clock,
        say=say or to_stream,
        stream=err,
        secrets=(*secrets, *([api_key] if api_key else [])),
        api_key=api_key,
        headers=headers,
        sink=sink,
        checkpoint=checkpoint or cfg.checkpoint_path,
        remote=cfg.checkpoint_remote if checkpoint is None else None,
        files=files,
        notebook=notebook,
    )


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
    ) -> None:
        self.cfg, self.plan, self.stats, self.clock = cfg, plan, stats, clock
        self.say, self.stream, self.notebook = say, stream, notebook
        self.secrets, self.api_key, self.headers = secrets, api_key, headers
        self.checkpoint_path = checkpoint  # a local folder: the checkpoint, or the working copy of a remote one
        self.remote = remote  # where the checkpoint lives in object storage, if it does
        self.checkpoint_shown = f"{remote}/" if remote is not None else str(checkpoint)  # as messages name it
        self.resume_hint = "Run the same command again to resume."  # after an interrupt; the API says its own
        self._sink = sink
        self.files = files
        self.earlier_tokens: tuple[int, int] | None = None  # (prompt, completion) the checkpoint held, for the cost
        self.result: RunResult | None = None
        self._attempts_before: dict[str, int] = {}
        self.done_before = pl.DataFrame(schema=RESULT_SCHEMA)
        self.responses: ResponseLog | None = (
            None  # kept for an output of batch-output lines  # the checkpoint's answers when this run began
        )
        self._counted_folded = 0
        self._engine: Engine | None = None  # while the local engine sends: what an interrupt winds down

    # ---- the way through --------------------------------------------------------------------------

    async def execute(self) -> RunResult:
        """Send the job and return what it did. Raises UserError for a problem found before anything was
        sent; on cancellation (Ctrl-C, SIGTERM, a caller's cancel) saves everything answered, sets
        `self.result` (outcome interrupted) and lets the CancelledError through."""
        try:
            ending = self._empty_run() if self.stats.total_rows == 0 else await self._send()
        except errors.UserError as exc:  # exit 2, found before anything was sent
            if not isinstance(exc, errors.JobBusy) and self._metrics_path() is not None:  # the run holding it writes its own
                mark_refused(self.cfg, self.clock, exc, self.stats)
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            message = (
                f"pipeline: interrupted. {self.stats.rows_done} rows were finished; every answer received is saved in "
                f"{self.checkpoint_shown}. {self.resume_hint}"
            )
            self.say("\n" + message)
            self.result = self._finish(metrics.Ending("interrupted", message))
            raise
        except BaseException as exc:  # a bug: still leave the file a CI job looks for, then let the traceback out
            self._finish(metrics.Ending("crashed", f"{type(exc).__name__}: {exc}"))
            raise
        self.result = self._finish(ending)
        self._report(ending)
        return self.result

    async def wind_down(self, grace: float) -> None:
        """The first Ctrl-C: send nothing more and wait up to `grace` seconds for the requests in flight,
        so their answers are saved; the caller then cancels. Returns at once when the local engine is not
        sending (not started yet, batch mode, the Ray engine)."""
        if self._engine is not None:
            await self._engine.wind_down(grace)

    def _finish(self, ending: metrics.Ending) -> RunResult:
        path, report = self._metrics_path(), self._report_path(ending)
        data = metrics.build(
            self.cfg,
            self.stats,
            ending,
            self.clock,
            earlier_tokens=self.earlier_tokens,
            paths=(self.checkpoint_shown, self._shown(path, "metrics"), self._shown(report, "report")),
        )
        if path is not None:
            try:
                metrics.write(path, metrics.dumps(data, self.secrets))
                history.record(path, data)  # the line the report's trend across runs reads
            except OSError as exc:  # reported, never another exit code: the run's own outcome is what counts
                self.say(f"pipeline: could not write the metrics file {path}: {exc.strerror or exc}")
            else:
                self._publish(path, "metrics")
        return RunResult.from_metrics(
            data, self.cfg.output, self.checkpoint_shown, self._shown(path, "metrics"), self._shown(report, "report")
        )

    def _shown(self, path: Path | None, kind: Literal["metrics", "report"]) -> str | None:
        """The metrics file or the report as the user finds it: in the bucket, for an object, else the file."""
        if path is None:
            return None
        url = metrics.remote_path(self.cfg, kind)
        return str(url) if url is not None else str(path)

    def _publish(self, path: Path, kind: Literal["metrics", "report"]) -> None:
        """Upload the metrics file or the report where `--metrics s3://...` or an s3:// output puts it."""
        if (url := metrics.remote_path(self.cfg, kind)) is not None:
            remote_state.publish(path, url, self.say)

    def _metrics_path(self) -> Path | None:
        return metrics.default_path(self.cfg) if self.files or self.cfg.metrics else None

    def _report_path(self, ending: metrics.Ending) -> Path | None:
        """Where the report goes, if one is drawn. Not after an interrupt (whoever pressed Ctrl-C wants the
        prompt back; `pipeline report` draws it later), nor for stdout or a DataFrame, which leave no
        output to read, nor before any answer."""
        if not (self.files and self.cfg.output not in (None, "-")) or ending.outcome in ("interrupted", "crashed"):
            return None
        path, output = metrics.report_path(self.cfg), self._local_output()
        if path is None or output is None:
            return None
        if not output.exists() and not self.checkpoint_path.exists():
            return None
        return path

    def _local_output(self) -> Path | None:
        """The output as a local file: itself, or an object output's local copy."""
        output = self.plan.output
        return storage.local_copy(output) if isinstance(output, storage.Url) else output

    def _report(self, ending: metrics.Ending) -> None:
        """Draw the HTML report beside the output (after the metrics file, which it reads). A report that
        cannot be drawn is said, never an exit code."""
        path = self._report_path(ending)
        if path is None:
            return
        from pipeline.observe.report import report_after_run  # altair and vl-convert: only once the run is over

        metrics_file = metrics.default_path(self.cfg)
        failed = report_after_run(str(self._local_output()), str(metrics_file), str(self.checkpoint_path), str(path))
        if not failed:
            self._publish(path, "report")
        self.say(f"pipeline: {failed}" if failed else f"  report: {self._shown(path, 'report')}")

    def _empty_run(self) -> metrics.Ending:
        """No rows (a scheduled job's empty partition): an empty output with every column, and success.
        Nothing is sent, no model is started and no checkpoint is made: there is nothing to resume."""
        plan = self.plan
        results = result_frame([])
        with self._open_sink() as sink:
            sink.write(
                pl.DataFrame(schema=plan.table.schema), plan.structured.add_columns(results) if plan.structured else results
            )
            sink.commit()
        where = f"\n  output: {describe(plan.output)}" if plan.output is not None else ""
        message = (
            f"pipeline: 0 rows in {self.clock.elapsed():.1f} s: the input {plan.table.label} has no rows, "
            f"so nothing was sent{where}"
        )
        self.say(message)
        return metrics.Ending("empty_input", message)

    @contextlib.contextmanager
    def _open_sink(self) -> Any:
        """The sink, aborted on every way out but a commit (abort is a no-op after one)."""
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
    def _open_checkpoint(self) -> Any:
        checkpoint = remote_state.open_checkpoint(self.checkpoint_path, self.remote, self.say)
        checkpoint.open()
        try:
            if isinstance(self.plan.output, storage.Url):  # held: no live run of this job is uploading it
                remote_state.clean_output_leftovers(self.plan.output, self.say)
            yield checkpoint
        finally:
            checkpoint.close(discard_unused=True)

    async def _send(self) -> metrics.Ending:
        cfg, stats = self.cfg, self.stats
        renderer, table = self.plan.renderer, self.plan.table
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            checkpoint = stack.enter_context(self._open_checkpoint())
            sink = stack.enter_context(self._open_sink())
            done = checkpoint.load()
            if done.height:
                self.earlier_tokens = (int(done["prompt_tokens"].sum() or 0), int(done["completion_tokens"].sum() or 0))
            if cfg.fresh:
                done = done.clear()
            elif done.height:
                self.say(
                    f"pipeline: resuming: the checkpoint {self.checkpoint_shown} holds {done.height} answered requests; "
                    "rows that match them are not sent again"
                )
            checkpoint.start_journal()
            base_url = cfg.setting("base_url")
            cache = None
            if cfg.cache_dir is not None:
                scope = scope_for(cfg.provider, base_url)
                cache = stack.enter_context(AnswerCache(cfg.cache_dir, scope, max_mb=cfg.cache_max_mb).open())
            self.done_before = done  # what earlier runs paid for: this run's spend is counted apart
            if cfg.mode == "batch":
                if cfg.engine == "ray":
                    self.say("pipeline: batch mode: the provider's batch API runs the requests; no Ray actors are started")
                stopped, done = await self._batch(checkpoint, done, stack, cache)
                if stopped is not None:  # batches still running (exit 3), or a fatal answer
                    return stopped
            else:
                self._refuse_open_batches()
            if base_url is None and (done.height or cache) and not _anything_to_send(table, cfg, renderer, done, cache):
                self.say("pipeline: every row is already answered; the embedded model is not needed this time")
                base_url = NOWHERE
            if base_url is None:
                self.say("pipeline: starting the embedded model server (SmolLM2-135M-Instruct on 127.0.0.1)")
                base_url = (await stack.enter_async_context(LocalServer())).base_url
            if cfg.engine == "ray" and cfg.mode != "batch":  # batch mode: the provider runs the requests, no actors
                from pipeline.engines import ray_pool as on_ray  # Ray is an optional extra, imported only here

                progress = Progress(stats, enabled=cfg.progress, stream=self.stream, notebook=self.notebook)
                stopped_by = await on_ray.send(self, sink=sink, done=done, base_url=base_url, progress=progress)
                if stopped_by is not None:
                    return self._stopped(errors.FatalError(stopped_by, kind="stopped"), None, stats.rows_sent, started)
                return self._commit(sink, started)
            provider = make_provider(cfg.provider, base_url, renderer.spec, self.api_key, self.headers, self.secrets)
            transport = AiohttpTransport(concurrency=int(cfg.setting("concurrency")), timeout=float(cfg.setting("timeout")))
            stack.push_async_callback(transport.close)
            progress = Progress(stats, enabled=cfg.progress, stream=self.stream, notebook=self.notebook)
            engine = build_engine(
                cfg,
                self.plan,
                provider=provider,
                transport=transport,
                base_url=base_url,
                checkpoint=checkpoint,
                sink=sink,
                stats=stats,
                notice=progress.notice,
                cache=cache,
            )
            engine.attempts_before = self._attempts_before
            engine.responses = self.responses
            engine.deliver_partial = bool(done.height) or self._sink is not None  # earlier answers, or the API's table
            self._engine = engine
            progress.start()
            sampling = asyncio.get_running_loop().create_task(metrics.sampler(stats, self.clock))  # 1 Hz
            try:
                await engine.run(source.batches(table, cfg.batch_size, cfg.limit), lambda f: prepare(f, renderer, done, cache))
            except (asyncio.CancelledError, KeyboardInterrupt):
                progress.close(interrupted=True)  # before the message, which would otherwise share the bar's line
                raise
            except errors.FatalError as fatal:  # sending stopped early; every row has its result, the unsent marked
                progress.close()
                return self._stopped(fatal, sink, checkpoint.appended, started)
            except BaseExceptionGroup as group:
                progress.close()
                user, fatal_group = group.subgroup(errors.UserError), group.subgroup(errors.FatalError)
                if user is not None and stats.requests_sent == 0:
                    raise user.exceptions[0] from None
                if user is not None:  # found part-way, after requests went out: not a plain usage error
                    message = (
                        f"pipeline: stopped: {user.exceptions[0]}\n  {checkpoint.appended} answers from this run are kept in "
                        f"{self.checkpoint_shown}; fix the input and run the same command again to resume."
                    )
                    self.say(message)
                    return metrics.Ending("input_error", message)
                if fatal_group is None:
                    raise
                # The writer's own stop (stdout closed): the output cannot be committed.
                return self._stopped(fatal_group.exceptions[0], None, checkpoint.appended, started)  # type: ignore[arg-type]
            finally:
                sampling.cancel()
                progress.close()
            return self._commit(sink, started)

    def _write_output(self, sink: Sink) -> metrics.Ending | None:
        """Make the output whole; an ending when it cannot be (every answer is in the checkpoint all the same)."""
        try:
            sink.commit()
        except errors.FatalError as closed:  # stdout closed by its reader as the last rows went out
            return self._stopped(closed, None, 0, time.monotonic())
        except OSError as exc:  # a full disk, an upload refused
            message = (
                f"pipeline: stopped: the output could not be written: {exc}\n  Every answer is kept in "
                f"{self.checkpoint_shown}; fix the cause and run the same command again: nothing is sent again: exit 10."
            )
            self.say(message)
            return metrics.Ending("output_failed", message)
        return None

    def _commit(self, sink: Sink, started: float) -> metrics.Ending:
        """Every row has its result: make the output whole, say what the run did, and judge it."""
        cfg, stats = self.cfg, self.stats
        if (failed := self._write_output(sink)) is not None:
            return failed
        wall = time.monotonic() - started
        spend.note_run(stats, cfg, self.done_before)
        output = describe(self.plan.output) if self.plan.output is not None else None
        self.say(summary(stats, wall, output, self.checkpoint_shown))
        if stats.ceiling_reached:  # before the error rate: the rows not sent are errors, for the reason said here
            message = spend.stop_message(stats, cfg, str(self.checkpoint_path))
            self.say(message)
            return metrics.Ending("spend_ceiling", message)
        return self._verdict()

    def _refuse_open_batches(self) -> None:
        """An online run on an output whose batches are still open would send their rows again, and pay twice."""
        from pipeline.engines.batch import Ledger

        ledger = Ledger(self.checkpoint_path)
        if not ledger.path.exists():
            return
        waiting = sum(e.n for e in ledger.entries().values() if e.open)
        if waiting:
            raise errors.ConfigError(
                f"{plural(waiting, 'request')} of this output sit in open batches ({ledger.path}). Run with --mode batch "
                "to collect them, or `pipeline batch cancel ... --mode batch` first: an online run now would send those "
                "rows again and pay twice."
            )

    async def _batch(
        self, checkpoint: Checkpoint, done: pl.DataFrame, stack: contextlib.AsyncExitStack, cache: AnswerCache | None
    ) -> tuple[metrics.Ending | None, pl.DataFrame]:
        """Batch mode's step: fold finished batches, submit what is left. Returns an ending while batches
        are open (exit 3) or after a fatal answer; else None and the answers for the output, refusals
        included as error rows, so the engine below writes the output without sending anything more
        (but, with --fallback online, the lines that failed in a batch)."""
        from pipeline.engines.batch import BatchStep, Ledger, batch_api

        cfg, renderer, table = self.cfg, self.plan.renderer, self.plan.table
        base_url = str(cfg.setting("base_url"))
        provider = make_provider(cfg.provider, base_url, renderer.spec, self.api_key, self.headers, self.secrets)
        # An upload or a results file of up to 200 MB: not the per-request timeout of an online answer.
        transport = AiohttpTransport(concurrency=4, timeout=BATCH_CALL_TIMEOUT)
        stack.push_async_callback(transport.close)
        ledger = Ledger(self.checkpoint_path)
        step = BatchStep(
            batch_api(cfg.provider, transport, base_url, provider.headers, self.secrets, ledger, max_wait=cfg.max_wait),
            provider,
            ledger,
            checkpoint,
            max_lines=cfg.batch_max_requests,
            max_attempts=cfg.max_attempts,
            resubmit=cfg.fallback == "none",
            system=cfg.system,
            say=self.say,
            cache=cache,
            responses=self.responses,
        )

        def pending(exclude: set[str], failed: dict[str, str]) -> Iterator[tuple[str, str, str | None]]:
            for frame in source.batches(table, cfg.batch_size, cfg.limit):
                p = prepare(frame, renderer, done, cache)  # an answer the cache holds is not paid for again
                for row, key in enumerate(p.keys):
                    if key is None or p.skip[row] is not None or row in p.cached or key in exclude or key in failed:
                        continue
                    prompt = p.prompts[row]
                    assert prompt is not None
                    yield key, prompt, p.extra[row]

        try:
            outcome = await step.run(pending, cfg.wait)
        except errors.RequestError as exc:  # the batch endpoints refused, or stayed unreachable past --max-wait
            self._count_batch_spend(step.outcome)
            open_entries = [e for e in ledger.entries().values() if e.open and e.batch_id is not None]
            if open_entries and isinstance(exc, errors.TransientError | errors.WaitTooLong):
                # The batches themselves are fine and run on without us: the next invocation collects them.
                message = (
                    f"pipeline: the batch API at {base_url} did not answer well ({exc.message}).\n  "
                    f"{plural(len(open_entries), 'batch', 'batches')} ({plural(sum(e.n for e in open_entries), 'request')}) "
                    f"are open and recorded in {ledger.folder}; nothing is lost. Run the same command again to collect "
                    "them: exit 3."
                )
                self.say(message)
                return metrics.Ending("batch_pending", message), done
            ending: outcomes.Outcome = outcomes.of_fatal(exc) if isinstance(exc, errors.FatalError) else "requests_refused"
            message = (
                f"pipeline: stopped: the batch API at {base_url} answered {exc.message}.\n  Nothing submitted in this "
                f"run is lost: the ledger in {ledger.folder} records it; run the same command again once this is fixed: "
                f"exit {outcomes.EXIT_CODES[ending]} ({ending})."
            )
            self.say(message)
            return metrics.Ending(ending, message), done
        self._count_batch_spend(outcome)
        if outcome.fatal is not None:
            ending = outcomes.of_fatal(outcome.fatal)
            message = (
                f"pipeline: stopped: {outcome.fatal.message.rstrip('.')}.\n  The answers folded are kept in "
                f"{self.checkpoint_shown}; fix the cause and run the same command again: exit {outcomes.EXIT_CODES[ending]} "
                f"({ending})."
            )
            self.say(message)
            return metrics.Ending(ending, message), done
        if outcome.open_batches:
            message = (
                f"pipeline: {plural(outcome.open_batches, 'batch', 'batches')} in progress "
                f"({plural(outcome.open_rows, 'request')}); nothing is lost. Run the same command again to collect "
                f"{'it' if outcome.open_batches == 1 else 'them'} (a nightly job: the next night), or add --wait to "
                "wait here: exit 3."
            )
            self.say(message)
            return metrics.Ending("batch_pending", message), done
        failed = {**ledger.failed(), **outcome.failed}
        attempts = ledger.submissions(ledger.entries())
        refused = [Result.failed(why, attempts[key], key) for key, why in failed.items()]
        extra = pl.DataFrame([*outcome.folded, *refused], schema=RESULT_SCHEMA, orient="row")
        self._attempts_before = attempts  # the online fallback's rows had these batch submissions
        return None, pl.concat([done, extra]).unique("request_key", keep="first", maintain_order=True).sort("request_key")

    def _count_batch_spend(self, outcome: Any) -> None:
        """Batches are paid when they finish: their tokens belong to the run that folds them (this run's
        tokens and cost), and what this run submitted to its requests."""
        stats = self.stats
        stats.requests_sent += outcome.submitted_rows
        for r in outcome.folded[self._counted_folded :]:
            stats.prompt_tokens += r.prompt_tokens or 0
            stats.completion_tokens += r.completion_tokens or 0
        self._counted_folded = len(outcome.folded)
        outcome.submitted_rows = 0  # counted once, whichever way the step ended

    def _stopped(self, cause: errors.FatalError, sink: Sink | None, appended: int, started: float) -> metrics.Ending:
        """A fatal answer stopped the sending: write the output (every row, those not sent marked), say
        what was kept and how to go on, and end with the cause's outcome and exit code."""
        outcome: outcomes.Outcome = "spend_ceiling" if self.stats.ceiling_reached else outcomes.of_fatal(cause)
        code = outcomes.EXIT_CODES[outcome]
        if outcome == "output_closed":  # the user's own `| head`: nothing to fix, nothing to advise
            message = f"pipeline: stopped: {cause.message.rstrip('.')}; every answer received is kept in {self.checkpoint_shown}."
            self.say(message)
            return metrics.Ending(outcome, message)
        written = ""
        if sink is not None:
            if (failed := self._write_output(sink)) is not None:
                return failed
            if self.plan.output is not None:
                written = f" The output {describe(self.plan.output)} has every row; those not sent say why in 'error'."
        kept = f"{appended} answers from this run are kept in {self.checkpoint_shown}"
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
        self.say(message)
        if appended:  # what this run did get, for the log
            self.say(summary(self.stats, time.monotonic() - started, None, self.checkpoint_shown))
        return metrics.Ending(outcome, message)

    def _verdict(self) -> metrics.Ending:
        """Exit 0, or 1 when more rows failed than --max-error-rate allows."""
        cfg, stats = self.cfg, self.stats
        rate = stats.errors / stats.rows_done if stats.rows_done else 0.0
        if rate <= cfg.max_error_rate:
            return metrics.Ending("completed")
        not_sent = stats.error_kinds.get("not_sent", 0)
        advice = ["The output has every row, with the reason in 'error'."]
        failed = stats.errors - not_sent
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
        message = (
            f"pipeline: {stats.errors:,} of {plural(stats.rows_done, 'row')} failed ({rate:.1%}), above --max-error-rate "
            f"{cfg.max_error_rate:g}: exit 4 (error_rate). " + " ".join(advice)
        )
        self.say(message)
        return metrics.Ending("error_rate", message)


async def batch_command(cfg: RunConfig, action: str, say: Callable[[str], None]) -> int:
    """`pipeline batch status|cancel CONFIG`: what the job's batches are doing, or cancel them."""
    from pipeline.engines.batch import BatchStep, Ledger, batch_api

    plan = preflight(cfg)
    api_key = cfg.api_key()
    headers, secrets = cfg.request_headers()
    ledger = Ledger(cfg.checkpoint_path)
    if not ledger.path.exists():
        say(f"pipeline: no batches yet for this job ({ledger.path} does not exist).")
        return EXIT_OK
    base_url = str(cfg.setting("base_url"))
    provider = make_provider(cfg.provider, base_url, plan.renderer.spec, api_key, headers, secrets)
    transport = AiohttpTransport(concurrency=4, timeout=BATCH_CALL_TIMEOUT)
    all_secrets = (*secrets, *([api_key] if api_key else []))
    try:
        api = batch_api(cfg.provider, transport, base_url, provider.headers, all_secrets, ledger, max_wait=cfg.max_wait)
        if action == "status":
            step = BatchStep(api, provider, ledger, Checkpoint(cfg.checkpoint_path), max_lines=1, max_attempts=1,
                             system=cfg.system, say=say)  # fmt: skip
            rows_open = 0
            for entry, live in await step.status():
                state = (live or {}).get("status") or entry.status or "not created"
                counts = (live or {}).get("request_counts") or entry.counts
                done = (
                    f"{counts.get('completed', 0):,} done, {counts.get('failed', 0):,} failed of {entry.n:,}"
                    if counts
                    else f"{entry.n:,} requests"
                )
                folded = "collected" if entry.folded else "lost" if entry.lost else "open"
                say(f"  {entry.batch_id or entry.local}: {state} ({done}); {folded}")
                rows_open += entry.n if entry.open else 0
            entries = ledger.entries()
            in_open = {k for e in entries.values() if e.open for k in ledger.keys_of(e.local)}
            refused = ledger.failed()
            answered = read_done(cfg.checkpoint_path)
            waiting: set[str] = set()
            for frame in source.batches(plan.table, cfg.batch_size, cfg.limit):
                p = prepare(frame, plan.renderer, answered)
                waiting.update(
                    k for row, k in enumerate(p.keys)
                    if k is not None and p.skip[row] is None and row not in p.cached and k not in in_open and k not in refused
                )  # fmt: skip
            say(
                f"pipeline: {rows_open:,} requests in open batches, {len(waiting):,} waiting to be submitted, "
                f"{len(refused):,} refused, {answered.height:,} answered; run the job to collect finished batches."
            )
            return EXIT_OK
        with contextlib.closing(Checkpoint(cfg.checkpoint_path)) as checkpoint:
            checkpoint.open()
            checkpoint.load()
            checkpoint.start_journal()
            step = BatchStep(api, provider, ledger, checkpoint, max_lines=1, max_attempts=cfg.max_attempts,
                             system=cfg.system, say=say)  # fmt: skip
            outcome = await step.cancel()
        say(
            f"pipeline: cancelled; {len(outcome.folded):,} answers they had finished are kept in {cfg.checkpoint_path}. "
            "The other rows are pending: the next run submits them again."
        )
        return EXIT_OK
    finally:
        await transport.close()
