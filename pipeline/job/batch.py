"""Batch mode's step of a run, and `pipeline batch status|cancel`.

Instead of the online engine, the provider's batch API runs the requests: the step
folds the batches that finished into the checkpoint, submits what is left, and
returns either an ending (batches still running: exit 3; a refusal) or the
answers, so the output is written as an online run writes it. The state machine
and the ledger are pipeline/engines/batch.py; this module wires them to a job.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline import errors, outcomes
from pipeline.config import RunConfig
from pipeline.engines.batch import BatchStep, Ledger, batch_api
from pipeline.engines.batch.ledger import BATCHES
from pipeline.engines.batch.step import Pending
from pipeline.engines.prepared import prepare
from pipeline.limits import spend
from pipeline.observe import metrics
from pipeline.observe.progress import plural
from pipeline.outcomes import EXIT_OK
from pipeline.plan import preflight
from pipeline.providers import make_provider
from pipeline.providers.transport import AiohttpTransport
from pipeline.tables import objectstore, remote_state, source
from pipeline.tables.cache import AnswerCache
from pipeline.tables.checkpoint import STORED_SCHEMA, Checkpoint, Result, read_done

if TYPE_CHECKING:
    from pipeline.job.run import Job

BATCH_CALL_TIMEOUT = 3600.0  # seconds for one call of a batch API: uploads and results files run to 200 MB


async def batch_step(
    job: Job, checkpoint: Checkpoint, done: pl.DataFrame, stack: contextlib.AsyncExitStack, cache: AnswerCache | None
) -> tuple[metrics.Ending | None, pl.DataFrame]:
    """Batch mode's step: fold finished batches, submit what is left. Returns an ending while batches
    are open (exit 3) or after a fatal answer; else None and the answers for the output, refusals
    included as error rows, so the engine below writes the output without sending anything more
    (but, with --fallback online, the lines that failed in a batch)."""
    cfg, renderer, table = job.cfg, job.plan.renderer, job.plan.table
    base_url = str(cfg.setting("base_url"))
    provider = make_provider(cfg.provider, base_url, renderer.spec, job.api_key, job.headers, job.secrets)
    # An upload or a results file of up to 200 MB: not the per-request timeout of an online answer.
    transport = AiohttpTransport(concurrency=4, timeout=BATCH_CALL_TIMEOUT)
    stack.push_async_callback(transport.close)
    ledger = Ledger(job.checkpoint_path)
    step = BatchStep(
        batch_api(cfg.provider, transport, base_url, provider.headers, job.secrets, ledger, max_wait=cfg.max_wait),
        provider,
        ledger,
        checkpoint,
        max_lines=cfg.batch_max_requests,
        max_attempts=cfg.max_attempts,
        resubmit=cfg.fallback == "none",
        system=cfg.system,
        say=job.say,
        cache=cache,
        responses=job.responses,
        pricing=spend.pricing_for(cfg, batch=True),
        forced_tool=job.plan.structured.tool if job.plan.structured else None,
    )

    media = renderer.media

    def pending(exclude: set[str], failed: dict[str, str]) -> Iterator[Pending]:
        for frame in source.batches(table, cfg.batch_size, cfg.limit):
            p = prepare(frame, renderer, done, cache)  # an answer the cache holds is not paid for again
            for row, key in enumerate(p.keys):
                if key is None or p.skip[row] is not None or row in p.cached or key in exclude or key in failed:
                    continue
                prompt = p.prompts[row]
                assert prompt is not None
                described = p.media[row] if p.media is not None else None
                # A row's images are read again as its line is written: their bytes go into the request file as base64.
                load = partial(media.load, described, frame, row) if media is not None and described is not None else None
                yield key, prompt, p.extra[row], load

    try:
        outcome = await step.run(pending, cfg.wait)
    except errors.RequestError as exc:  # the batch endpoints refused, or stayed unreachable past --max-wait
        _count_batch_spend(job, step.outcome)
        open_entries = [e for e in ledger.entries().values() if e.open and e.batch_id is not None]
        if open_entries and isinstance(exc, errors.TransientError | errors.WaitTooLong):
            # The batches themselves are fine and run on without us: the next invocation collects them.
            message = (
                f"pipeline: the batch API at {base_url} did not answer well ({exc.message}).\n  "
                f"{plural(len(open_entries), 'batch', 'batches')} ({plural(sum(e.n for e in open_entries), 'request')}) "
                f"are open and recorded in {ledger.folder}; nothing is lost. Run the same command again to collect "
                "them: exit 3."
            )
            job.say(message)
            return metrics.Ending("batch_pending", message), done
        ending: outcomes.Outcome = outcomes.of_fatal(exc) if isinstance(exc, errors.FatalError) else "requests_refused"
        message = (
            f"pipeline: stopped: the batch API at {base_url} answered {exc.message}.\n  Nothing submitted in this "
            f"run is lost: the ledger in {ledger.folder} records it; run the same command again once this is fixed: "
            f"exit {outcomes.EXIT_CODES[ending]} ({ending})."
        )
        job.say(message)
        return metrics.Ending(ending, message), done
    _count_batch_spend(job, outcome)
    if outcome.fatal is not None:
        ending = outcomes.of_fatal(outcome.fatal)
        message = (
            f"pipeline: stopped: {outcome.fatal.message.rstrip('.')}.\n  The answers folded are kept in "
            f"{job.checkpoint_shown}; fix the cause and run the same command again: exit {outcomes.EXIT_CODES[ending]} "
            f"({ending})."
        )
        job.say(message)
        return metrics.Ending(ending, message), done
    if outcome.open_batches:
        message = (
            f"pipeline: {plural(outcome.open_batches, 'batch', 'batches')} in progress "
            f"({plural(outcome.open_rows, 'request')}); nothing is lost. Run the same command again to collect "
            f"{'it' if outcome.open_batches == 1 else 'them'} (a nightly job: the next night), or add --wait to "
            "wait here: exit 3."
        )
        job.say(message)
        return metrics.Ending("batch_pending", message), done
    failed = {**ledger.failed(), **outcome.failed}
    attempts = ledger.submissions(ledger.entries())
    refused = [Result.failed(why, attempts[key], key) for key, why in failed.items()]
    extra = pl.DataFrame([*outcome.folded, *refused], schema=STORED_SCHEMA, orient="row")
    job.attempts_before = attempts  # the online fallback's rows had these batch submissions
    return None, pl.concat([done, extra]).unique("request_key", keep="first", maintain_order=True).sort("request_key")


def _count_batch_spend(job: Job, outcome: Any) -> None:
    """Batches are paid when they finish: their tokens belong to the run that folds them (this run's
    tokens and cost), and what this run submitted to its requests."""
    stats = job.stats
    stats.requests_sent += outcome.submitted_rows
    for r in outcome.folded[job.counted_folded :]:
        stats.prompt_tokens += r.prompt_tokens or 0
        stats.completion_tokens += r.completion_tokens or 0
        stats.spent_tokens_in += r.prompt_tokens or 0
        stats.spent_tokens_out += r.completion_tokens or 0
        stats.spent_usd += r.cost_usd or 0.0
    job.counted_folded = len(outcome.folded)
    outcome.submitted_rows = 0  # counted once, whichever way the step ended


def refuse_open_batches(job: Job) -> None:
    """An online run on an output whose batches are still open would send their rows again, and pay twice."""
    ledger = Ledger(job.checkpoint_path)
    if not ledger.path.exists():
        return
    waiting = sum(e.n for e in ledger.entries().values() if e.open)
    if waiting:
        raise errors.ConfigError(
            f"{plural(waiting, 'request')} of this output sit in open batches ({ledger.path}). Run with --mode batch "
            "to collect them, or `pipeline batch cancel ... --mode batch` first: an online run now would send those "
            "rows again and pay twice."
        )


async def batch_command(cfg: RunConfig, action: str, say: Callable[[str], None]) -> int:
    """`pipeline batch status|cancel CONFIG`: what the job's batches are doing, or cancel them."""
    plan = preflight(cfg)
    api_key = cfg.api_key()
    headers, secrets = cfg.request_headers()
    with _job_state(cfg, action, say) as (ledger, checkpoint):
        if not ledger.path.exists():
            where = f"{cfg.checkpoint_remote}/{BATCHES}/" if cfg.checkpoint_remote is not None else ledger.path
            say(f"pipeline: no batches yet for this job ({where} does not exist).")
            return EXIT_OK
        base_url = str(cfg.setting("base_url"))
        provider = make_provider(cfg.provider, base_url, plan.renderer.spec, api_key, headers, secrets)
        transport = AiohttpTransport(concurrency=4, timeout=BATCH_CALL_TIMEOUT)
        all_secrets = (*secrets, *([api_key] if api_key else []))
        try:
            api = batch_api(cfg.provider, transport, base_url, provider.headers, all_secrets, ledger, max_wait=cfg.max_wait)
            if action == "status":
                return await _status(cfg, plan, api, provider, ledger, say)
            assert checkpoint is not None
            checkpoint.start_journal()
            step = BatchStep(api, provider, ledger, checkpoint, max_lines=1, max_attempts=cfg.max_attempts,
                             system=cfg.system, say=say)  # fmt: skip
            outcome = await step.cancel()
        finally:
            await transport.close()
    say(
        f"pipeline: cancelled; {len(outcome.folded):,} answers they had finished are kept in {checkpoint}. "
        "The other rows are pending: the next run submits them again."
    )
    return EXIT_OK


