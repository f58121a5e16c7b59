"""Tables that outgrow one machine: the same engine inside Ray Data actors, with one rate budget.

    pipeline run CONFIG --engine ray [--ray-address auto|ray://HOST:10001] [--workers N]
    out = pipeline.ray.complete(ds, prompt="Summarise: {text}", base_url=..., model=...)

The dataset goes through two stages:

1. `_prepare` (Ray tasks): render each block's requests and look their keys up in
   the checkpoint's answers, which sit once in the object store as sorted 64-bit
   keys and the rows in that order (a binary search per block, zero-copy reads:
   memory per task is the block's, not the checkpoint's). Answered rows leave
   this stage complete, so no actor sends them.
2. `_Sender` (an actor pool): one engine per actor, the local engine's code,
   with one aiohttp session, one governor, one memory of recent answers and one
   checkpoint journal reused across blocks (Ray runs one block at a time per
   actor). Every answer is appended to
   the actor's journal in the shared checkpoint folder as it comes, so a killed
   driver or actor loses only what was in flight. A row that fails is a row with
   status error, never an exception (one would abort the whole dataset).

One `_Coordinator` actor per run holds what is shared: the rate budget
(`pipeline.limits.lease`: send times leased 50 ms at a time), the stop word after a
fatal answer, and each actor's counters for the driver's progress and summary.

Only this module imports ray, and only when asked for; Ray is the optional
`ray` extra (`pip install -e '.[ray]'` in a checkout).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.engines.online import Engine, Prepared
from pipeline.limits.governor import Governor
from pipeline.limits.lease import ELSEWHERE, Lease, LeaseClient, SlotBudget
from pipeline.limits.retry import RetryPolicy
from pipeline.observe import metrics
from pipeline.observe.progress import plural
from pipeline.observe.stats import RunStats
from pipeline.providers import make_provider
from pipeline.providers.ratelimit import dialect_for
from pipeline.providers.transport import AiohttpTransport
from pipeline.requests.prompts import EST_TOKENS, EXTRA, KEY, PROMPT, SKIP_REASON, Renderer
from pipeline.requests.structured import Structured
from pipeline.tables.checkpoint import RESULT_COLUMNS, RESULT_SCHEMA, Checkpoint, Result, read_journal
from pipeline.tables.sink import Sink, result_frame

if TYPE_CHECKING:
    from pipeline.job import Job

# From a checkout: the published package named "pipeline" is another project, so no install by name.
INSTALL = "pip install -e '.[ray]' in the pipeline checkout (make setup there installs it too)"
RESULT = "__result."  # result columns inside the dataset, apart from any input column of the same name
PREPARED = (PROMPT, EXTRA, SKIP_REASON, KEY, EST_TOKENS)
MAX_WORKERS_DEFAULT = 8
REPORT_EVERY = 0.5  # seconds between an actor's counters sent to the coordinator
STOP_WAIT = 15.0  # seconds an interrupted run waits for the actors to hand back their blocks
JOURNAL_PREFIX = "journal-"
STOPPED = "not sent: the run stopped: "  # the error of rows a stop left unsent (the driver ends the run on seeing it)
# Counters summed over the actors for the driver's stats.
SUMMED = (
    "rows_done", "ok", "errors", "from_checkpoint", "shared", "rows_sent", "requests_sent", "retries",
    "prompt_tokens", "completion_tokens", "estimated_rows", "limited_rate", "limited_concurrency",
    "breaker_opened", "concurrency", "concurrency_ceiling", "spent_tokens_in", "spent_tokens_out", "spent_usd",
)  # fmt: skip


def import_ray() -> Any:
    """Ray, or a usage error (exit 2) that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise errors.ConfigError(
            f"--engine ray needs Ray, an optional extra of pipeline: {INSTALL}. Or run without --engine ray (the local engine)."
        ) from None
    return ray


