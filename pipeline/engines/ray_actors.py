"""The two stages a Ray run's dataset goes through, as they run in Ray's workers.

1. `prepare` (a Ray task per block): render each block's requests and look their
   keys up in the checkpoint's answers, which sit once in the object store as
   sorted 64-bit keys and the rows in that order (a binary search per block,
   zero-copy reads: memory per task is the block's, not the checkpoint's).
   Answered rows leave this stage complete, so no actor sends them.
2. `Sender` (an actor pool): one engine per block, the local engine's code, over
   one aiohttp session, one governor, one memory of recent answers and one
   checkpoint journal per actor. An actor runs two blocks at once, so the next
   block's requests go out while the last one's drain. Every answer is appended
   to the actor's journal in the shared checkpoint folder as it comes, so a killed
   driver or actor loses only what was in flight. A row that fails is a row with
   status error, never an exception (one would abort the whole dataset). With a
   folder output the actor writes its block's part itself and hands back only
   counts, so the output never passes through the driver.

What the actors share goes through the coordinator (ray_coordinator.py): the rate
(leases), requests in flight (a grant per actor, asked for on every report), the
spend ceiling (a reservation per request) and the stop word.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.engines.online import Engine
from pipeline.engines.prepared import Prepared, assemble
from pipeline.engines.ray_coordinator import SUMMED
from pipeline.limits import spend
from pipeline.limits.governor import Governor
from pipeline.limits.lease import ELSEWHERE, Lease, LeaseClient
from pipeline.limits.retry import RetryPolicy
from pipeline.limits.share import Settle, SpendClient
from pipeline.observe.stats import RunStats
from pipeline.providers import make_provider
from pipeline.providers.ratelimit import dialect_for
from pipeline.providers.transport import AiohttpTransport
from pipeline.requests.media import MEDIA, MEDIA_BYTES, MEDIA_KIND, MEDIA_MOST, MEDIA_TOKENS
from pipeline.requests.prompts import EST_TOKENS, EXTRA, KEY, PROMPT, SKIP_REASON, Renderer
from pipeline.requests.structured import Structured
from pipeline.tables.checkpoint import RESULT_COLUMNS, STORED_COLUMNS, STORED_SCHEMA, Checkpoint, Result, read_journal
from pipeline.tables.columns import ADDED, Layout
from pipeline.tables.sink import PART, Sink, result_frame, write_part

RESULT = "__result."  # result columns inside the dataset, apart from any input column of the same name
COUNTS = ("__pipeline.rows", "__pipeline.ok", "__pipeline.stopped")  # what a block written as a part hands back
PREPARED = (PROMPT, EXTRA, SKIP_REASON, KEY, EST_TOKENS)
# With image columns: each row's descriptor of its images (never their bytes: the actor reads them to send).
MEDIA_PREPARED = (MEDIA, MEDIA_BYTES, MEDIA_MOST, MEDIA_TOKENS, MEDIA_KIND)
REPORT_EVERY = 0.25  # seconds between an actor's reports to the coordinator (counters, its share in flight)
GROWTH = 4  # an actor asks for up to this many times its own learned limit: room for slow start to grow into
JOURNAL_PREFIX = "journal-"
STOPPED = "not sent: the run stopped: "  # the error of rows a stop left unsent (the driver ends the run on seeing it)


@dataclass(frozen=True)
class Spec:
    """What the stages need to render and send; pickled to every worker. No key: actors read it from
    the environment variable the config names (set it on every node of a cluster)."""

    cfg: RunConfig
    renderer: Renderer
    structured: Structured | None
    base_url: str
    checkpoint: str
    concurrency: int  # for the whole cluster, shared by demand
    run_id: str
    parts: str | None = None  # a folder output: where actors write their blocks' parts until the driver commits them
    layout: Layout | None = None  # the result columns the output gets (with prices: cost_usd...)


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


def prepare(block: pa.Table, spec: Spec, answered: Any) -> pa.Table:
    """Stage 1, a Ray task per block: the input plus its rendered requests, and the results of rows the
    checkpoint has answered (or that cannot be sent), so the actors only see what is left to send."""
    import ray

    if isinstance(answered, ray.ObjectRef):
        answered = ray.get(answered)
    frame = pl.from_arrow(block)
    assert isinstance(frame, pl.DataFrame)
    rendered = spec.renderer.render(frame)
    carried = PREPARED + (MEDIA_PREPARED if spec.renderer.media is not None else ())
    rows, found = answered.find(rendered.get_column(KEY))
    full = pl.DataFrame({"__row": np.arange(frame.height)})
    if len(rows):
        hits = pl.from_arrow(found)
        assert isinstance(hits, pl.DataFrame)
        full = full.join(hits.with_columns(pl.Series("__row", rows)), on="__row", how="left", maintain_order="left")
    else:
        full = full.with_columns([pl.lit(None, dtype=dtype).alias(name) for name, dtype in STORED_SCHEMA.items()])
    out = pl.concat(
        [frame, rendered.select(carried), full.select(STORED_COLUMNS).rename({c: RESULT + c for c in STORED_COLUMNS})],
        how="horizontal",
    )
    return out.to_arrow()


def _counters(stats: RunStats, governor: Governor | None) -> dict[str, Any]:
    c: dict[str, Any] = {name: getattr(stats, name) for name in SUMMED}
    c["in_flight"] = governor.in_flight if governor is not None else 0
    c["concurrency"] = governor.own_limit if governor is not None else 0  # learned (or --concurrency); the total caps the sum
    c["ceiling_reached"] = stats.ceiling_reached
    c["error_kinds"] = dict(stats.error_kinds)
    c["latency"] = dict(stats._latency)
    return c


class ActorPace:
    """The governor's shared budgets inside an actor: leases and spend from the coordinator, learning sent to it."""

    def __init__(self, coordinator: Any, *, spend_shared: bool) -> None:
        self._coordinator = coordinator
        self._lease = LeaseClient(self._ask)
        self._spend = SpendClient(self._reserve, self._settle) if spend_shared else None
        self._announced: tuple[float | None, float | None] = (None, None)

    async def _ask(self, want: int, tokens_each: float) -> Lease:
        lease: Lease = await self._coordinator.lease.remote(want, tokens_each)
        return lease

    async def _reserve(self, held: tuple[int, int], settles: list[Settle]) -> bool:
        fits: bool = await self._coordinator.spend_reserve.remote(held, settles)
        return fits

    async def _settle(self, settles: list[Settle]) -> None:
        await self._coordinator.spend_settle.remote(settles)

    @property
    def limited(self) -> bool:
        return self._lease.limited

    @property
    def stopped(self) -> str | None:
        return self._lease.stopped

    @property
    def shares_spend(self) -> bool:
        return self._spend is not None

    def heard(self, limited: bool, epoch: int, stopped: str | None) -> None:
        self._lease.relimit(limited, epoch)
        if stopped is not None:
            self._lease.stopped = stopped

    async def take(self, tokens: int) -> int | None:
        return await self._lease.take(tokens)

    def announce(self, requests_per_s: float | None, tokens_per_min: float | None) -> None:
        if (requests_per_s or tokens_per_min) and (requests_per_s, tokens_per_min) != self._announced:
            self._announced = (requests_per_s, tokens_per_min)
            self._coordinator.announce.remote(requests_per_s, tokens_per_min)
            self._lease.relimit(True)

    def rate_limited(self, retry_after: float | None, epoch: int) -> None:
        self._coordinator.rate_limited.remote(epoch, retry_after)
        self._lease.relimit(True)

    async def reserve(self, held: tuple[int, int]) -> bool:
        assert self._spend is not None
        return await self._spend.reserve(held)

    def settle(self, held: tuple[int, int], tokens_in: int, tokens_out: int) -> None:
        assert self._spend is not None
        self._spend.settle(held, tokens_in, tokens_out)

    async def flushed(self) -> None:
        if self._spend is not None:
            await self._spend.flushed()