@contextlib.contextmanager
def _job_state(cfg: RunConfig, action: str, say: Callable[[str], None]) -> Iterator[tuple[Ledger, Checkpoint | None]]:
    """The job's ledger, and for `cancel` its checkpoint, opened (held: no run of the job goes on meanwhile).
    A job whose checkpoint is in a bucket has its ledger there: `status` reads a copy of it, without the
    job's lock (it changes nothing, and may look while a run goes on); `cancel` holds the job and ships
    what it changes back to the bucket on the way out."""
    remote = cfg.checkpoint_remote
    if action == "status":
        if remote is None:
            yield Ledger(cfg.checkpoint_path), None
            return
        with tempfile.TemporaryDirectory(prefix="pipeline-batch-status-") as copy:
            try:
                remote_state.pull_ledger(remote, Path(copy))
            except objectstore.StoreError as exc:
                raise errors.InputError(f"Cannot read the batches of {remote}/: {exc}") from None
            yield Ledger(Path(copy)), None
        return
    if remote is None and not Ledger(cfg.checkpoint_path).path.exists():
        yield Ledger(cfg.checkpoint_path), None  # nothing to cancel, and nothing created
        return
    checkpoint = remote_state.open_checkpoint(cfg.checkpoint_path, remote, say)
    checkpoint.open()
    try:
        checkpoint.load()  # from a bucket: its answers, and the ledger into the working folder
        yield Ledger(cfg.checkpoint_path), checkpoint
    finally:
        checkpoint.close(discard_unused=True)


async def _status(cfg: RunConfig, plan: Any, api: Any, provider: Any, ledger: Ledger, say: Callable[[str], None]) -> int:
    step = BatchStep(api, provider, ledger, Checkpoint(ledger.folder.parent), max_lines=1, max_attempts=1,
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
    remote = cfg.checkpoint_remote
    answered = remote_state.read_done(remote) if remote is not None else read_done(cfg.checkpoint_path)
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
