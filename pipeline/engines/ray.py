"""Tables that outgrow one machine: the same engine inside Ray Data actors, with one set of budgets.

    pipeline run CONFIG --engine ray [--ray-address auto|ray://HOST:10001] [--workers N]
    out = pipeline.ray.complete(ds, prompt="Summarise: {text}", base_url=..., model=...)

This module is the driver's side: joining or starting Ray (quietly), how the work
is cut, the dataset's stages, and reading the results back in input order. The
stages themselves are in ray_actors.py, what they share in ray_coordinator.py.

How the work is cut, so that every actor is busy: blocks are small enough that
each actor gets several (at least BLOCKS_PER_ACTOR, never more rows than
--batch-size), an actor takes at most OVERLAP blocks at a time and works on them
together (the next one's requests go out while the last one drains), and
--concurrency is one budget for all actors, granted by demand, so an actor whose
blocks ran out hands its share to those still sending.

Only the ray* modules of pipeline.engines import ray, and only when asked for; Ray is
the optional `ray` extra (`pip install -e '.[ray]'` in a checkout).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.engines.ray_actors import RESULT, Answered, Sender, Spec, prepare
from pipeline.engines.ray_coordinator import SUMMED, CacheKeeper, Coordinator
from pipeline.limits import spend
from pipeline.observe.progress import summary
from pipeline.observe.stats import RunStats
from pipeline.requests.prompts import Renderer
from pipeline.requests.structured import Structured
from pipeline.tables.cache import scope_for
from pipeline.tables.checkpoint import RESULT_COLUMNS
from pipeline.tables.columns import ADDED, Layout

if TYPE_CHECKING:
    pass

# From a checkout: the published package named "pipeline" is another project, so no install by name.
INSTALL = "pip install -e '.[ray]' in the pipeline checkout (make setup there installs it too)"
MAX_WORKERS_DEFAULT = 8
BLOCKS_PER_ACTOR = 4  # at least this many blocks per actor: none takes the whole job while another idles
OVERLAP = 2  # blocks an actor works on at once: the next one starts while the last drains
MIN_BLOCK_ROWS = 50  # below this a block costs Ray more than its rows take to send
FOLLOW_EVERY = 0.5  # seconds between the driver's reads of the actors' counters
STOP_WAIT = 15.0  # seconds an interrupted run waits for the actors to hand back their blocks


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


def verbose(cfg: RunConfig) -> bool:
    return cfg.verbose or os.environ.get("PIPELINE_VERBOSE", "").lower() not in ("", "0", "false", "no")


def connect(ray: Any, cfg: RunConfig) -> bool:
    """Join the cluster named, or start a local Ray for this run; True when this run started it."""
    if ray.is_initialized():
        return False
    # No usage report leaves this machine (Ray sends one by default).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A call into Ray after this run has shut it down must fail, not quietly start another Ray.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    loud = verbose(cfg)
    # The workers' output (Ray Data's notices, an actor's warnings) stays in Ray's log files unless asked for.
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": loud}
    if not loud:
        options["logging_level"] = logging.ERROR
        # Ray's core logs at level "error" what is only a caveat for our actors (Ray Data keeps their
        # constructor arguments in the object store); real failures still raise. A user's own setting wins.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if cfg.ray_address:
        try:
            with _stderr_without(() if loud else ("logging.cc:",)):
                ray.init(address=cfg.ray_address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise errors.ConfigError(
                f"Cannot join the Ray cluster at --ray-address {cfg.ray_address}: {exc}. Check the address (auto, or "
                "ray://HOST:10001) and that the cluster is up; or drop --ray-address to start a Ray here."
            ) from None
        return False
    # A Ray of its own for this run, ended with it: "local" starts one even when another runs on this
    # machine (ray.init() alone would join the last one started here, or RAY_ADDRESS's).
    with _stderr_without(() if loud else ("logging.cc:",)):
        ray.init(address="local", **options)
    return True


@contextlib.contextmanager
def _stderr_without(noise: tuple[str, ...]) -> Iterator[None]:
    """What is written to this process's stderr meanwhile (Ray's C++ core writes there directly), less the
    lines that contain one of `noise` (the note that RAY_BACKEND_LOG_LEVEL was read, on every start)."""
    if not noise:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(True) if not any(n in line for n in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def quiet(ray: Any, cfg: RunConfig) -> None:
    """Ray Data's own chatter (the executor's progress log, its advice on block counts) would bury the run's
    lines; --verbose (or PIPELINE_VERBOSE=1) keeps it."""
    if verbose(cfg):
        return
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray\.data.*")


@dataclass(frozen=True)
class Work:
    """How a run is cut: actors, the CPU each asks for, requests in flight in all, rows per block."""

    workers: int
    actor_cpus: float
    concurrency: int
    block_rows: int


def plan_work(ray: Any, cfg: RunConfig, rows: int | None) -> Work:
    """Actors: --workers, or the cluster's CPUs (at most 8), never more than --concurrency (ModelsLab's 5
    queued requests, the embedded model's one). Each asks for a share of a CPU: they mostly wait on the
    network. Blocks: --batch-size rows, smaller when that would leave an actor with fewer than
    BLOCKS_PER_ACTOR (`rows` None: a dataset's own blocks are used as they come)."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    total = int(cfg.setting("concurrency"))
    workers = min(total, cfg.workers or max(1, min(MAX_WORKERS_DEFAULT, int(cpus))))
    block = cfg.batch_size
    if rows is not None:
        block = min(block, max(MIN_BLOCK_ROWS, math.ceil(rows / (workers * BLOCKS_PER_ACTOR))))
        workers = max(1, min(workers, math.ceil(rows / block)))  # an actor with no block to take is not started
    return Work(workers, min(1.0, max(0.05, cpus / (workers * 2))), total, max(1, block))


@dataclass(frozen=True)
class Shared:
    """A run's shared actors and what every sending actor is given."""

    spec: Spec
    coordinator: Any
    keeper: Any  # the answer cache's actor, or None


def start_shared(ray: Any, cfg: RunConfig, renderer: Renderer, structured: Structured | None, base_url: str,
                 checkpoint: Path, work: Work, parts: Path | None = None, layout: Layout | None = None) -> Shared:  # fmt: skip
    """The run's coordinator (and, with --cache, the cache's keeper on this node), and the actors' spec."""
    run_id = uuid.uuid4().hex[:12]
    spec = Spec(cfg, renderer, structured, base_url, str(checkpoint.resolve()), work.concurrency, run_id,
                str(parts.resolve()) if parts is not None else None, layout)  # fmt: skip
    coordinator = (
        ray.remote(Coordinator)
        .options(name=f"pipeline-{run_id}", num_cpus=0, max_concurrency=1000)
        .remote(cfg.rpm, cfg.tpm, cfg.adapt, work.concurrency, spend.budget_for(cfg))
    )
    keeper = None
    if cfg.cache_dir is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On this node: the cache is a SQLite file on its disk, as for a local run.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        keeper = (
            ray.remote(CacheKeeper)
            .options(num_cpus=0, scheduling_strategy=here)
            .remote(str(Path(cfg.cache_dir).resolve()), scope_for(cfg.provider, base_url), cfg.cache_max_mb)
        )
    return Shared(spec, coordinator, keeper)


def build_stages(ray: Any, ds: Any, shared: Shared, work: Work, done: pl.DataFrame) -> Any:
    """`pipeline.ray.complete()`'s dataset: `ds` rendered and looked up in `done` by Ray tasks, sent by Ray
    Data's pool of actors (OVERLAP blocks each at most, worked on together)."""
    answered = ray.put(Answered(done))
    quiet(ray, shared.spec.cfg)
    # The output is in input order. A dataset keeps the context it was made with, so it is set on the dataset's.
    for ctx in (ray.data.DataContext.get_current(), ds.context):
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
    prepared = ds.map_batches(
        prepare, fn_kwargs={"spec": shared.spec, "answered": answered}, batch_size=None, batch_format="pyarrow",
        num_cpus=0.25,
    )  # fmt: skip
    return prepared.map_batches(
        Sender,
        fn_constructor_kwargs={"spec": shared.spec, "coordinator": shared.coordinator, "keeper": shared.keeper},
        compute=ray.data.ActorPoolStrategy(
            size=work.workers, max_tasks_in_flight_per_actor=OVERLAP, max_concurrent_calls_per_actor=OVERLAP
        ),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=work.actor_cpus,
    )


def apply_totals(stats: RunStats, totals: dict[str, Any]) -> None:
    """The actors' counters, summed by the coordinator, into the driver's stats."""
    for name in SUMMED:
        setattr(stats, name, totals[name])
    stats.error_kinds = Counter(totals["error_kinds"])
    stats._latency = Counter(totals["latency"])
    stats.pace_rpm, stats.pace_source, stats.pace_tpm = totals["pace_rpm"], totals["pace_source"], totals["pace_tpm"]
    stats.pace_detail = {"user": "--rpm", "adaptive": "after 429s"}.get(totals["pace_source"] or "", "")
    stats.concurrency, stats.concurrency_ceiling = totals["concurrency"], totals["concurrency_ceiling"]
    stats.ceiling_reached = stats.ceiling_reached or totals["ceiling_reached"]


def rename_results(block: pa.Table, prefix: str) -> pa.Table:
    """The result columns by their output names: `prefix` on those of every run, not on a schema's fields."""

    def name(c: str) -> str:
        if not c.startswith(RESULT):
            return c
        own = c[len(RESULT) :]
        return prefix + own if own in RESULT_COLUMNS or own in ADDED else own

    return block.rename_columns([name(c) for c in block.column_names])


def summary_callback(coordinator: Any, checkpoint: str, say: Callable[[str], None]) -> type:
    """A Ray Data execution callback that says the run's summary each time a dataset of
    `pipeline.ray.complete` has been consumed (written, iterated, materialized): what that pass did."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    marks: list[tuple[float, dict[str, Any]]] = []

    def totals() -> dict[str, Any]:
        import ray

        found: dict[str, Any] = ray.get(coordinator.totals.remote(), timeout=10)
        return found

    class Summary(ExecutionCallback):
        def before_execution_starts(self, executor: Any) -> None:
            with contextlib.suppress(Exception):  # a summary that cannot be had never fails the user's pipeline
                marks.append((time.monotonic(), totals()))

        def after_execution_succeeds(self, executor: Any) -> None:
            with contextlib.suppress(Exception):
                started, before = marks.pop() if marks else (time.monotonic(), {})
                stats = RunStats()
                apply_totals(stats, since(before, totals()))
                say(summary(stats, time.monotonic() - started, None, checkpoint).replace("pipeline:", "pipeline.ray:", 1))

    return Summary


def since(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The coordinator's totals for what happened between two readings (its counters only grow)."""
    if not before:
        return now
    out = dict(now)
    for name in SUMMED:
        out[name] = now[name] - before[name]
    for name in ("error_kinds", "latency"):
        out[name] = dict(Counter(now[name]) - Counter(before[name]))
    return out


def say_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
