"""One `pipeline run`: check everything, then send, then report.

Every check that can fail because of the user (config, files, columns, output
folder, API key, local model installed) runs before the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import polars as pl

from pipeline import errors, metrics, source, spend
from pipeline.checkpoint import Checkpoint
from pipeline.config import RunConfig
from pipeline.engine import Engine, prepare
from pipeline.governor import Governor
from pipeline.local_model import LocalServer, check_installed
from pipeline.progress import Progress, plural, summary
from pipeline.prompts import Renderer, RequestSpec, parse_template
from pipeline.providers import Provider, make_provider
from pipeline.providers.ratelimit import dialect_for
from pipeline.retry import RetryPolicy
from pipeline.sink import Sink, check_output, describe, open_sink, result_frame
from pipeline.stats import RunStats
from pipeline.structured import Structured, load_schema
from pipeline.transport import AiohttpTransport, Transport

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # and 2, bad usage: UserError, mapped by the CLI
NOWHERE = "http://127.0.0.1:9/v1"  # stands in for a server that no request will reach


def structured_for(cfg: RunConfig) -> Structured | None:
    if cfg.schema_ is None:
        return None
    layout = cfg.schema_output
    return Structured(
        schema=load_schema(cfg.schema_), layout=layout, name=cfg.schema_column if layout == "struct" else cfg.schema_prefix
    )


def renderer_for(cfg: RunConfig, structured: Structured | None = None) -> Renderer:
    model = cfg.setting("model")
    if not model:
        raise errors.ConfigError(
            f"No model given. The {cfg.provider} provider needs one: set 'model' in the config or pass --model."
        )
    spec = RequestSpec(
        model=model,
        system=cfg.system,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        params=dict(cfg.params),
        conversation=cfg.messages_column is not None,
        schema=structured.schema if structured else None,
        json_mode=cfg.setting("json_mode"),
    )
    template = parse_template(cfg.prompt) if cfg.prompt is not None else None
    return Renderer(
        spec=spec,
        template=template,
        prompt_column=cfg.prompt_column,
        id_column=cfg.id_column,
        messages_column=cfg.messages_column,
        param_columns=dict(cfg.param_columns),
        null_as_empty=cfg.null_as_empty,
        list_join=cfg.list_join,
    )


def _anything_to_send(table: source.Table, cfg: RunConfig, renderer: Renderer, done: pl.DataFrame) -> bool:
    """Whether any row still needs a request (a quick pass, used before starting the local model)."""
    for frame in source.batches(table, cfg.batch_size, cfg.limit):
        p = prepare(frame, renderer, done)
        if any(
            key is not None and skip is None and row not in p.cached
            for row, (key, skip) in enumerate(zip(p.keys, p.skip, strict=True))
        ):
            return True
    return False


def run_job(cfg: RunConfig, err: TextIO | None = None) -> int:
    """Run the job described by `cfg`; return the process exit code. Raises UserError for exit 2.

    SIGTERM is handled like Ctrl-C for the whole run (a scheduler's kill gets
    the same flush and exit 130), not only while the event loop runs.
    """
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run_job(cfg, err or sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Plan:
    """What `run` and `estimate` both establish before anything is sent."""

    structured: Structured | None
    renderer: Renderer
    table: source.Table
    output: Path | None  # None for a job that writes nothing (estimate)


def preflight(cfg: RunConfig, *, writes: bool = True) -> Plan:
    """Every check of the config, the input and (when the job `writes`) the output; raises UserError (exit 2).

    `pipeline estimate` writes nothing, so it needs no output; `run` does."""
    if writes and cfg.output is None:
        raise errors.ConfigError(
            "'output' is required: set it in the config or pass --output (a .parquet, .csv or .jsonl file, or - for stdout)."
        )
    structured = structured_for(cfg)
    renderer = renderer_for(cfg, structured)
    table = source.open_table(cfg.input, encoding=cfg.encoding, separator=cfg.separator, headerless=renderer.needed_columns())
    renderer.check(table.schema, table.label, hint=source.separator_hint(table))
    output = Path(cfg.output) if cfg.output is not None else None
    if output is not None:
        extracted = structured.output_columns() if structured else []
        check_output(output, table.files, list(table.schema.names()), extracted, cfg.result_prefix)
    return Plan(structured=structured, renderer=renderer, table=table, output=output)


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
    )


def _empty_run(plan: Plan, output: Path, result_prefix: str, clock: metrics.Clock, err: TextIO) -> metrics.Ending:
    """No rows (a scheduled job's empty partition): an empty output with every column, and success.
    Nothing is sent, no model is started and no checkpoint is made: there is nothing to resume."""
    results = result_frame([])
    sink = open_sink(output, result_prefix)
    try:
        sink.write(pl.DataFrame(schema=plan.table.schema), plan.structured.add_columns(results) if plan.structured else results)
        sink.commit()
    finally:
        sink.abort()  # no-op after commit
    message = (
        f"pipeline: 0 rows in {clock.elapsed():.1f} s: the input {plan.table.label} has no rows, "
        f"so nothing was sent\n  output: {describe(output)}"
    )
    print(message, file=err)
    return metrics.Ending(EXIT_OK, "empty_input", message)


def _run_job(cfg: RunConfig, err: TextIO) -> int:
    """Check, send, and on every way out but a usage error (exit 2: nothing ran) write the metrics file."""
    clock = metrics.Clock.now()
    plan = preflight(cfg)
    output = plan.output
    assert output is not None  # preflight refuses a run without one
    api_key = cfg.api_key()
    headers, secrets = cfg.request_headers()  # before anything starts: a variable unset is exit 2
    if cfg.provider == "local" and cfg.setting("base_url") is None:
        check_installed()
    stats = RunStats(total_rows=source.count_rows(plan.table, cfg.limit))
    run = _Run(cfg, plan, output, stats, clock, err, api_key, headers, secrets)
    try:
        ending = _empty_run(plan, output, cfg.result_prefix, clock, err) if stats.total_rows == 0 else run.send()
    except errors.UserError:  # exit 2, found before anything was sent: nothing ran, so there is nothing to record
        raise
    except BaseException as exc:  # a bug: still leave the file a CI job looks for, then let the traceback out
        run.record(metrics.Ending(EXIT_FAILED, "crashed", f"{type(exc).__name__}: {exc}"))
        raise
    run.record(ending)
    run.report(ending)
    return ending.exit_code


class _Run:
    """One run past the checks: the checkpoint, the sink and the engine, and how each way out is reported."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: Plan,
        output: Path,
        stats: RunStats,
        clock: metrics.Clock,
        err: TextIO,
        api_key: str | None,
        headers: dict[str, str],
        secrets: tuple[str, ...],
    ) -> None:
        self.cfg, self.plan, self.output, self.stats, self.clock, self.err = cfg, plan, output, stats, clock, err
        self.api_key, self.headers, self.secrets = api_key, headers, secrets
        self.earlier_tokens: tuple[int, int] | None = None  # (prompt, completion) the checkpoint held, for the cost

    def say(self, message: str) -> str:
        print(message, file=self.err)
        return message

    def record(self, ending: metrics.Ending) -> None:
        """Write the metrics file. A failure to write it is reported, never turned into another exit code:
        the run's own outcome is what the exit code says."""
        path = metrics.default_path(self.cfg)
        data = metrics.build(self.cfg, self.stats, ending, self.clock, earlier_tokens=self.earlier_tokens)
        try:
            metrics.write(path, metrics.dumps(data, (*self.secrets, *([self.api_key] if self.api_key else []))))
        except OSError as exc:
            print(f"pipeline: could not write the metrics file {path}: {exc.strerror or exc}", file=self.err)

    def report(self, ending: metrics.Ending) -> None:
        """Draw the HTML report beside the output (after the metrics file, which it reads). Not after an
        interrupt (whoever pressed Ctrl-C wants the prompt back; `pipeline report` draws it later), nor for
        stdout, which leaves no output to read. A report that cannot be drawn is said, never an exit code."""
        path = metrics.report_path(self.cfg)
        if path is None or ending.outcome == "interrupted" or self.cfg.output == "-":
            return
        if not self.output.exists() and not self.cfg.checkpoint_path.exists():
            return  # stopped before any answer: nothing to draw
        from pipeline.report import report_after_run  # altair and vl-convert: only once the run is over

        failed = report_after_run(str(self.output), str(metrics.default_path(self.cfg)), str(self.cfg.checkpoint_path), str(path))
        print(f"pipeline: {failed}" if failed else f"  report: {path}", file=self.err)

    def send(self) -> metrics.Ending:
        cfg, stats, err, output = self.cfg, self.stats, self.err, self.output
        renderer, table = self.plan.renderer, self.plan.table
        base_url = cfg.setting("base_url")
        checkpoint = Checkpoint(cfg.checkpoint_path)
        checkpoint.open()
        sink = open_sink(output, cfg.result_prefix)
        started = time.monotonic()
        try:
            done = checkpoint.load()
            if done.height:
                self.earlier_tokens = (int(done["prompt_tokens"].sum() or 0), int(done["completion_tokens"].sum() or 0))
            if cfg.fresh:
                done = done.clear()
            elif done.height:
                print(
                    f"pipeline: resuming: the checkpoint {cfg.checkpoint_path} holds {done.height} answered requests; "
                    "rows that match them are not sent again",
                    file=err,
                )
            checkpoint.start_journal()
            with contextlib.ExitStack() as stack:
                if base_url is None and done.height and not _anything_to_send(table, cfg, renderer, done):
                    print("pipeline: every row is already answered; the embedded model is not needed this time", file=err)
                    base_url = NOWHERE
                if base_url is None:
                    print("pipeline: starting the embedded model server (SmolLM2-135M-Instruct on 127.0.0.1)", file=err)
                    base_url = stack.enter_context(LocalServer()).base_url
                provider = make_provider(cfg.provider, base_url, renderer.spec, self.api_key, self.headers, self.secrets)
                concurrency = int(cfg.setting("concurrency"))
                timeout = float(cfg.setting("timeout"))

                async def main() -> None:
                    loop = asyncio.get_running_loop()
                    task = asyncio.current_task()
                    assert task is not None
                    loop.add_signal_handler(signal.SIGTERM, task.cancel)
                    transport = AiohttpTransport(concurrency=concurrency, timeout=timeout)
                    progress = Progress(stats, enabled=cfg.progress, stream=err)
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
                    )
                    progress.start()
                    sampling = loop.create_task(metrics.sampler(stats, self.clock))  # 1 Hz, beside the bar's timer
                    try:
                        await engine.run(source.batches(table, cfg.batch_size, cfg.limit), lambda f: prepare(f, renderer, done))
                    except (asyncio.CancelledError, KeyboardInterrupt):
                        progress.close(interrupted=True)
                        raise
                    finally:
                        sampling.cancel()
                        progress.close()
                        await transport.close()

                try:
                    asyncio.run(main())
                except BaseExceptionGroup as group:
                    user, fatal = group.subgroup(errors.UserError), group.subgroup(errors.FatalError)
                    if user is not None and stats.requests_sent == 0:
                        raise user.exceptions[0] from None
                    if user is not None:  # found part-way, after requests went out: not a plain usage error
                        sink.abort()
                        return metrics.Ending(
                            EXIT_FAILED,
                            "stopped",
                            self.say(
                                f"pipeline: stopped: {user.exceptions[0]}\n  {checkpoint.appended} answers from this run are kept in "
                                f"{cfg.checkpoint_path}; fix the input and run the same command again to resume."
                            ),
                        )
                    if fatal is None:
                        raise
                    sink.abort()
                    return self._stopped(fatal.exceptions[0], checkpoint.appended, started)
                finally:
                    # Closing the loop resets SIGTERM to the default (die at once); keep it an interrupt.
                    signal.signal(signal.SIGTERM, signal.default_int_handler)
            sink.commit()
        except (KeyboardInterrupt, asyncio.CancelledError):
            sink.abort()
            message = self.say(
                f"\npipeline: interrupted. {stats.rows_done} rows were finished; every answer received is saved in "
                f"{cfg.checkpoint_path}. Run the same command again to resume."
            )
            return metrics.Ending(EXIT_INTERRUPTED, "interrupted", message.strip())
        finally:
            sink.abort()  # no-op after commit
            checkpoint.close(discard_unused=True)

        wall = time.monotonic() - started
        spend.note_run(stats, cfg, done)
        print(summary(stats, wall, describe(output), str(cfg.checkpoint_path)), file=err)
        if stats.ceiling_reached:  # before the error rate: the rows not sent are errors, for the reason said here
            return metrics.Ending(EXIT_FAILED, "spend_ceiling", self.say(spend.stop_message(stats, cfg)))
        return self._verdict()

    def _stopped(self, cause: BaseException, appended: int, started: float) -> metrics.Ending:
        """A fatal answer stopped the run: what was kept and how to go on."""
        cfg = self.cfg
        kept = f"{appended} answers from this run are kept in {cfg.checkpoint_path}"
        if isinstance(cause, errors.WaitTooLong):  # its message already says when to come back
            then = f"  Nothing more was sent; the requests in flight came back. {kept}; rows answered are not sent again."
        elif not appended:
            then = "  Nothing was answered, so nothing was kept; fix the cause and run again."
        else:
            then = (
                f"  Every further request would fail the same way, so nothing more was sent. {kept}; "
                "fix the cause and run the same command again to resume."
            )
        message = self.say(f"pipeline: stopped: {str(cause).rstrip('.')}.\n{then}")
        if appended:  # what this run did get, for the log
            print(summary(self.stats, time.monotonic() - started, None, str(cfg.checkpoint_path)), file=self.err)
        return metrics.Ending(EXIT_FAILED, self._stop_kind(), message)

    def _stop_kind(self) -> metrics.Outcome:
        return "spend_ceiling" if self.stats.ceiling_reached else "stopped"

    def _verdict(self) -> metrics.Ending:
        """Exit 0, or 1 when more rows failed than --max-error-rate allows."""
        cfg, stats = self.cfg, self.stats
        rate = stats.errors / stats.rows_done if stats.rows_done else 0.0
        if rate <= cfg.max_error_rate:
            return metrics.Ending(EXIT_OK, "completed")
        not_sent = stats.error_kinds.get("not_sent", 0)
        advice = ["The output has every row, with the reason in 'error'."]
        if stats.errors > not_sent:
            n = stats.errors - not_sent
            advice.append(f"Run the same command again to retry the {plural(n, 'row')} whose requests failed.")
        if not_sent:
            advice.append(
                f"{plural(not_sent, 'row was', 'rows were')} not sent because a prompt cell is null or empty: a re-run "
                "cannot fix that; fill the cells in, give the placeholder a default ({notes:} or {notes:n/a}), pass "
                "--null-as-empty, or allow such rows with --max-error-rate."
            )
        message = self.say(
            f"pipeline: {stats.errors:,} of {plural(stats.rows_done, 'row')} failed ({rate:.1%}), above --max-error-rate "
            f"{cfg.max_error_rate:g}: exit 1. " + " ".join(advice)
        )
        return metrics.Ending(EXIT_FAILED, "error_rate", message)
