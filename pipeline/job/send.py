"""Step 1, send: the engine over the plan, every answer into the checkpoint as it comes.

The online engine (pipeline/engines/online.py) in this process, or the Ray engine
(pipeline/engines/ray.py) when asked for; the embedded model is started only when
some row still needs an answer. Sending ends in one of three ways, and `Sent`
says which: every row has its result; a fatal answer stopped it (`stop`, and
`whole` when the rows left were marked not sent, so the output can still be
written); or the input broke part-way (`ending`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.engines.online import Engine
from pipeline.engines.prepared import Lane, Prepared, prepare, prepare_models
from pipeline.limits import spend
from pipeline.limits.governor import Governor
from pipeline.limits.retry import RetryPolicy
from pipeline.observe import metrics
from pipeline.observe.progress import Progress
from pipeline.observe.stats import RunStats
from pipeline.plan import NOWHERE, Plan
from pipeline.providers import Provider, make_provider
from pipeline.providers.local_model import LocalServer
from pipeline.providers.ratelimit import dialect_for
from pipeline.providers.transport import AiohttpTransport, Transport
from pipeline.rules import worst_out
from pipeline.tables import source
from pipeline.tables.cache import AnswerCache, scope_for
from pipeline.tables.checkpoint import Checkpoint
from pipeline.tables.sink import Sink

if TYPE_CHECKING:
    from pipeline.job.run import Job


@dataclass(frozen=True)
class Sent:
    """How sending ended. `stop`: the fatal answer that ended it early; `whole`: every row has its
    result in the sink all the same (the rows left marked not sent); `ending`: decided already."""

    stop: errors.FatalError | None = None
    whole: bool = True
    appended: int = 0  # answers this run kept in the checkpoint
    ending: metrics.Ending | None = None


async def send(
    job: Job,
    stack: contextlib.AsyncExitStack,
    *,
    checkpoint: Checkpoint,
    sink: Sink,
    done: pl.DataFrame,
    cache: AnswerCache | None,
) -> Sent:
    """Send every row `done` and the cache do not answer; `stack` holds what this opens (the model, the transport)."""
    cfg, stats, renderer, table = job.cfg, job.stats, job.plan.renderer, job.plan.table
    if job.plan.models:
        return await _send_models(job, stack, checkpoint=checkpoint, sink=sink, done=done)
    base_url = cfg.setting("base_url")

    def prep(frame: pl.DataFrame) -> Prepared:
        return prepare(frame, renderer, done, cache)

    if base_url is None and (done.height or cache) and not _anything_to_send(table, cfg, prep):
        job.say("pipeline: every row is already answered; the embedded model is not needed this time")
        base_url = NOWHERE
    if base_url is None:
        job.say("pipeline: starting the embedded model server (SmolLM2-135M-Instruct on 127.0.0.1)")
        base_url = (await stack.enter_async_context(LocalServer())).base_url
    if cfg.engine == "ray" and cfg.mode != "batch":  # batch mode: the provider runs the requests, no actors
        from pipeline.engines import ray_pool as on_ray  # Ray is an optional extra, imported only here

        progress = Progress(stats, enabled=cfg.progress, stream=job.stream, notebook=job.notebook)
        stopped_by = await on_ray.send(job, sink=sink, done=done, base_url=base_url, progress=progress)
        if stopped_by is not None:  # the fatal answer an actor got, its kind kept for the exit code
            return Sent(stop=stopped_by, whole=False, appended=stats.rows_sent)
        return Sent()
    provider = make_provider(cfg.provider, base_url, renderer.spec, job.api_key, job.headers, job.secrets)
    transport = AiohttpTransport(concurrency=int(cfg.setting("concurrency")), timeout=float(cfg.setting("timeout")))
    stack.push_async_callback(transport.close)
    progress = Progress(stats, enabled=cfg.progress, stream=job.stream, notebook=job.notebook)
    engine = build_engine(cfg, job.plan, provider=provider, transport=transport, base_url=base_url, checkpoint=checkpoint,
                          sink=sink, stats=stats, notice=progress.notice, cache=cache)  # fmt: skip
    return await _drive(job, engine, progress, checkpoint, done, prep)


async def _drive(
    job: Job,
    engine: Engine,
    progress: Progress,
    checkpoint: Checkpoint,
    done: pl.DataFrame,
    prep: Callable[[pl.DataFrame], Prepared],
) -> Sent:
    """Run the engine over the input, and say how sending ended."""
    cfg, stats, table = job.cfg, job.stats, job.plan.table
    engine.attempts_before = job.attempts_before
    engine.responses = job.responses
    engine.deliver_partial = bool(done.height) or job.holds_table  # earlier answers, or the API's table to give back
    job.engine = engine
    progress.start()
    sampling = asyncio.get_running_loop().create_task(metrics.sampler(stats, job.clock))  # 1 Hz
    try:
        await engine.run(source.batches(table, cfg.batch_size, cfg.limit), prep)
    except (asyncio.CancelledError, KeyboardInterrupt):
        progress.close(interrupted=True)  # before the message, which would otherwise share the bar's line
        raise
    except errors.FatalError as fatal:  # sending stopped early; every row has its result, the unsent marked
        return Sent(stop=fatal, appended=checkpoint.appended)
    except BaseExceptionGroup as group:
        progress.close()
        user, fatal_group = group.subgroup(errors.UserError), group.subgroup(errors.FatalError)
        if user is not None and stats.requests_sent == 0:
            raise user.exceptions[0] from None
        if user is not None:  # found part-way, after requests went out: not a plain usage error
            message = (
                f"pipeline: stopped: {user.exceptions[0]}\n  {checkpoint.appended} answers from this run are kept in "
                f"{job.checkpoint_shown}; fix the input and run the same command again to resume."
            )
            job.say(message)
            return Sent(ending=metrics.Ending("input_error", message))
        if fatal_group is None:
            raise
        # Nothing to deliver (a stop before any answer), or the writer's own stop (stdout closed).
        stop = fatal_group.exceptions[0]
        assert isinstance(stop, errors.FatalError)
        return Sent(stop=stop, whole=False, appended=checkpoint.appended)
    finally:
        sampling.cancel()
        progress.close()
    return Sent(appended=checkpoint.appended)


async def _send_models(
    job: Job, stack: contextlib.AsyncExitStack, *, checkpoint: Checkpoint, sink: Sink, done: pl.DataFrame
) -> Sent:
    """A run of several models: a lane each (its server, key, limits, prices, answer cache), one engine
    over the input widened to a row per input row and model, one checkpoint, one output."""
    cfg, stats, models = job.cfg, job.stats, job.plan.models
    progress = Progress(stats, enabled=cfg.progress, stream=job.stream, notebook=job.notebook)
    caches: list[AnswerCache | None] = []
    for m in models:  # each model's answers under its own server's scope
        c = m.cfg
        scope = scope_for(c.provider, c.setting("base_url"))
        caches.append(stack.enter_context(AnswerCache(c.cache_dir, scope, max_mb=c.cache_max_mb).open()) if c.cache_dir else None)
    renderers = [m.renderer for m in models]

    def prep(frame: pl.DataFrame) -> Prepared:
        return prepare_models(frame, renderers, done, caches)

    local: str | None = None
    if any(m.cfg.setting("base_url") is None for m in models):
        if (done.height or any(caches)) and not _anything_to_send(job.plan.table, cfg, prep):
            job.say("pipeline: every row is already answered; the embedded model is not needed this time")
            local = NOWHERE
        else:
            job.say("pipeline: starting the embedded model server (SmolLM2-135M-Instruct on 127.0.0.1)")
            local = (await stack.enter_async_context(LocalServer())).base_url
    # One spend ceiling for the whole run: every model's requests count against the same budget.
    budget = spend.budget_for(models[0].cfg)
    if budget is not None:
        budget.max_out = max(worst_out(m.cfg) or 0 for m in models)
    settled = asyncio.Event()
    lanes = []
    for model, (api_key, headers), cache in zip(models, job.access, caches, strict=True):
        c = model.cfg
        base_url = c.setting("base_url") or local
        assert base_url is not None
        own = stats.models.setdefault(model.name, RunStats())
        concurrency = int(c.setting("concurrency"))
        provider = make_provider(c.provider, base_url, model.renderer.spec, api_key, headers, job.secrets)
        transport = AiohttpTransport(concurrency=concurrency, timeout=float(c.setting("timeout")))
        stack.push_async_callback(transport.close)

        def notice(message: str, name: str = model.name) -> None:
            progress.notice(message.replace("pipeline: ", f"pipeline: {name}: ", 1))

        governor = Governor(
            stats=own, concurrency=concurrency, rpm=c.rpm, tpm=c.tpm, adapt=c.adapt, max_wait=c.max_wait,
            dialect=dialect_for(base_url, c.provider), max_tokens=model.renderer.spec.max_tokens or 0, notice=notice,
            spend=budget, settled=settled,
        )  # fmt: skip
        pricing = spend.pricing_for(c, batch=False)
        lanes.append(Lane(provider, transport, governor, concurrency, pricing, cache, own, model.name))
    first = lanes[0]
    engine = Engine(
        provider=first.provider,
        transport=first.transport,
        governor=first.governor,
        policy=RetryPolicy(max_attempts=cfg.max_attempts, max_wait=cfg.max_wait),
        concurrency=first.concurrency,
        checkpoint=checkpoint,
        sink=sink,
        stats=stats,
        system_prompt=cfg.system,
        structured=job.plan.structured,
        layout=job.plan.layout,
        lanes=lanes,
    )
    return await _drive(job, engine, progress, checkpoint, done, prep)


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
        media=plan.renderer.media,
        pricing=spend.pricing_for(cfg, batch=False),  # batch mode's online fallback pays the online price
        layout=plan.layout,
    )


def _anything_to_send(table: source.Table, cfg: RunConfig, prep: Callable[[pl.DataFrame], Prepared]) -> bool:
    """Whether any row still needs a request (a quick pass, used before starting the local model)."""
    for frame in source.batches(table, cfg.batch_size, cfg.limit):
        p = prep(frame)
        if any(
            key is not None and skip is None and row not in p.cached
            for row, (key, skip) in enumerate(zip(p.keys, p.skip, strict=True))
        ):
            return True
    return False
