"""The answer cache: answers shared across outputs, jobs and calls (`--cache DIR`, `cache_dir=`).

The checkpoint belongs to one output; the cache is for the same request made
again elsewhere: a notebook's next call, the same job with a new `--output`,
two jobs over overlapping tables. It is off unless asked for (a user sampling
at a temperature may want fresh answers).

One SQLite file, `DIR/answers.sqlite`, in WAL mode: readers never block the
writer, and jobs running at once each wait their turn to write (busy timeout)
instead of failing. An answer is keyed by its request key (the rendered
request: model, system, parameters, prompt) within a scope, the provider and
the server's URL: the same model name on two servers is not the same model.
Only `ok` answers are kept, as the row's whole result. Writes are buffered
(`put`) and committed by `flush` in one transaction: the engine flushes about
once a second from a worker thread and at the end, never once per row. The
file is bounded: past `cache_max_mb` the least recently used answers are
dropped when the cache is closed, and `pipeline cache prune` does the same on
demand.

Reads and writes go through two connections of their own, and `put` only
appends to a list under a short lock: a look-up or the event loop never waits
while a flush waits for another job's write lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson

from pipeline.errors import ConfigError

FILE = "answers.sqlite"
CHUNK = 500  # keys per look-up query (SQLite allows 999 parameters in older builds)
BUSY_MS = 60_000  # how long a writer waits for another job's transaction before giving up
MB = 1024 * 1024
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    result BLOB NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_used ON answers (used);
"""
_SIZE = "LENGTH(result) + LENGTH(key)"  # an answer's size, as the cap counts it


class Answers(Protocol):
    """What the engine needs of an answer cache: this file's, or (on Ray) one reached through an actor."""

    @property
    def pending(self) -> int: ...
    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]: ...
    def put(self, key: str, result: Iterable[Any]) -> None: ...
    def flush(self) -> int: ...


@dataclass(frozen=True)
class CacheInfo:
    entries: int
    bytes: int  # the answers' own size; the file is somewhat larger
    file_bytes: int
    oldest: float | None
    newest: float | None


