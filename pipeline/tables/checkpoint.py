"""The checkpoint store: every answered request, durable from the moment it is answered.

Layout of the folder (next to the output unless --checkpoint-dir says otherwise):

    results.parquet            compacted results of earlier runs (atomic rename)
    journal-<ns>-<pid>.jsonl   this run's results, one JSON line each, appended
    lock                       held (flock) by the run using the folder

Each result is appended with one unbuffered write as soon as it is parsed, so a
SIGKILL at any moment loses nothing already written; a torn last line (a kill
in mid-write) is ignored on reading. At the start of a run, journals are folded
into results.parquet (write temp, fsync, rename, then delete the journals; a
crash in between only leaves duplicates, and the newest result per key wins).
No request body is stored, so no API key can end up here.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import polars as pl

from pipeline.errors import InputError, JobBusy

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "completion": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "total_tokens": pl.Int64(),
    "finish_reason": pl.String(),
    "model": pl.String(),
    "status": pl.String(),
    "error": pl.String(),
    "attempts": pl.Int64(),
    "latency_ms": pl.Float64(),
    "request_key": pl.String(),
    "tokens_estimated": pl.Boolean(),
}
# What a checkpoint keeps of a result: the above, then what the columns a job's settings add are made of
# (pipeline/tables/columns.py), kept whatever the settings; null in a checkpoint of an older version.
STORED_SCHEMA: dict[str, pl.DataType] = {
    **RESULT_SCHEMA,
    "cost_usd": pl.Float64(),
    "tool_calls": pl.String(),
    "completions": pl.List(pl.String()),
    "finish_reasons": pl.List(pl.String()),
}


class Result(NamedTuple):
    """One row's result, as the checkpoint keeps it: the output's result columns first, in their order."""

    completion: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    finish_reason: str | None
    model: str | None
    status: str  # "ok" or "error"
    error: str | None
    attempts: int
    latency_ms: float | None
    request_key: str | None  # None: no request could be made for the row
    tokens_estimated: bool | None
    # Written only when the settings ask for them (pipeline/tables/columns.py); kept always, so that a
    # resume with prices or samples finds what it needs.
    cost_usd: float | None = None  # what the request(s) for this row were billed, at the run's prices
    tool_calls: str | None = None  # JSON: [{"name": ..., "arguments": {...}}, ...]
    completions: list[str] | None = None  # every choice's text, with n > 1
    finish_reasons: list[str | None] | None = None  # ...and each one's finish reason

    @classmethod
    def failed(cls, message: str, attempts: int, key: str | None, cost: float | None = None) -> Result:
        """A row with no answer: status error, the reason, nulls where no answer came (and what the
        attempts that failed were billed, if any)."""
        return cls(None, None, None, None, None, None, "error", message, attempts, None, key, False, cost)

    @classmethod
    def stored(cls, values: Sequence[Any]) -> Result:
        """A result as a checkpoint, the answer cache or a Ray block gives it back: one written by an older
        version lacks the fields added since (None), one by a newer version has more (dropped)."""
        return cls(*values[: len(cls._fields)])


STORED_COLUMNS = Result._fields  # what a checkpoint keeps of a result, in this order
# What every output has, in this order; the columns after them depend on the settings (tables/columns.py).
RESULT_COLUMNS = STORED_COLUMNS[: len(RESULT_SCHEMA)]
assert tuple(STORED_SCHEMA) == STORED_COLUMNS, "the record and the schema name the same columns in the same order"
assert tuple(RESULT_SCHEMA) == RESULT_COLUMNS


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Results read from a file as the current schema: columns an older version did not write are null."""
    if frame.columns == list(STORED_COLUMNS):
        return frame
    return frame.select(
        pl.col(c).cast(t) if c in frame.columns else pl.lit(None, dtype=t).alias(c) for c, t in STORED_SCHEMA.items()
    )


SYNC_EVERY = 1.0  # seconds between fsyncs: a kill loses nothing; a power cut at most this much


class Checkpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._last_sync = 0.0
        self.appended = 0

    def open(self) -> None:
        """Take the folder's lock; a second run on the same checkpoint is refused."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise InputError(
                f"Cannot create the checkpoint folder {self.folder}: {exc.strerror}. Choose another with --checkpoint-dir."
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobBusy(
                f"Another pipeline run is using the checkpoint {self.folder}. Wait for it to finish, or give this run its own --output."
            ) from None

    def load(self) -> pl.DataFrame:
        """Fold journals into results.parquet and return the rows answered `ok`, sorted by key."""
        frames = []
        compacted = self.folder / "results.parquet"
        if compacted.exists():
            frames.append(conform(pl.read_parquet(compacted)))
        journals = sorted(self.folder.glob("journal-*.jsonl"))
        frames.extend(read_journal(j) for j in journals)
        frames = [f for f in frames if f.height]
        if not frames:
            return pl.DataFrame(schema=STORED_SCHEMA)
        everything = newest(pl.concat(frames, how="vertical_relaxed"))
        if journals:
            tmp = compacted.with_suffix(".parquet.tmp")
            everything.write_parquet(tmp)
            _fsync_path(tmp)
            os.replace(tmp, compacted)
            _fsync_path(self.folder)
            for j in journals:
                j.unlink()
        return everything.filter(pl.col("status") == "ok").sort("request_key")

    def start_journal(self, tag: str = "", *, hold: bool = False) -> str:
        """Open this process's journal; returns its name. `tag` marks the run (Ray actors share one
        folder); `hold` keeps an flock on it while the process lives, so others can tell it died."""
        name = f"journal-{time.time_ns():020d}-{os.getpid()}{'-' + tag if tag else ''}.jsonl"
        self._fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if hold:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return name

    def append(self, result: tuple[Any, ...]) -> None:
        """Record one result; called as soon as it is known."""
        assert self._fd is not None
        # A tuple shorter than the record (an older caller's) leaves the later fields out: null when read.
        os.write(self._fd, orjson.dumps(dict(zip(STORED_COLUMNS, result, strict=False))) + b"\n")
        self.appended += 1
        now = time.monotonic()
        if now - self._last_sync >= SYNC_EVERY:
            os.fsync(self._fd)
            self._last_sync = now

    def sync(self) -> None:
        """Make every answer appended so far durable now (before another file records them as kept)."""
        if self._fd is not None:
            os.fsync(self._fd)
            self._last_sync = time.monotonic()

    def close(self, *, discard_unused: bool = False) -> None:
        """Flush and release. With `discard_unused`, a folder that never held an answer (a run stopped
        before anything came back) is removed, so it does not look like a run to resume."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if discard_unused and self._lock_fd is not None:
            self._discard_if_unused()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _discard_if_unused(self) -> None:
        # Only while the lock is held, and only what this class writes: empty journals and the lock.
        names = {p.name: p for p in self.folder.iterdir()}
        journals = [p for n, p in names.items() if n.startswith("journal-") and n.endswith(".jsonl")]
        if set(names) - {"lock"} - {p.name for p in journals} or any(p.stat().st_size for p in journals):
            return
        for p in journals:
            p.unlink()
        (self.folder / "lock").unlink()
        with contextlib.suppress(OSError):  # someone put something there meanwhile: leave it
            self.folder.rmdir()


def newest(everything: pl.DataFrame) -> pl.DataFrame:
    """One result per key, the newest, but an `ok` is never replaced by a later error
    (say from a --fresh run): nothing answered is ever lost. The ok ones first."""
    ok = everything.filter(pl.col("status") == "ok").unique(subset="request_key", keep="last", maintain_order=True)
    failed = (
        everything.filter(pl.col("status") != "ok")
        .join(ok.select("request_key"), on="request_key", how="anti")
        .unique(subset="request_key", keep="last", maintain_order=True)
    )
    return pl.concat([ok, failed])


def read_results(folder: Path) -> pl.DataFrame:
    """Every result kept in `folder`, as `Checkpoint.load` sees them but without its lock and its
    compaction: a job running on the folder is left alone (`pipeline estimate`, `pipeline show`)."""
    files = [folder / "results.parquet", *sorted(folder.glob("journal-*.jsonl"))] if folder.is_dir() else []
    frames = []
    for f in files:
        try:  # a running job may compact a journal away between glob and read
            frames.append(conform(pl.read_parquet(f)) if f.suffix == ".parquet" else read_journal(f))
        except FileNotFoundError:
            continue
    return newest(pl.concat([pl.DataFrame(schema=STORED_SCHEMA), *frames], how="vertical_relaxed"))


def read_done(folder: Path) -> pl.DataFrame:
    """Answered (`ok`) results, one per key, sorted by key: `Checkpoint.load` without its lock and compaction."""
    return read_results(folder).filter(pl.col("status") == "ok").sort("request_key")


def read_journal(path: Path) -> pl.DataFrame:
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # a torn last line (killed mid-write) is dropped
    if end == 0:
        return pl.DataFrame(schema=STORED_SCHEMA)
    try:
        return pl.read_ndjson(io.BytesIO(data[:end]), schema=STORED_SCHEMA)
    except pl.exceptions.PolarsError:
        # A damaged line in the middle: keep every line that still parses.
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return pl.DataFrame(rows, schema=STORED_SCHEMA)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lookup(done: pl.DataFrame, keys: pl.Series) -> tuple[pl.Series, pl.DataFrame]:
    """For each key, whether `done` (sorted by key) has it, and the matching rows in key order.

    A binary search per batch instead of a join: a join would rebuild a hash
    table of the whole checkpoint for every batch.
    """
    done_keys = done.get_column("request_key")
    if done.height == 0:
        return pl.Series([False] * len(keys)), done.clear()
    idx = done_keys.search_sorted(keys.fill_null(""), side="left").clip(0, done.height - 1)
    hit = (done_keys.gather(idx) == keys).fill_null(False)
    return hit, done[idx.filter(hit)]