class RemoteCache:
    """The answer cache as an engine uses it (`tables.cache.Answers`), kept by the run's CacheKeeper actor.
    Called from worker threads (look-ups while preparing a block, the engine's flushes), never the loop."""

    def __init__(self, keeper: Any) -> None:
        self._keeper = keeper
        self._lock = threading.Lock()
        self._pending: list[tuple[str, tuple[Any, ...]]] = []

    @property
    def pending(self) -> int:
        return len(self._pending)

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        import ray

        found: dict[str, tuple[Any, ...]] = ray.get(self._keeper.get_many.remote(list(keys)))
        return found

    def put(self, key: str, result: Iterable[Any]) -> None:
        with self._lock:
            self._pending.append((key, tuple(result)))

    def flush(self) -> int:
        import ray

        with self._lock:
            items, self._pending = self._pending, []
        stored: int = ray.get(self._keeper.put_many.remote(items)) if items else 0
        return stored


class _Results(Sink):
    """An engine's sink inside an actor: keeps the block's result columns to hand back to Ray."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: pl.DataFrame | None = None
        self.results: pl.DataFrame | None = None

    def write(self, inputs: pl.DataFrame, results: pl.DataFrame) -> None:
        self.inputs, self.results = inputs, results


class Sender:
    """Stage 2, one per actor: the local engine over each block's rows that are left to send."""

    def __init__(self, spec: Spec, coordinator: Any, keeper: Any = None, answered: Answered | None = None) -> None:
        self.spec, self.coordinator, self.answered = spec, coordinator, answered
        self.worker = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.cache = RemoteCache(keeper) if keeper is not None else None
        self.governor: Governor | None = None
        self._started: asyncio.Future[None] | None = None
        self._recovered: dict[str, Result] = {}
        self._seen_journals: set[str] = set()
        self._dead: set[str] = set()  # journals of actors the driver knows died
        self._recovering = threading.Lock()
        self._stopped: str | None = None  # a fatal answer (here or elsewhere) stopped the run
        self._answered: OrderedDict[str, Result] = OrderedDict()  # recent answers, shared by this actor's blocks
        self._engines: set[Engine] = set()
        self._reporting = asyncio.Lock()  # one report at a time: grants applied in the order they were given
        self._first_block: float | None = None  # when this actor started sending

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
        # The driver holds the folder's lock; each actor appends to a journal of its own, locked while it lives (see _recover).
        self.checkpoint = Checkpoint(Path(spec.checkpoint))
        self.journal = self.checkpoint.start_journal(tag=spec.run_id, hold=True)
        self._seen_journals.add(self.journal)
        ceiling = spend.budget_for(cfg)
        self.pace = ActorPace(self.coordinator, spend_shared=ceiling is not None)
        self.governor = Governor(
            stats=self.stats,
            concurrency=spec.concurrency,
            adapt=cfg.adapt,
            max_wait=cfg.max_wait,
            dialect=dialect_for(spec.base_url, cfg.provider),
            max_tokens=spec.renderer.spec.max_tokens or 0,
            spend=ceiling,  # its worst cases and this actor's tally; the ceiling itself is the coordinator's
            shared=self.pace,
        )
        self.governor.share(0)  # nothing goes out before the coordinator grants this actor a share
        self.policy = RetryPolicy(max_attempts=cfg.max_attempts, max_wait=cfg.max_wait)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report(self, extra: int = 0) -> None:
        """Counters to the coordinator; back come the share of requests in flight and the rate's state.
        `extra`: requests of a block about to start, not yet queued in its engine."""
        gov = self.governor
        assert gov is not None
        async with self._reporting:
            unsettled = extra + sum(e.unsettled for e in self._engines)
            wants = min(unsettled, GROWTH * gov.own_limit, self.spec.concurrency)
            named = gov.concurrency.named if gov.concurrency is not None else None
            flight = (gov.in_flight, gov.gate.limit, wants, named)
            counters = _counters(self.stats, gov)
            counters["first_block"] = self._first_block
            limited, epoch, stopped, grant = await self.coordinator.report.remote(self.worker, counters, flight)
            gov.share(grant)
        self.pace.heard(limited, epoch, stopped)
        if stopped is not None:
            gov.block(errors.FatalError(ELSEWHERE + stopped, kind="stopped"))

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            with contextlib.suppress(Exception):  # the coordinator is gone: the run is ending
                await self._report()

    def _recover(self) -> None:
        """Answers journaled by this run's actors that died (their journal's lock is free): a block
        Ray retries after an actor was killed is not sent again for the rows that actor answered."""
        with self._recovering:  # two blocks prepare at once: the second waits for what the first reads
            self._read_dead_journals()

    def _read_dead_journals(self) -> None:
        folder = Path(self.spec.checkpoint)
        for path in folder.glob(f"{JOURNAL_PREFIX}*-{self.spec.run_id}.jsonl"):
            if path.name in self._seen_journals:
                continue
            if path.name not in self._dead:
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

    async def ready(self) -> str:
        """Started (its session, journal and governor made); the name of its journal."""
        await self._ensure_started()
        return getattr(self, "journal", "")

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                await self._start()
                self._started.set_result(None)
            except errors.FatalError as exc:  # this node cannot send (no key here): the run stops, with the reason
                self._stopped = str(exc)
                self._started.set_result(None)
                await self.coordinator.stop.remote(self._stopped, exc.kind)
        await self._started

    async def run_block(self, block: pa.Table, part: int | None = None, dead: Sequence[str] = ()) -> pa.Table:
        """`pipeline run`'s pool: one input block, rendered and looked up here, then sent. With `part`, the
        block is written as that part of the folder output and only its counts come back. `dead`: journals
        of actors Ray says died, read before sending even if their lock is not free yet (a process being
        killed lets its lock go a moment after Ray reports it dead)."""
        self._dead.update(dead)
        prepared = await asyncio.to_thread(prepare, block, self.spec, self.answered)
        return await self._send(prepared, part)

    async def __call__(self, block: pa.Table) -> pa.Table:
        """Ray Data's actor pool (`pipeline.ray.complete`): a block the `prepare` stage rendered."""
        return await self._send(block, None)

    async def _send(self, block: pa.Table, part: int | None) -> pa.Table:
        frame = pl.from_arrow(block)
        assert isinstance(frame, pl.DataFrame)
        added = (*PREPARED, *MEDIA_PREPARED)
        inputs = frame.select([c for c in frame.columns if c not in added and not c.startswith(RESULT)])
        given = frame.select([RESULT + c for c in STORED_COLUMNS]).rename({RESULT + c: c for c in STORED_COLUMNS})
        await self._ensure_started()
        prepared, to_send = await asyncio.to_thread(self._prepared, frame, inputs, given)
        if self._stopped is not None:  # this actor's governor admits nothing more: the block goes back unsent
            return self._unsent(inputs, prepared, self._stopped, part)
        sink = _Results()
        engine = Engine(
            provider=self.provider,
            transport=self.transport,
            governor=self.governor,  # type: ignore[arg-type]  # set by _start
            policy=self.policy,
            concurrency=self.spec.concurrency,
            checkpoint=self.checkpoint,
            sink=sink,
            stats=self.stats,
            system_prompt=self.spec.cfg.system,
            structured=self.spec.structured,
            answered=self._answered,
            cache=self.cache,
            pricing=spend.pricing_for(self.spec.cfg, batch=False),
            layout=self.spec.layout,
            media=self.spec.renderer.media,  # a row's images are read here, on the actor's node, as it is sent
        )
        self._engines.add(engine)
        if to_send and self._first_block is None:
            self._first_block = time.time()  # wall clock: the driver compares it with its own start
        try:
            if to_send:
                with contextlib.suppress(Exception):
                    await self._report(extra=to_send)  # ask for a share now, not at the next report
            await engine.run(iter([inputs]), lambda _: prepared)
        except (errors.FatalError, BaseExceptionGroup) as exc:
            # Bare once something was answered (the engine marks the rest "not sent" first), in a group when not.
            fatal = exc if isinstance(exc, errors.FatalError) else exc.subgroup(errors.FatalError)
            if fatal is None:
                raise
            cause = fatal if isinstance(fatal, errors.FatalError) else fatal.exceptions[0]
            reason = str(cause)
            if not reason.startswith(ELSEWHERE):  # its kind decides the run's exit code, as for a local run
                await self.coordinator.stop.remote(reason, getattr(cause, "kind", "stopped"))
            else:
                reason = reason[len(ELSEWHERE) :]
            self._stopped = reason
            for other in self._engines - {engine}:  # this actor's other block shares the governor, now shut
                other.stop(errors.FatalError(ELSEWHERE + reason, kind="stopped"))
            self.checkpoint.sync()
            await self._report()
            return self._unsent(inputs, prepared, reason, part)
        finally:
            self._engines.discard(engine)
        self.checkpoint.sync()  # answered rows leave this actor only once they are durable
        await self.pace.flushed()  # and what they cost has reached the coordinator
        await self._report()
        assert sink.results is not None and sink.inputs is not None  # the rows as written: one per sample with --explode
        if part is not None:
            return await asyncio.to_thread(self._write_part, part, sink.inputs, sink.results)
        return self._block(sink.inputs, sink.results)

    def _write_part(self, part: int, inputs: pl.DataFrame, results: pl.DataFrame) -> pa.Table:
        """A folder output: this block as its part, written here; only its counts go back to the driver."""
        assert self.spec.parts is not None
        prefix = self.spec.cfg.result_prefix
        names = {c: prefix + c for c in (*RESULT_COLUMNS, *ADDED)}
        out = inputs.hstack(results.rename(names, strict=False) if prefix else results)
        write_part(out, Path(self.spec.parts) / PART.format(part))
        ok = int((results.get_column("status") == "ok").sum())
        return pa.table({COUNTS[0]: [results.height], COUNTS[1]: [ok], COUNTS[2]: pa.array([None], pa.string())})

    def _unsent(self, inputs: pl.DataFrame, prepared: Prepared, reason: str, part: int | None) -> pa.Table:
        """The block after a stop: what this run's engines answered is in the journals and goes in the
        next run's output; here, the rows not answered say why they were not sent."""
        if part is not None:  # no part is written for a run that stops: it has no output
            return pa.table({COUNTS[0]: [0], COUNTS[1]: [0], COUNTS[2]: [reason]})
        failed = Result.failed(STOPPED + reason, 0, None)
        rows: list[tuple[object, ...]] = [
            prepared.cached.get(row, failed._replace(request_key=key)) for row, key in enumerate(prepared.keys)
        ]
        layout = self.spec.layout or Layout(structured=self.spec.structured)
        return self._block(*layout.shape(inputs, result_frame(rows)))

    @staticmethod
    def _block(inputs: pl.DataFrame, results: pl.DataFrame) -> pa.Table:
        return pl.concat([inputs, results.rename({c: RESULT + c for c in results.columns})], how="horizontal").to_arrow()

    def _prepared(self, frame: pl.DataFrame, inputs: pl.DataFrame, given: pl.DataFrame) -> tuple[Prepared, int]:
        """The block's rows for the engine, and how many requests it needs (for the share asked for)."""
        self._recover()
        keys = frame.get_column(KEY).to_list()
        skip = frame.get_column(SKIP_REASON).to_list()
        answered = given.get_column("status").is_not_null()  # rows the look-up stage completed: only those are read
        cached = dict(zip(answered.arg_true().to_list(), map(Result.stored, given.filter(answered).rows()), strict=True))
        if self._recovered:
            cached.update({row: self._recovered[k] for row, k in enumerate(keys) if k in self._recovered and row not in cached})
        prepared = assemble(inputs, frame, keys, skip, cached, self.cache)
        to_send = len({k for row, k in enumerate(keys) if k is not None and skip[row] is None and row not in prepared.cached})
        return prepared, to_send
