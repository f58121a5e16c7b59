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
Only `ok` answers are kept. Writes are buffered and committed once per output
batch in one transaction, never one per row. The file is bounded: past
`cache_max_mb` the least recently used answers are dropped at the end of a
run, and `pipeline cache prune` does the same on demand.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from pipeline.errors import ConfigError

FILE = "answers.sqlite"
CHUNK = 500  # keys per look-up query (SQLite allows 999 parameters in older builds)
BUSY_MS = 60_000  # how long a writer waits for another job's transaction before giving up
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


@dataclass(frozen=True)
class CacheInfo:
    entries: int
    bytes: int  # the answers' own size; the file is somewhat larger
    file_bytes: int
    oldest: float | None
    newest: float | None


class AnswerCache:
    """One open cache, used from the event loop and the engine's worker threads (calls are serialised)."""

    def __init__(self, folder: str | Path, scope: str = "", *, max_mb: float | None = None) -> None:
        self.folder, self.scope, self.max_mb = Path(folder), scope, max_mb
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str, bytes, float, float]] = []
        self._used: list[tuple[float, str, str]] = []
        self.stored = 0  # answers written by this process

    def open(self) -> AnswerCache:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.folder / FILE, timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a crash of this process
            db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"Cannot use the answer cache {self.folder}: {exc}. Give another --cache folder, or run without one."
            ) from None
        self._db = db
        return self

    def __enter__(self) -> AnswerCache:
        return self.open() if self._db is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() the cache first"
        return self._db

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """The stored answers for those of `keys` the cache holds (one query per CHUNK keys)."""
        found: dict[str, tuple[Any, ...]] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(unique), CHUNK):
                part = unique[i : i + CHUNK]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT key, result FROM answers WHERE scope = ? AND key IN ({marks})",
                    (self.scope, *part),
                ).fetchall()
                found.update((key, tuple(orjson.loads(blob))) for key, blob in rows)
            now = time.time()
            self._used.extend((now, self.scope, key) for key in found)
        return found

    def put(self, key: str, result: Iterable[Any]) -> None:
        """Keep an answer (written at the next flush)."""
        now = time.time()
        blob = orjson.dumps(list(result))
        with self._lock:
            self._pending.append((self.scope, key, blob, now, now))

    def flush(self) -> None:
        """Write what was put, and when the answers read were used, in one transaction."""
        with self._lock:
            pending, used = self._pending, self._used
            self._pending, self._used = [], []
            if not pending and not used:
                return
            db = self.db
            db.execute("BEGIN IMMEDIATE")  # take the write lock now: waiting for it is what busy_timeout is for
            try:
                db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", pending)
                db.executemany("UPDATE answers SET used = ? WHERE scope = ? AND key = ?", used)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.stored += len(pending)

    def prune(self, *, max_mb: float | None = None, older_than: float | None = None) -> int:
        """Drop answers unused for `older_than` seconds, then the least recently used until the answers
        take at most `max_mb`; returns how many were dropped."""
        self.flush()
        dropped = 0
        with self._lock:
            db = self.db
            if older_than is not None:
                dropped += db.execute("DELETE FROM answers WHERE used < ?", (time.time() - older_than,)).rowcount
            if max_mb is not None:
                total = db.execute("SELECT COALESCE(SUM(LENGTH(result) + LENGTH(key)), 0) FROM answers").fetchone()[0]
                excess = total - int(max_mb * 1024 * 1024)
                if excess > 0:
                    # The oldest-used answers whose sizes add up to the excess: a running sum, cut where it passes it.
                    cut = db.execute(
                        "SELECT used FROM (SELECT used, SUM(LENGTH(result) + LENGTH(key)) OVER (ORDER BY used, key) AS run "
                        "FROM answers) WHERE run >= ? ORDER BY used LIMIT 1",
                        (excess,),
                    ).fetchone()
                    if cut is not None:
                        dropped += db.execute("DELETE FROM answers WHERE used <= ?", (cut[0],)).rowcount
            if dropped:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return dropped

    def info(self) -> CacheInfo:
        with self._lock:
            entries, size, oldest, newest = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(result) + LENGTH(key)), 0), MIN(created), MAX(created) FROM answers"
            ).fetchone()
        files = [self.folder / FILE, self.folder / (FILE + "-wal")]
        return CacheInfo(entries, size, sum(f.stat().st_size for f in files if f.exists()), oldest, newest)

    def compact(self) -> None:
        """Give the space of dropped answers back to the file system (VACUUM; waits for other writers)."""
        with self._lock:
            self.db.execute("VACUUM")

    def close(self) -> None:
        """Flush, keep the file within `max_mb`, and close. Safe to call twice."""
        if self._db is None:
            return
        try:
            self.flush()
            if self.max_mb is not None:
                self.prune(max_mb=self.max_mb)
        finally:
            self._db.close()
            self._db = None


def scope_for(provider: str, base_url: str | None) -> str:
    """Answers are shared only between runs that ask the same server: the provider and its URL
    (the embedded model's port changes from run to run, so it is named, not addressed)."""
    return f"{provider} {base_url.rstrip('/') if base_url else 'embedded'}"