# ---- what every stage is given ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What the stages need to render and send; pickled to every worker. No key: actors read it from
    the environment variable the config names (set it on every node of a cluster)."""

    cfg: RunConfig
    renderer: Renderer
    structured: Structured | None
    base_url: str
    checkpoint: str
    concurrency: int  # per actor
    run_id: str


class Answered:
    """The checkpoint's answers for per-block look-ups: 64-bit keys, sorted, and the rows in that order."""

    def __init__(self, done: pl.DataFrame) -> None:
        compact = _compact(done.get_column("request_key"))
        order = np.argsort(compact, kind="stable")
        self.keys = compact[order]
        self.table = done.to_arrow().take(pa.array(order))

    def find(self, keys: pl.Series) -> tuple[np.ndarray[Any, Any], pa.Table]:
        """The rows of `keys` answered, and their results, in row order."""
        if len(self.keys) == 0:
            return np.zeros(0, dtype=np.int64), self.table.slice(0, 0)
        idx = np.searchsorted(self.keys, _compact(keys)).clip(0, len(self.keys) - 1)
        candidates = pl.from_arrow(self.table.column("request_key").take(pa.array(idx)))
        assert isinstance(candidates, pl.Series)
        hit = (candidates == keys).fill_null(False).to_numpy()  # the whole key: 64 bits only narrow the search
        return np.flatnonzero(hit), self.table.take(pa.array(idx[hit]))


def _compact(keys: pl.Series) -> np.ndarray[Any, Any]:
    """A request key's first 64 bits (keys are 128-bit hashes in hex); 0 for a row with none."""
    return keys.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).fill_null(0).to_numpy()


def _prepare(block: pa.Table, spec: Spec, answered: Any) -> pa.Table:
    """Stage 1, a Ray task per block: the input plus its rendered requests, and the results of rows the
    checkpoint has answered (or that cannot be sent), so the actors only see what is left to send."""
    import ray

    if isinstance(answered, ray.ObjectRef):
        answered = ray.get(answered)
    frame = pl.from_arrow(block)
    assert isinstance(frame, pl.DataFrame)
    rendered = spec.renderer.render(frame)
    rows, found = answered.find(rendered.get_column(KEY))
    results = pl.DataFrame(schema=RESULT_SCHEMA)
    n = frame.height
    full = pl.DataFrame({"__row": np.arange(n)})
    if len(rows):
        hits = pl.from_arrow(found)
        assert isinstance(hits, pl.DataFrame)
        results = hits.with_columns(pl.Series("__row", rows))
        full = full.join(results, on="__row", how="left", maintain_order="left")
    else:
        full = full.with_columns([pl.lit(None, dtype=dtype).alias(name) for name, dtype in RESULT_SCHEMA.items()])
    out = pl.concat(
        [frame, rendered.select(PREPARED), full.select(RESULT_COLUMNS).rename({c: RESULT + c for c in RESULT_COLUMNS})],
        how="horizontal",
    )
    return out.to_arrow()


# ---- the coordinator ------------------------------------------------------------------------------


