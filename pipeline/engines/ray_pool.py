"""`pipeline run --engine ray`: the job's blocks through a pool of actors the driver keeps itself.

Ray Data's executor starts actors of its own before any of ours (a stats actor, a
locality tracker, an autoscaling coordinator) and a task per block to read its
schema: on two cores that was most of ten seconds before the first request. For a
job whose input the driver reads anyway, the driver keeps the pool instead:

- it starts the coordinator and `--workers` `Sender` actors, and hands each block to
  the least busy actor that is ready, at most OVERLAP at a time per actor (they work
  on them together), so no actor takes more than its share while another idles;
- it reads the input a block at a time, and no more than WINDOW blocks are between
  the oldest not yet written and the newest handed out: the driver never holds the
  whole input, nor (a folder output: the actors write their parts) the output;
- it writes the results in input order as they come;
- an actor that dies is replaced and its blocks go to another, which reads the dead
  actor's journal first, so only what was in flight is sent again;
- after a fatal answer or Ctrl-C every actor is told to stop, and the driver waits
  for the blocks handed out to come back (their answers saved) before letting go.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from pipeline import errors
from pipeline.engines.ray import (
    FOLLOW_EVERY,
    OVERLAP,
    STOP_WAIT,
    Shared,
    Work,
    apply_totals,
    connect,
    import_ray,
    plan_work,
    start_shared,
)
from pipeline.engines.ray_actors import COUNTS, RESULT, STOPPED, Answered, Sender
from pipeline.limits import spend
from pipeline.observe import metrics
from pipeline.observe.progress import plural
from pipeline.tables import source
from pipeline.tables.sink import PartsSink, Sink

if TYPE_CHECKING:
    from pipeline.job import Job

WINDOW_PER_ACTOR = OVERLAP + 2  # blocks handed out or waiting to be written, per actor: a slow block holds little up
REPLACEMENTS_PER_ACTOR = 2  # actors that die are replaced, up to this many times the pool's size in all


@dataclass(eq=False)
class _Actor:
    handle: Any
    ready: asyncio.Future[Any]
    blocks: set[int] = field(default_factory=set)  # block indices it is working on
    dead: bool = False


@dataclass
class _Block:
    index: int
    table: Any  # the input block in the object store: kept until written, to hand it to another actor if need be
    actor: _Actor | None = None
    result: asyncio.Future[Any] | None = None


class Pool:
    """The actors of one run and the blocks they are working on."""

    def __init__(self, ray: Any, shared: Shared, work: Work, answered: Any) -> None:
        self.ray, self.shared, self.work, self.answered = ray, shared, work, answered
        self.actors: list[_Actor] = []
        self.blocks: dict[int, _Block] = {}  # handed out (or to hand out again), not yet written
        self.again: deque[_Block] = deque()  # blocks of actors that died, to hand to another
        self.replaced = 0
        self.dead: list[str] = []  # journals of actors that died: the next ones read them whatever their lock says
        self.halted: str | None = None  # why no more blocks are handed out

    def _start_actor(self) -> _Actor:
        ray, spec = self.ray, self.shared.spec
        handle = (
            ray.remote(Sender)
            .options(num_cpus=self.work.actor_cpus, max_restarts=0)
            .remote(spec, self.shared.coordinator, self.shared.keeper, self.answered)
        )
        return _Actor(handle, asyncio.wrap_future(handle.ready.remote().future()))

    def _least_busy(self) -> _Actor | None:
        ready = [a for a in self.actors if not a.dead and a.ready.done() and len(a.blocks) < OVERLAP]
        return min(ready, key=lambda a: len(a.blocks), default=None)

    def _hand(self, block: _Block, actor: _Actor) -> None:
        parts = block.index if self.shared.spec.parts is not None else None
        sent = actor.handle.run_block.remote(block.table, parts, self.dead)
        block.actor, block.result = actor, asyncio.wrap_future(sent.future())
        actor.blocks.add(block.index)
        self.blocks[block.index] = block

    async def run(self, frames: Iterator[pl.DataFrame], write: Callable[[pa.Table], str | None]) -> str | None:
        """Hand out every block and write the results in order; the reason the run stopped, or None."""
        self.actors = [self._start_actor() for _ in range(self.work.workers)]
        window = self.work.workers * WINDOW_PER_ACTOR
        results: dict[int, pa.Table] = {}
        next_in = next_out = 0
        exhausted = False
        while True:
            while not self.halted and (actor := self._least_busy()) is not None:
                if self.again:
                    self._hand(self.again.popleft(), actor)
                    continue
                if exhausted or next_in - next_out >= window:
                    break
                frame = await asyncio.to_thread(next, frames, None)
                if frame is None:
                    exhausted = True
                    break
                self._hand(_Block(next_in, self.ray.put(frame.to_arrow())), actor)
                next_in += 1
            if (exhausted and next_out == next_in) or (self.halted and not self._out()):
                return self.halted
            await self._wait(results)
            while not self.halted and next_out in results:
                block = results.pop(next_out)
                del self.blocks[next_out]
                next_out += 1
                self.halted = await asyncio.to_thread(write, block)

    def _out(self) -> list[_Block]:
        """Blocks handed to an actor whose result has not been taken yet (it may have come already)."""
        return [b for b in self.blocks.values() if b.result is not None]

    async def _wait(self, results: dict[int, pa.Table]) -> None:
        """Until a block comes back or an actor is ready; an actor that died is replaced, its blocks handed on."""
        starting = [a.ready for a in self.actors if not a.dead and not a.ready.done()]
        waiting: dict[asyncio.Future[Any], _Block] = {b.result: b for b in self._out() if b.result is not None}
        done, _ = await asyncio.wait([*waiting, *starting], return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            block = waiting.get(future)
            if block is None:  # an actor became ready, or failed to start
                actor = next(a for a in self.actors if a.ready is future)
                if future.exception() is not None:
                    self._died(actor)
                continue
            assert block.actor is not None
            block.actor.blocks.discard(block.index)
            block.result = None  # taken
            try:
                results[block.index] = future.result()
            except self.ray.exceptions.RayActorError:
                self._died(block.actor)
                self.again.append(block)

    def _died(self, actor: _Actor) -> None:
        if actor.dead:
            return
        actor.dead = True
        if actor.ready.done() and not actor.ready.exception():
            self.dead.append(actor.ready.result())
        if self.replaced >= REPLACEMENTS_PER_ACTOR * self.work.workers:
            if not any(not a.dead for a in self.actors):
                self.halted = f"the Ray actors kept dying ({self.replaced} replaced); see Ray's logs (run with --verbose)"
            return
        self.replaced += 1
        self.actors.append(self._start_actor())

    async def settle(self) -> None:
        """After a stop: every block handed out comes back (its engine stopped and its answers are saved)."""
        out = [b.result for b in self._out() if b.result is not None]
        if out:
            await asyncio.wait(out)

    def close(self) -> None:
        """Let the actors go (a Ray this run started goes with them; a cluster's stays up)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor.handle)
        for shared in (self.shared.keeper, self.shared.coordinator):
            if shared is not None:
                with contextlib.suppress(Exception):
                    self.ray.kill(shared)


def _split(block: pa.Table) -> tuple[pl.DataFrame, pl.DataFrame]:
    frame = pl.from_arrow(block)
    assert isinstance(frame, pl.DataFrame)
    results = [c for c in frame.columns if c.startswith(RESULT)]
    inputs = frame.select([c for c in frame.columns if not c.startswith(RESULT)])
    return inputs, frame.select(results).rename({c: c[len(RESULT) :] for c in results})


async def send(job: Job, *, sink: Sink, done: pl.DataFrame, base_url: str, progress: Any) -> errors.FatalError | None:
    """`pipeline run --engine ray`: the job's rows through the actor pool, the output written in input order
    (here, or by the actors themselves for a folder of parts). Returns None when every row has its result,
    or why the run was stopped: the fatal answer an actor got (its kind kept, for the exit code)."""
    ray = import_ray()
    cfg, stats = job.cfg, job.stats
    began = time.time()  # wall clock: actors on other nodes say when they started sending by theirs
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    owned = await asyncio.to_thread(connect, ray, cfg)
    if threading.current_thread() is threading.main_thread():
        # ray.init installs its own SIGTERM handler, which aborts the process: Ctrl-C and SIGTERM must
        # still save and exit 130 as a local run does.
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    ray_up = time.time() - began
    pool: Pool | None = None
    try:
        parts = sink.pending if isinstance(sink, PartsSink) else None
        work = plan_work(ray, cfg, stats.total_rows)
        shared = start_shared(ray, cfg, job.plan.renderer, job.plan.structured, base_url, job.checkpoint_path, work, parts,
                              job.plan.layout)  # fmt: skip
        pool = Pool(ray, shared, work, ray.put(Answered(done)))
        if (ceiling := spend.budget_for(cfg)) is not None:  # held by the coordinator; said by the summary here
            stats.ceiling_what = spend.describe_ceiling(ceiling)
        blocks = -(-stats.total_rows // work.block_rows)
        job.say(
            f"pipeline: engine ray: {plural(work.workers, 'actor')} sharing {work.concurrency} in flight, "
            f"{plural(blocks, 'block')} of up to {work.block_rows:,} rows, on {ray.cluster_resources().get('CPU', 0):g} "
            f"CPUs ({'joined ' + cfg.ray_address if cfg.ray_address else 'a Ray started here'})"
        )
        counted = [0, 0]  # rows written, rows ok: exact, where the actors' counters may count a retried block twice

        def write(block: pa.Table) -> str | None:
            if COUNTS[0] in block.column_names:  # a part the actor wrote: only its counts come here
                reason: str | None = block.column(COUNTS[2])[0].as_py()
                if reason is None:
                    counted[0] += block.column(COUNTS[0])[0].as_py()
                    counted[1] += block.column(COUNTS[1])[0].as_py()
                return reason
            inputs, results = _split(block)
            unsent = results.filter(pl.col("error").str.starts_with(STOPPED)).get_column("error")
            if len(unsent):
                return str(unsent[0])[len(STOPPED) :]
            sink.write(inputs, results)
            counted[0] += results.height
            counted[1] += int((results.get_column("status") == "ok").sum())
            return None

        async def follow() -> None:
            while True:
                await asyncio.sleep(FOLLOW_EVERY)
                apply_totals(stats, await shared.coordinator.totals.remote())

        progress.start()
        loop = asyncio.get_running_loop()
        sampling, watching = loop.create_task(metrics.sampler(stats, job.clock)), loop.create_task(follow())
        try:
            stopped = await pool.run(source.batches(job.plan.table, work.block_rows, cfg.limit), write)
            if stopped is not None:  # every actor stops; what they have in flight comes back and is saved
                with contextlib.suppress(Exception):
                    await shared.coordinator.stop.remote(stopped)
                await asyncio.wait_for(pool.settle(), STOP_WAIT)
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Ctrl-C or SIGTERM: the actors stop sending and hand back what they have (their answers are in
            # the journals) before Ray lets them go.
            with contextlib.suppress(Exception):
                shared.coordinator.stop.remote("interrupted")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(pool.settle(), STOP_WAIT)
            raise
        finally:
            watching.cancel()
            sampling.cancel()
            with contextlib.suppress(Exception):
                apply_totals(stats, await shared.coordinator.totals.remote())
            if shared.keeper is not None:
                with contextlib.suppress(Exception):
                    await shared.keeper.close.remote()
            progress.close()
        totals = await shared.coordinator.totals.remote()
        apply_totals(stats, totals)
        if stopped is None and not totals["stopped"]:
            stats.rows_done, stats.ok, stats.errors = counted[0], counted[1], counted[0] - counted[1]
        if totals["first_block"] is not None:
            job.say(
                f"pipeline: ray: the first request went out {totals['first_block'] - began:.1f} s after the start "
                f"({f'starting Ray took {ray_up:.1f} s' if owned else 'Ray was running'}); "
                f"{plural(totals['actors_sending'], 'actor')} sent requests"
                + (f"; {plural(pool.replaced, 'actor')} replaced after dying" if pool.replaced else "")
            )
        reason = stopped or totals["stopped"]
        return None if reason is None else errors.FatalError(reason, kind=totals["stopped_kind"])
    finally:
        if pool is not None:
            pool.close()
        if owned:
            await asyncio.to_thread(ray.shutdown)
