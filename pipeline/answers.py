"""The Python API's default answer store: `complete()` never throws a paid answer away.

A call given no `checkpoint_dir` (and no `cache_dir`) keeps every answer in one
store per user, `<state folder>/answers/answers.sqlite` (see `tables.statedir`):
the answer cache of `--cache`, keyed by each request's key within its server.
Calling the same `complete()` again, in the same kernel or a new process, or
with rows added to the table, sends only the requests never answered.

Bounded: answers unused for MAX_AGE_DAYS are dropped when a process first uses
the store, and the least recently used past `cache_max_mb` (1 GB by default)
when a call ends. Cleared by `pipeline state clear` or `pipeline.clear_answers()`.

A call stopped by Ctrl-C (the notebook's stop button) raises `Interrupted`,
whose `partial` is the table of the rows answered so far (`answered_so_far`).

In batch mode (`wait=True`), the batches submitted go on at the provider after
an interrupt: the call's checkpoint, with the ledger of what was submitted, is a
folder per job in the state folder (`batch_checkpoint`), so the same call made
again collects them instead of submitting and paying again. It is removed once a
call has collected everything (the answers are in the store by then).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline.config import RunConfig
from pipeline.engines.prepared import prepare
from pipeline.tables import source
from pipeline.tables.cache import FILE, AnswerCache, scope_for
from pipeline.tables.checkpoint import read_done
from pipeline.tables.sink import result_frame
from pipeline.tables.statedir import answers_dir, batches_dir

if TYPE_CHECKING:
    from pipeline.job import Job
    from pipeline.tables.sink import Sink

MAX_AGE_DAYS = 30.0
_pruned: set[Path] = set()  # the stores this process has pruned by age already
_pruning = threading.Lock()


def with_default_store(cfg: RunConfig) -> RunConfig:
    """The call's settings with the default store as its answer cache, where it can have one: not when the
    caller chose a place (`checkpoint_dir`, `cache_dir`) or asked for `fresh` answers. On Ray the store is
    kept by one actor on the driver's node, as a run's `--cache` is."""
    if cfg.checkpoint_dir or cfg.cache_dir or cfg.fresh:
        return cfg
    folder = answers_dir()
    with _pruning:
        if folder not in _pruned and (folder / FILE).exists():
            with AnswerCache(folder) as store:
                store.prune(older_than=MAX_AGE_DAYS * 86_400)
        _pruned.add(folder)
    return cfg.model_copy(update={"cache_dir": str(folder)})


def batch_checkpoint(cfg: RunConfig) -> Path:
    """The checkpoint of a batch-mode call given no checkpoint_dir: one folder per job (the server, the
    model and how rows become requests), so the same call made again finds the batches it submitted."""
    import hashlib

    import orjson

    job = cfg.model_dump(mode="json", include={"provider", "base_url", "model", "prompt", "prompt_column", "system"})
    digest = hashlib.sha256(orjson.dumps(job, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return batches_dir() / digest


def where(cfg: RunConfig) -> str:
    """Where a call's answers are kept, as the interrupt message names it."""
    if cfg.mode == "batch" and not cfg.checkpoint_dir:
        return f"the default answer store and, for batches still open, {batch_checkpoint(cfg)}"
    if cfg.checkpoint_dir:
        return f"the checkpoint {cfg.checkpoint_dir}"
    if cfg.cache_dir:
        default = "default " if cfg.cache_dir == str(answers_dir()) else ""
        return f"the {default}answer store {Path(cfg.cache_dir) / FILE}"
    return "a temporary folder, gone when the call returns (fresh=True keeps no answers)"


def resume_hint(cfg: RunConfig) -> str:
    """How to get the answers back after an interrupt."""
    given = cfg.cache_dir is not None and cfg.cache_dir != str(answers_dir())
    again = "with the same checkpoint_dir" if cfg.checkpoint_dir else "with the same cache_dir" if given else ""
    kept = "the rows answered are not sent again. " if cfg.checkpoint_dir or cfg.cache_dir else ""
    if cfg.mode == "batch":
        kept = "the batches submitted are collected, not submitted again, and the rows answered are not sent again. "
    return (
        f"Call the same complete() again{' ' + again if again else ''}: {kept}The rows answered so far are on the "
        "exception: `except pipeline.Interrupted as stop: stop.partial`."
    )


def answered_so_far(job: Job, sink: Sink) -> pl.DataFrame:
    """The rows of the call's table that have an answer (`ok`), in order, with their result columns: from
    the call's checkpoint, then its answer store."""
    cfg, plan = job.cfg, job.plan
    done = read_done(job.checkpoint_path)
    store = None
    if cfg.cache_dir is not None and (Path(cfg.cache_dir) / FILE).exists():
        store = AnswerCache(cfg.cache_dir, scope_for(cfg.provider, cfg.setting("base_url"))).open()
    try:
        first = True
        for frame in source.batches(plan.table, cfg.batch_size, cfg.limit):
            p = prepare(frame, plan.renderer, done, store)
            rows = sorted(row for row, result in p.cached.items() if result.status == "ok")
            if rows or first:
                results = result_frame([p.cached[r] for r in rows])
                sink.write(*plan.layout.shape(frame[rows] if rows else frame.clear(), results))
                first = False
    finally:
        if store is not None:
            store.close()
    sink.commit()
    frame_out: Any = getattr(sink, "frame", None)
    return frame_out if isinstance(frame_out, pl.DataFrame) else pl.DataFrame()


def clear_answers(older_than_days: float | None = None) -> int:
    """Empty `complete()`'s default answer store (or drop only the answers unused for `older_than_days`);
    returns how many answers were dropped. Safe while other calls use it: they keep what they hold."""
    folder = answers_dir()
    if not (folder / FILE).exists():
        return 0
    with AnswerCache(folder) as store:
        if older_than_days is None:
            dropped = store.info().entries
            store.db.execute("DELETE FROM answers")
        else:
            dropped = store.prune(older_than=older_than_days * 86_400)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.compact()
    return dropped


def forget_local_copies() -> list[Path]:
    """Remove the local side of s3:// jobs (output copies, reports) that no run is using; returns the folders."""
    from pipeline.tables.statedir import objects_dir

    root = objects_dir()
    removed: list[Path] = []
    for lock in sorted(root.rglob("lock")) if root.exists() else []:
        if _in_use(lock):
            return removed  # a run is going on: leave the whole tree alone
    if root.exists():
        removed.append(root)
        shutil.rmtree(root, ignore_errors=True)
    return removed


def _in_use(lock: Path) -> bool:
    import fcntl
    import os

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