class AnswerCache:
    """One open cache, used from the event loop and the engine's worker threads."""

    def __init__(self, folder: str | Path, scope: str = "", *, max_mb: float | None = None) -> None:
        self.folder, self.scope, self.max_mb = Path(folder), scope, max_mb
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._buffer_lock = threading.Lock()  # held only to append to or swap the lists below
        self._pending: list[tuple[str, str, bytes, float, float]] = []
        self._used: list[tuple[float, str, str]] = []
        self.stored = 0  # answers written by this process

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.folder / FILE, timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a crash of this process
        return db

    def open(self) -> AnswerCache:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            writer = self._connect()
            writer.execute("PRAGMA journal_mode=WAL")  # kept in the file: every connection after it uses WAL
            writer.executescript(SCHEMA)
            reader = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"Cannot use the answer cache {self.folder}: {exc}. Give another --cache folder, or run without one."
            ) from None
        self._writer, self._reader = writer, reader
        return self

    def __enter__(self) -> AnswerCache:
        return self.open() if self._writer is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        """The writing connection."""
        assert self._writer is not None, "open() the cache first"
        return self._writer

    @property
    def pending(self) -> int:
        """Answers put and use times noted, not yet written."""
        return len(self._pending) + len(self._used)

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """The stored answers for those of `keys` the cache holds (one query per CHUNK keys)."""
        assert self._reader is not None, "open() the cache first"
        found: dict[str, tuple[Any, ...]] = {}
        unique = list(dict.fromkeys(keys))
        with self._read_lock:
            for i in range(0, len(unique), CHUNK):
                part = unique[i : i + CHUNK]
                marks = ",".join("?" * len(part))
                rows = self._reader.execute(
                    f"SELECT key, result FROM answers WHERE scope = ? AND key IN ({marks})",
                    (self.scope, *part),
                ).fetchall()
                found.update((key, tuple(orjson.loads(blob))) for key, blob in rows)
        now = time.time()
        with self._buffer_lock:
            self._used.extend((now, self.scope, key) for key in found)
        return found

    def put(self, key: str, result: Iterable[Any]) -> None:
        """Keep an answer (written at the next flush)."""
        now = time.time()
        blob = orjson.dumps(list(result))
        with self._buffer_lock:
            self._pending.append((self.scope, key, blob, now, now))

    def flush(self) -> int:
        """Write what was put, and when the answers read were used, in one transaction; returns how
        many answers were written. Another job holding the write lock past the busy timeout leaves
        them for the next flush (a cache is not worth failing a run for)."""
        with self._buffer_lock:
            pending, used = self._pending, self._used
            self._pending, self._used = [], []
        if not pending and not used:
            return 0
        with self._write_lock:
            db = self.db
            try:
                db.execute("BEGIN IMMEDIATE")  # take the write lock now: waiting for it is what the busy timeout is for
            except sqlite3.OperationalError:  # still locked after BUSY_MS
                with self._buffer_lock:
                    self._pending[:0], self._used[:0] = pending, used
                return 0
            try:
                db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", pending)
                db.executemany("UPDATE answers SET used = ? WHERE scope = ? AND key = ?", used)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.stored += len(pending)
        return len(pending)

    def prune(self, *, max_mb: float | None = None, older_than: float | None = None) -> int:
        """Drop answers unused for `older_than` seconds, then the least recently used until the answers
        take at most `max_mb`; returns how many were dropped."""
        self.flush()
        dropped = 0
        with self._write_lock:
            db = self.db
            if older_than is not None:
                dropped += db.execute("DELETE FROM answers WHERE used < ?", (time.time() - older_than,)).rowcount
            if max_mb is not None and self._pages_bytes() > max_mb * MB:  # else under the cap: no scan
                total = db.execute(f"SELECT COALESCE(SUM({_SIZE}), 0) FROM answers").fetchone()[0]
                excess = total - int(max_mb * MB)
                if excess > 0:
                    # The oldest-used answers whose sizes add up to the excess: a running sum, cut where it passes it.
                    cut = db.execute(
                        f"SELECT used FROM (SELECT used, SUM({_SIZE}) OVER (ORDER BY used, key) AS run "
                        "FROM answers) WHERE run >= ? ORDER BY used LIMIT 1",
                        (excess,),
                    ).fetchone()
                    if cut is not None:
                        dropped += db.execute("DELETE FROM answers WHERE used <= ?", (cut[0],)).rowcount
            if dropped:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return dropped

    def _pages_bytes(self) -> int:
        """Bytes of the pages in use: at least the answers' size as the cap counts it, read in no time."""
        size, pages, free = (self.db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count"))
        return int(size * (pages - free))

    def info(self) -> CacheInfo:
        assert self._reader is not None, "open() the cache first"
        with self._read_lock:
            entries, size, oldest, newest = self._reader.execute(
                f"SELECT COUNT(*), COALESCE(SUM({_SIZE}), 0), MIN(created), MAX(created) FROM answers"
            ).fetchone()
        files = [self.folder / FILE, self.folder / (FILE + "-wal")]
        return CacheInfo(entries, size, sum(f.stat().st_size for f in files if f.exists()), oldest, newest)

    def compact(self) -> None:
        """Give the space of dropped answers back to the file system (VACUUM; waits for other writers)."""
        with self._write_lock:
            self.db.execute("VACUUM")

    def close(self) -> None:
        """Flush, keep the file within `max_mb`, and close. Safe to call twice."""
        if self._writer is None:
            return
        try:
            self.flush()
            if self.max_mb is not None:
                self.prune(max_mb=self.max_mb)
        finally:
            self._writer.close()
            if self._reader is not None:
                self._reader.close()
            self._writer = self._reader = None


def scope_for(provider: str, base_url: str | None) -> str:
    """Answers are shared only between runs that ask the same server: the provider and its URL
    (the embedded model's port changes from run to run, so it is named, not addressed)."""
    return f"{provider} {base_url.rstrip('/') if base_url else 'embedded'}"