class _Coordinator:
    """One per run (a Ray actor, no CPU): the rate budget, the stop word, the actors' counters."""

    def __init__(self, rpm: float | None, tpm: float | None, adapt: bool) -> None:
        self.budget = SlotBudget(user_rpm=rpm, user_tpm=tpm, adapt=adapt)
        self.lock = asyncio.Lock()
        self.workers: dict[str, dict[str, Any]] = {}
        self.quiet = asyncio.Event()  # stopped, and no actor has a request in flight

    async def lease(self, want: int, tokens_each: float) -> Lease:
        async with self.lock:  # first come, first served
            while True:
                lease, wait = self.budget.grant(time.monotonic(), want, tokens_each)
                if lease is not None:
                    return lease
                await asyncio.sleep(wait)

    async def announce(self, requests_per_s: float | None, tokens_per_min: float | None) -> None:
        self.budget.announced(requests_per_s, tokens_per_min)

    async def rate_limited(self, retry_after: float | None) -> None:
        self.budget.rate_limited(time.monotonic(), retry_after)

    async def stop(self, reason: str) -> None:
        if self.budget.stopped is None:
            self.budget.stopped = reason

    async def report(self, worker: str, counters: dict[str, Any]) -> tuple[bool, str | None]:
        """An actor's counters; answers whether leases are needed and whether the run was stopped."""
        now = time.monotonic()
        before = self.workers.get(worker, {}).get("requests_sent", 0)
        self.workers[worker] = counters
        if not self.budget.limited():
            self.budget.measured(now, counters["requests_sent"] - before)
        self.budget.tick(now)
        if self.budget.stopped is not None and not any(c["in_flight"] for c in self.workers.values()):
            self.quiet.set()
        return self.budget.limited(), self.budget.stopped

    async def drained(self, seconds: float) -> bool:
        """After a stop: wait until every actor has its requests in flight back (answered, journaled)."""
        try:
            await asyncio.wait_for(self.quiet.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def totals(self) -> dict[str, Any]:
        total: dict[str, Any] = {name: 0 for name in SUMMED}
        kinds: Counter[str] = Counter()
        latency: Counter[int] = Counter()
        for c in self.workers.values():
            for name in SUMMED:
                total[name] += c[name]
            kinds.update(c["error_kinds"])
            latency.update({int(k): v for k, v in c["latency"].items()})
        rate = self.budget.rate()
        total.update(
            error_kinds=dict(kinds),
            latency=dict(latency),
            pace_rpm=None if rate is None else rate * 60,
            pace_source=self.budget.source(),
            pace_tpm=self.budget.tpm(),
            stopped=self.budget.stopped,
        )
        return total


def _counters(stats: RunStats, in_flight: int) -> dict[str, Any]:
    c: dict[str, Any] = {name: getattr(stats, name) for name in SUMMED}
    c["in_flight"] = in_flight
    c["error_kinds"] = dict(stats.error_kinds)
    c["latency"] = dict(stats._latency)
    return c


# ---- the actors -----------------------------------------------------------------------------------


class _ActorPace:
    """The governor's shared budget inside an actor: leases from the coordinator, learning sent to it."""

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator
        self._lease = LeaseClient(self._ask)
        self._announced: tuple[float | None, float | None] = (None, None)

    async def _ask(self, want: int, tokens_each: float) -> Lease:
        lease: Lease = await self._coordinator.lease.remote(want, tokens_each)
        return lease

    @property
    def limited(self) -> bool:
        return self._lease.limited

    @property
    def stopped(self) -> str | None:
        return self._lease.stopped

    def heard(self, limited: bool, stopped: str | None) -> None:
        self._lease.relimit(limited)
        if stopped is not None:
            self._lease.stopped = stopped

    async def take(self, tokens: int) -> bool:
        return await self._lease.take(tokens)

    def announce(self, requests_per_s: float | None, tokens_per_min: float | None) -> None:
        if (requests_per_s or tokens_per_min) and (requests_per_s, tokens_per_min) != self._announced:
            self._announced = (requests_per_s, tokens_per_min)
            self._coordinator.announce.remote(requests_per_s, tokens_per_min)
            self._lease.relimit(True)

    def rate_limited(self, retry_after: float | None) -> None:
        self._coordinator.rate_limited.remote(retry_after)
        self._lease.relimit(True)


class _Results(Sink):
    """The actor's sink: keeps each block's result columns to hand back to Ray."""

    def __init__(self) -> None:
        super().__init__()
        self.results: pl.DataFrame | None = None

    def write(self, inputs: pl.DataFrame, results: pl.DataFrame) -> None:
        self.results = results


class _Sender:
    """Stage 2, one per actor: the local engine over each block's rows that are left to send."""

    def __init__(self, spec: Spec, coordinator: Any) -> None:
        self.spec, self.coordinator = spec, coordinator
        self.worker = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._started: asyncio.Future[None] | None = None
        self._recovered: dict[str, Result] = {}
        self._seen_journals: set[str] = set()
        self._stopped: str | None = None  # a fatal answer (here or elsewhere) stopped the run
        self._answered: OrderedDict[str, Result] = OrderedDict()  # recent answers, shared by this actor's blocks

    async def _start(self) -> None:
        spec, cfg = self.spec, self.spec.cfg
        # From this worker's environment: the key never travels through Ray (its runtime_env would write it
        # to a log file). A Ray started here has the driver's environment; a cluster's nodes need it set.
        try:
            api_key = cfg.api_key()
            headers, secrets = cfg.request_headers()
        except errors.ConfigError as exc:
            raise errors.FatalError(
                f"on the Ray node {os.uname().nodename}: {exc} Set it on every node of the cluster", kind="config"
            ) from None
        secrets = (*secrets, *([api_key] if api_key else []))
        self.stats = RunStats()
        self.provider = make_provider(cfg.provider, spec.base_url, spec.renderer.spec, api_key, headers, secrets)
        self.transport = AiohttpTransport(concurrency=spec.concurrency, timeout=float(cfg.setting("timeout")))
        folder = Path(spec.checkpoint)
        # The driver holds the folder's lock; each actor appends to a journal of its own, locked while it lives (see _recover).
        self.checkpoint = Checkpoint(folder)
        self._seen_journals.add(self.checkpoint.start_journal(tag=spec.run_id, hold=True))
        self.pace = _ActorPace(self.coordinator)
        self.governor = Governor(
            stats=self.stats,
            concurrency=spec.concurrency,
            adapt=cfg.adapt,
            max_wait=cfg.max_wait,
            dialect=dialect_for(spec.base_url, cfg.provider),
            max_tokens=spec.renderer.spec.max_tokens or 0,
            shared=self.pace,
        )
        self.policy = RetryPolicy(max_attempts=cfg.max_attempts, max_wait=cfg.max_wait)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report(self) -> None:
        limited, stopped = await self.coordinator.report.remote(self.worker, _counters(self.stats, self.governor.in_flight))
        self.pace.heard(limited, stopped)
        if stopped is not None:
            self.governor.block(errors.FatalError(ELSEWHERE + stopped, kind="stopped"))

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            with contextlib.suppress(Exception):  # the coordinator is gone: the run is ending
                await self._report()

    def _recover(self) -> None:
        """Answers journaled by this run's actors that died (their journal's lock is free): a block
        Ray retries after an actor was killed is not sent again for the rows that actor answered."""
        folder = Path(self.spec.checkpoint)
        for path in folder.glob(f"{JOURNAL_PREFIX}*-{self.spec.run_id}.jsonl"):
            if path.name in self._seen_journals:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its actor is alive and answers its own rows
            finally:
                os.close(fd)
            self._seen_journals.add(path.name)
            for row in read_journal(path).filter(pl.col("status") == "ok").rows():
                result = Result.stored(row)
                assert result.request_key is not None
                self._recovered[result.request_key] = result

    async def __call__(self, block: pa.Table) -> pa.Table:
        frame = pl.from_arrow(block)
        assert isinstance(frame, pl.DataFrame)
        inputs = frame.select([c for c in frame.columns if c not in PREPARED and not c.startswith(RESULT)])
        given = frame.select([RESULT + c for c in RESULT_COLUMNS]).rename({RESULT + c: c for c in RESULT_COLUMNS})
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                await self._start()
                self._started.set_result(None)
            except errors.FatalError as exc:  # this node cannot send (no key here): the run stops, with the reason
                self._stopped = str(exc)
                self._started.set_result(None)
                await self.coordinator.stop.remote(self._stopped)
        await self._started
        prepared = await asyncio.to_thread(self._prepared, frame, inputs, given)
        if self._stopped is not None:  # this actor's governor admits nothing more: the block goes back unsent
            return self._unsent(inputs, prepared, self._stopped)
        sink = _Results()
        engine = Engine(
            provider=self.provider,
            transport=self.transport,
            governor=self.governor,
            policy=self.policy,
            concurrency=self.spec.concurrency,
            checkpoint=self.checkpoint,
            sink=sink,
            stats=self.stats,
            system_prompt=self.spec.cfg.system,
            structured=self.spec.structured,
            answered=self._answered,
        )
        try:
            await engine.run(iter([inputs]), lambda _: prepared)
        except BaseExceptionGroup as group:
            fatal = group.subgroup(errors.FatalError)
            if fatal is None:
                raise
            reason = str(fatal.exceptions[0])
            if not reason.startswith(ELSEWHERE):
                await self.coordinator.stop.remote(reason)
            else:
                reason = reason[len(ELSEWHERE) :]
            self._stopped = reason
            self.checkpoint.sync()
            await self._report()
            return self._unsent(inputs, prepared, reason)
        self.checkpoint.sync()  # answered rows leave this actor only once they are durable
        await self._report()
        assert sink.results is not None
        return self._block(inputs, sink.results)

    def _unsent(self, inputs: pl.DataFrame, prepared: Prepared, reason: str) -> pa.Table:
        """The block after a stop: what this run's engines answered is in the journals and goes in the
        next run's output; here, the rows not answered say why they were not sent."""
        failed = Result.failed(STOPPED + reason, 0, None)
        rows: list[tuple[object, ...]] = [
            prepared.cached.get(row, failed._replace(request_key=key)) for row, key in enumerate(prepared.keys)
        ]
        results = result_frame(rows)
        return self._block(inputs, self.spec.structured.add_columns(results) if self.spec.structured else results)

    @staticmethod
    def _block(inputs: pl.DataFrame, results: pl.DataFrame) -> pa.Table:
        return pl.concat([inputs, results.rename({c: RESULT + c for c in results.columns})], how="horizontal").to_arrow()

    def _prepared(self, frame: pl.DataFrame, inputs: pl.DataFrame, given: pl.DataFrame) -> Prepared:
        self._recover()
        keys = frame.get_column(KEY).to_list()
        answered = given.get_column("status").is_not_null()  # rows the look-up stage completed: only those are read
        cached = dict(zip(answered.arg_true().to_list(), map(Result.stored, given.filter(answered).rows()), strict=True))
        if self._recovered:
            cached.update({row: self._recovered[k] for row, k in enumerate(keys) if k in self._recovered and row not in cached})
        return Prepared(
            frame=inputs,
            prompts=frame.get_column(PROMPT).to_list(),
            extra=frame.get_column(EXTRA).to_list(),
            skip=frame.get_column(SKIP_REASON).to_list(),
            keys=keys,
            tokens=frame.get_column(EST_TOKENS).to_list(),
            cached=cached,
        )


# ---- the driver -----------------------------------------------------------------------------------


def connect(ray: Any, cfg: RunConfig) -> bool:
    """Join the cluster named, or start a local Ray for this run; True when this run started it."""
    if ray.is_initialized():
        return False
    # Ray's core logs at level "error" what is only a caveat for our actors (their constructor arguments are
    # kept in the object store); real failures still raise. A user's own setting wins.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # A call into Ray after this run has shut it down must fail, not quietly start another Ray.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    # Ray's own chatter (auth notices, the executor's progress log) would bury the run's lines.
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise errors.ConfigError(
                f"Cannot join the Ray cluster at --ray-address {cfg.ray_address}: {exc}. Check the address (auto, or "
                "ray://HOST:10001) and that the cluster is up; or drop --ray-address to start a Ray here."
            ) from None
        return False
    ray.init(**quiet)  # a Ray of its own for this run, ended with it
    return True


def _split_work(ray: Any, cfg: RunConfig) -> tuple[int, float, int]:
    """How many engine actors, the CPU each asks for (they mostly wait on the network), and how many
    requests each may have in flight: --concurrency split, never more in all than it allows, so
    there are no more actors than it (ModelsLab's 5 queued requests, the embedded model's one)."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    total = int(cfg.setting("concurrency"))
    workers = min(total, cfg.workers or max(1, min(MAX_WORKERS_DEFAULT, int(cpus))))
    return workers, min(1.0, max(0.05, cpus / (workers * 2))), total // workers


@dataclass(frozen=True)
class Stages:
    """A dataset through both stages, the run's coordinator, and how the work was split."""

    dataset: Any
    coordinator: Any
    workers: int
    concurrency: int  # per actor


def build_stages(ray: Any, ds: Any, cfg: RunConfig, renderer: Renderer, structured: Structured | None, base_url: str,
            checkpoint: Path, done: pl.DataFrame) -> Stages:  # fmt: skip
    """`ds` rendered, looked up in `done` and sent by a pool of actors, with a coordinator of its own."""
    workers, actor_cpus, concurrency = _split_work(ray, cfg)
    run_id = uuid.uuid4().hex[:12]
    spec = Spec(cfg, renderer, structured, base_url, str(checkpoint.resolve()), concurrency, run_id)
    coordinator = (
        ray.remote(_Coordinator)
        .options(name=f"pipeline-{run_id}", num_cpus=0, max_concurrency=1000)
        .remote(cfg.rpm, cfg.tpm, cfg.adapt)
    )
    answered = ray.put(Answered(done))
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the executor's progress log would bury the run's lines
    # The output is in input order. A dataset keeps the context it was made with, so it is set on the dataset's.
    for ctx in (ray.data.DataContext.get_current(), ds.context):
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
    prepared = ds.map_batches(
        _prepare, fn_kwargs={"spec": spec, "answered": answered}, batch_size=None, batch_format="pyarrow", num_cpus=0.5
    )
    sent = prepared.map_batches(
        _Sender,
        fn_constructor_kwargs={"spec": spec, "coordinator": coordinator},
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=4),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=actor_cpus,
    )
    return Stages(sent, coordinator, workers, concurrency)


def _split(block: pa.Table) -> tuple[pl.DataFrame, pl.DataFrame]:
    frame = pl.from_arrow(block)
    assert isinstance(frame, pl.DataFrame)
    results = [c for c in frame.columns if c.startswith(RESULT)]
    inputs = frame.select([c for c in frame.columns if not c.startswith(RESULT)])
    return inputs, frame.select(results).rename({c: c[len(RESULT) :] for c in results})


def _apply(stats: RunStats, totals: dict[str, Any]) -> None:
    for name in SUMMED:
        setattr(stats, name, totals[name])
    stats.error_kinds = Counter(totals["error_kinds"])
    stats._latency = Counter(totals["latency"])
    stats.pace_rpm, stats.pace_source, stats.pace_tpm = totals["pace_rpm"], totals["pace_source"], totals["pace_tpm"]
    stats.pace_detail = {"user": "--rpm", "adaptive": "after 429s"}.get(totals["pace_source"] or "", "")


async def send(job: Job, *, sink: Sink, done: pl.DataFrame, base_url: str, progress: Any) -> str | None:
    """`pipeline run --engine ray`: the job's rows through the actor pool, the output written here in
    input order. Returns None when every row has its result, or the reason the run was stopped."""
    ray = import_ray()
    cfg, stats, plan = job.cfg, job.stats, job.plan
    from pipeline.tables import source

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    owned = await asyncio.to_thread(connect, ray, cfg)
    if threading.current_thread() is threading.main_thread():
        # ray.init installs its own SIGTERM handler, which aborts the process: Ctrl-C and SIGTERM must
        # still save and exit 130 as a local run does.
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    try:
        blocks = [ray.put(f.to_arrow()) for f in source.batches(plan.table, cfg.batch_size, cfg.limit)]
        stages = build_stages(
            ray, ray.data.from_arrow_refs(blocks), cfg, plan.renderer, plan.structured, base_url, job.checkpoint_path, done
        )
        ds, coordinator = stages.dataset, stages.coordinator
        job.say(
            f"pipeline: engine ray: {plural(stages.workers, 'actor')} x {stages.concurrency} in flight on "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs; the rate budget is shared through one coordinator "
            f"({'joined ' + cfg.ray_address if cfg.ray_address else 'a Ray started here'})"
        )
        stopped: list[str] = []
        counted = [0, 0]  # rows written, rows ok: exact, where the actors' counters may count a retried block twice
        halt = False

        def drain() -> None:
            batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2))
            try:
                for block in batches:
                    if halt:
                        break
                    write(block)
                if halt:  # closing the dataset ends the actors: first every request in flight comes back and is saved
                    ray.get(coordinator.drained.remote(STOP_WAIT))
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # ends Ray's executor for this dataset: its tasks and actors are let go

        def write(block: pa.Table) -> None:
            nonlocal halt
            inputs, results = _split(block)
            unsent = results.filter(pl.col("error").str.starts_with(STOPPED)).get_column("error")
            if len(unsent):  # a stop: drain() waits for the requests in flight, then ends
                stopped.append(str(unsent[0])[len(STOPPED) :])
                halt = True
                return
            sink.write(inputs, results)
            counted[0] += results.height
            counted[1] += int((results.get_column("status") == "ok").sum())

        async def follow() -> None:
            while True:
                await asyncio.sleep(REPORT_EVERY)
                _apply(stats, await coordinator.totals.remote())

        progress.start()
        sampling = asyncio.get_running_loop().create_task(metrics.sampler(stats, job.clock))
        watching = asyncio.get_running_loop().create_task(follow())
        draining = asyncio.ensure_future(asyncio.to_thread(drain))
        try:
            await asyncio.shield(draining)
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Ctrl-C or SIGTERM: the actors stop sending and hand back what they have (their answers are in
            # the journals); the driver lets Ray's executor end before Ray itself does.
            halt = True
            with contextlib.suppress(Exception):
                coordinator.stop.remote("interrupted")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(draining), STOP_WAIT)
            raise
        finally:
            watching.cancel()
            sampling.cancel()
            with contextlib.suppress(Exception):
                _apply(stats, await coordinator.totals.remote())
            progress.close()
        totals = await coordinator.totals.remote()
        _apply(stats, totals)
        if not stopped and not totals["stopped"]:
            stats.rows_done, stats.ok, stats.errors = counted[0], counted[1], counted[0] - counted[1]
        return totals["stopped"] or (stopped[0] if stopped else None)
    finally:
        if owned:
            await asyncio.to_thread(ray.shutdown)


def rename_results(block: pa.Table, prefix: str) -> pa.Table:
    """The result columns by their output names: `prefix` on those of every run, not on a schema's fields."""

    def name(c: str) -> str:
        if not c.startswith(RESULT):
            return c
        own = c[len(RESULT) :]
        return prefix + own if own in RESULT_COLUMNS else own

    return block.rename_columns([name(c) for c in block.column_names])
