"""A job's checkpoint in object storage: the journal shipped in immutable segments, a lock, no leftovers.

Object storage has no appends, so the journal is written locally as always (one
unbuffered write per answer, in a working folder under the user's state folder,
`statedir`) and shipped to the bucket by a thread: every SHIP_SECONDS, every
SHIP_ROWS answers, and on every way out but a kill (a clean end, a fatal answer,
Ctrl-C, SIGTERM). Layout beside an `s3://bucket/out/result.parquet` output:

    s3://bucket/out/result.checkpoint/
        journal/<run>-<seq>.jsonl     new answers since the previous segment (never rewritten)
        results-<run>.parquet         many segments folded into one, by a later run
        batches/...                   batch mode's ledger, shipped whole when it changes
        lock                          the run holding the job (see JobLock)

A run starts by taking the lock, then reads every segment and results file: a
successor on a fresh disk (a new pod, an empty HOME) loses at most what the
killed run had not shipped yet (at most SHIP_ROWS answers plus those answered
during one upload, or SHIP_SECONDS of answers when fewer came) and sends those
rows again, with the requests that were in flight. A journal a killed run left
in this machine's working folder is shipped first, so a resume on the same
machine loses nothing. Segments are read in name order (run ids start with the
time), the newest result per key wins and an `ok` is never replaced (`newest`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import polars as pl

from pipeline.errors import InputError, JobBusy
from pipeline.tables import objectstore, storage
from pipeline.tables.checkpoint import STORED_SCHEMA, Checkpoint, conform, newest, read_journal


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


SHIP_SECONDS = _env_number("PIPELINE_JOURNAL_SECONDS", 5.0)  # the most time an answer waits to be shipped
SHIP_ROWS = int(_env_number("PIPELINE_JOURNAL_ROWS", 500))  # or this many answers, whichever comes first
COMPACT_AT = 64  # objects in the checkpoint before a run folds them into one results file
HEARTBEAT = 10.0  # seconds between the lock holder's refreshes of the lock object
STALE_AFTER = _env_number("PIPELINE_LOCK_STALE", 60.0)  # a lock not refreshed this long is a killed run's
DOWNLOADS = 8  # segments fetched at once when a run starts


class ShippedCheckpoint(Checkpoint):
    """`Checkpoint` on a local working folder, with its journal shipped to `remote` (a key prefix)."""

    def __init__(self, folder: Path, remote: storage.Url, *, say: Callable[[str], None]) -> None:
        super().__init__(folder)
        self.remote, self.say = remote, say
        self.run_id = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        self.lock: JobLock | None = None
        self._bucket: objectstore.Bucket | None = None
        self._offsets: dict[str, int] = {}  # local journal -> bytes already shipped
        self._ledger: dict[str, tuple[int, int]] = {}  # batch-mode file -> (size, mtime_ns) shipped
        self._seq = 0
        self._mark = 0  # `appended` when a shipment was last asked for
        self._wake, self._stop = threading.Event(), threading.Event()
        self._ship_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None  # the last shipping failure, said once until one succeeds
        self.segments = 0

    def __str__(self) -> str:
        return f"{self.remote}/"

    @property
    def bucket(self) -> objectstore.Bucket:
        assert self._bucket is not None, "open() first"
        return self._bucket

    def key(self, name: str) -> str:
        return f"{self.remote.key}/{name}"

    def open(self) -> None:
        """The local working folder's lock (a second run on this machine), then the job's lock in the bucket
        (a second run anywhere), then the leftovers of a killed run's uploads."""
        super().open()
        try:
            self._bucket = objectstore.Bucket(self.remote.bucket)
            self.lock = JobLock(self.bucket, self.key("lock"), self.run_id, say=self.say).acquire()
            aborted = self.bucket.abort_uploads(self.key(""), lambda key: True)
            if aborted:
                self.say(f"pipeline: aborted {len(aborted)} unfinished upload(s) a stopped run left under {self}")
        except objectstore.StoreError as exc:
            super().close()
            raise InputError(f"Cannot use the checkpoint {self}: {exc}") from None
        except BaseException:
            super().close()
            raise

    def load(self) -> pl.DataFrame:
        """Every result kept in the bucket and in this machine's leftovers; the `ok` ones, sorted by key.
        Leftovers are shipped before anything is sent, and many objects are folded into one."""
        try:
            listed = list(self.bucket.keys(self.key("")))
        except objectstore.StoreError as exc:
            raise InputError(f"Cannot read the checkpoint {self}: {exc}") from None
        names = [k.removeprefix(self.key("")) for k in listed]
        results = sorted(n for n in names if n.startswith("results-") and n.endswith(".parquet"))
        segments = sorted(n for n in names if n.startswith("journal/") and n.endswith(".jsonl"))
        pulled = self.folder / "pulled"
        shutil.rmtree(pulled, ignore_errors=True)
        pulled.mkdir()
        self._pull_batches([n for n in names if n.startswith("batches/")])
        frames = self._download(results + segments, pulled)
        leftovers = sorted(self.folder.glob("journal-*.jsonl"))
        frames.extend(read_journal(j) for j in leftovers)
        if leftovers:  # a run on this machine was killed: what it had not shipped goes first
            try:
                self.ship()
            except objectstore.StoreError as exc:
                raise InputError(f"Cannot ship to {self} the answers a stopped run left in {self.folder}: {exc}") from None
            for j in leftovers:
                j.unlink()
            self._offsets.clear()
            self.say(f"pipeline: shipped the journal a stopped run left on this machine to {self}")
        frames = [f for f in frames if f.height]
        everything = newest(pl.concat(frames, how="vertical_relaxed")) if frames else pl.DataFrame(schema=STORED_SCHEMA)
        if frames:
            self._keep_locally(everything)
        if len(results) + len(segments) > COMPACT_AT:
            self._compact(everything, results + segments)
        shutil.rmtree(pulled, ignore_errors=True)
        return everything.filter(pl.col("status") == "ok").sort("request_key")

    def _download(self, names: list[str], into: Path) -> list[pl.DataFrame]:
        def fetch(name: str) -> pl.DataFrame:
            local = into / name.replace("/", "-")
            self.bucket.download(self.key(name), local)
            return conform(pl.read_parquet(local)) if name.endswith(".parquet") else read_journal(local)

        try:
            with concurrent.futures.ThreadPoolExecutor(DOWNLOADS) as pool:
                return list(pool.map(fetch, names))
        except objectstore.StoreError as exc:
            raise InputError(f"Cannot read the checkpoint {self}: {exc}") from None

    def _keep_locally(self, everything: pl.DataFrame) -> None:
        """The whole state as the local results file, for what reads the folder while the run goes on
        (`pipeline show`, the report)."""
        tmp = self.folder / "results.parquet.tmp"
        everything.write_parquet(tmp)
        os.replace(tmp, self.folder / "results.parquet")

    def _compact(self, everything: pl.DataFrame, names: list[str]) -> None:
        """One results file for many objects: written whole first, then the objects it holds are deleted
        (a kill in between leaves duplicates, which `newest` reads as one)."""
        try:
            self.bucket.upload(self.folder / "results.parquet", self.key(f"results-{self.run_id}.parquet"))
            self.bucket.delete_many([self.key(n) for n in names])
        except objectstore.StoreError as exc:  # the next run folds them instead
            self.say(f"pipeline: could not fold the checkpoint {self} into one file ({exc}); it stays as it is")

    def _pull_batches(self, names: list[str]) -> None:
        """Batch mode's ledger from the bucket, unless this machine's copy is there (it is never older)."""
        local = self.folder / "batches"
        if local.exists() or not names:
            return
        local.mkdir()
        for name in names:
            target = self.folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.bucket.download(self.key(name), target)
            stat = target.stat()
            self._ledger[name] = (stat.st_size, stat.st_mtime_ns)

    def start_journal(self, tag: str = "", *, hold: bool = False) -> str:
        name = super().start_journal(tag, hold=hold)
        if self._thread is None:
            self._thread = threading.Thread(target=self._shipping, name="pipeline-journal", daemon=True)
            self._thread.start()
        return name

    def append(self, result: tuple[object, ...]) -> None:
        super().append(result)
        if self.appended - self._mark >= SHIP_ROWS:
            self._mark = self.appended
            self._wake.set()

    def _shipping(self) -> None:
        """The thread: a shipment on each timer or count, the lock refreshed every HEARTBEAT."""
        beat = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(SHIP_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._ship_or_say()
            if self.lock is not None and time.monotonic() - beat >= HEARTBEAT:
                self.lock.beat()
                beat = time.monotonic()

    def _ship_or_say(self) -> bool:
        try:
            self.ship()
        except objectstore.StoreError as exc:
            if self._failing != str(exc):
                self.say(f"pipeline: the journal could not be shipped to {self} ({exc}); trying again")
                self._failing = str(exc)
            return False
        self._failing = None
        return True

    def ship(self) -> int:
        """Ship every whole line the local journals gained since the last shipment, as one new segment
        (and batch mode's files that changed); returns the answers shipped."""
        with self._ship_lock:
            chunks, offsets = [], {}
            for journal in sorted(self.folder.glob("journal-*.jsonl")):
                start = self._offsets.get(journal.name, 0)
                with journal.open("rb") as f:
                    f.seek(start)
                    data = f.read()
                end = data.rfind(b"\n") + 1  # a line still being written waits for the next shipment
                if end:
                    chunks.append(data[:end])
                    offsets[journal.name] = start + end
            self._ship_batches()
            if not chunks:
                return 0
            body = b"".join(chunks)
            self.bucket.put(self.key(f"journal/{self.run_id}-{self._seq:06d}.jsonl"), body)
            self._seq += 1
            self.segments += 1
            self._offsets.update(offsets)
            return body.count(b"\n")

    def _ship_batches(self) -> None:
        folder = self.folder / "batches"
        if not folder.is_dir():
            return
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(self.folder).as_posix()
            stat = path.stat()
            if self._ledger.get(name) != (stat.st_size, stat.st_mtime_ns):
                self.bucket.upload(path, self.key(name))
                self._ledger[name] = (stat.st_size, stat.st_mtime_ns)

    def close(self, *, discard_unused: bool = False) -> None:
        """Stop the thread, ship the rest, give the lock back; the working folder goes once all is shipped
        (kept, and named, when the bucket could not be reached: the next run here ships it)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        shipped = self._bucket is None or self._ship_or_say()
        super().close(discard_unused=discard_unused)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if shipped:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.folder.exists():
            self.say(
                f"pipeline: answers not yet shipped to {self} are kept in {self.folder}: the next run of this job on "
                "this machine ships them first."
            )


class JobLock:
    """The job's lock object: created only if absent (`If-None-Match: *`), refreshed by its holder, and taken
    over (`If-Match` on the stale version, so one contender wins) once its holder is known dead (same
    machine, process gone) or has not refreshed it for STALE_AFTER seconds by the server's clock. An
    endpoint without conditional writes gets a warning and no lock."""

    def __init__(self, bucket: objectstore.Bucket, key: str, run_id: str, *, say: Callable[[str], None]) -> None:
        self.bucket, self.key, self.say = bucket, key, say
        self.body = orjson.dumps(
            {"run": run_id, "host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(), "started": time.time()}
        )
        self.etag: str | None = None

    @property
    def url(self) -> str:
        return self.bucket.url(self.key)

    def acquire(self) -> JobLock:
        try:
            self.etag = self.bucket.put(self.key, self.body, if_none_match=True)
            return self
        except objectstore.Unsupported:
            self.say(
                f"pipeline: warning: the object store does not do conditional writes, so {self.url} cannot lock this "
                "job: a second run of it started now would not be stopped (and could pay for rows twice)."
            )
            return self
        except objectstore.Conflict:
            pass
        head = self.bucket.head(self.key)
        if head is None:  # released meanwhile: one more try, as any contender
            return self._take(None)
        holder = _holder(self.bucket.get(self.key))
        age = (head.server_now - head.last_modified).total_seconds()
        if _dead(holder) or age >= STALE_AFTER:
            return self._take(head.etag, holder, age)
        if age > 2 * HEARTBEAT:  # not refreshed lately: wait until it would be stale, then look once more
            self.say(f"pipeline: {self.url} was last refreshed {age:.0f} s ago; waiting up to {STALE_AFTER - age:.0f} s")
            time.sleep(STALE_AFTER - age)
            later = self.bucket.head(self.key)
            if later is None or later.etag == head.etag:
                return self._take(later.etag if later else None, holder, STALE_AFTER)
        raise JobBusy(
            f"Another pipeline run holds this job ({_who(holder)}, lock {self.url} refreshed {age:.0f} s ago). Wait for it "
            f"to finish; a run that was killed lets go of it after {STALE_AFTER:.0f} s."
        )

    def _take(self, etag: str | None, holder: dict[str, object] | None = None, age: float = 0.0) -> JobLock:
        try:
            self.etag = (
                self.bucket.put(self.key, self.body, if_match=etag)
                if etag is not None
                else self.bucket.put(self.key, self.body, if_none_match=True)
            )
        except objectstore.Conflict:
            raise JobBusy(f"Another pipeline run took this job's lock {self.url} just now. Wait for it to finish.") from None
        if holder is not None:
            self.say(f"pipeline: took over the lock of a run that stopped ({_who(holder)}, last seen {age:.0f} s ago)")
        return self

    def beat(self) -> None:
        """Refresh the lock (a new version, a new LastModified). Losing it is said, not fatal."""
        if self.etag is None:
            return
        try:
            self.etag = self.bucket.put(self.key, self.body, if_match=self.etag)
        except objectstore.Conflict:
            self.say(f"pipeline: warning: another run took this job's lock {self.url}; two runs may now send the same rows")
            self.etag = None
        except objectstore.StoreError:
            pass  # the network: the next beat tries again, well within STALE_AFTER

    def release(self) -> None:
        if self.etag is None:
            return
        with contextlib.suppress(objectstore.StoreError):
            try:
                self.bucket.delete(self.key, if_match=self.etag)
            except objectstore.Unsupported:  # no conditional delete: delete it if it is still ours
                head = self.bucket.head(self.key)
                if head is not None and head.etag == self.etag:
                    self.bucket.delete(self.key)
        self.etag = None


def _holder(body: bytes | None) -> dict[str, object]:
    try:
        found = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def _who(holder: dict[str, object]) -> str:
    return f"process {holder.get('pid', '?')} on {holder.get('host', 'an unknown host')}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _dead(holder: dict[str, object]) -> bool:
    """The holder ran on this machine, since its last boot, and its process is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or holder.get("boot") != _boot_id() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process whose parent died too stays a zombie where nothing reaps orphans (a container's init)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def open_checkpoint(folder: Path, remote: storage.Url | None, say: Callable[[str], None]) -> Checkpoint:
    """The job's checkpoint: local, or shipped to object storage."""
    return ShippedCheckpoint(folder, remote, say=say) if remote is not None else Checkpoint(folder)


def clean_output_leftovers(output: storage.Url, say: Callable[[str], None]) -> None:
    """A killed run's upload of this output: its unfinished multipart uploads (billed, listed nowhere
    else) and a finished temporary copy. Called while the job is held, so no live run owns them."""
    bucket = objectstore.Bucket(output.bucket)
    folder = output.key.rsplit("/", 1)[0] + "/" if "/" in output.key else ""
    temporary = f"{folder}.{output.name}."

    def ours(key: str) -> bool:
        return key == output.key or (key.startswith(temporary) and key.endswith(".uploading"))

    try:
        aborted = bucket.abort_uploads(folder, ours)
        stale = [k for k in bucket.keys(temporary) if ours(k)]
        if stale:
            bucket.delete_many(stale)
    except objectstore.StoreError as exc:
        say(f"pipeline: could not look for unfinished uploads of {output}: {exc}")
        return
    if aborted or stale:
        say(f"pipeline: cleaned up after a stopped run: {len(aborted)} unfinished upload(s) of {output} aborted")


def read_done(remote: storage.Url) -> pl.DataFrame:
    """The `ok` answers kept in a checkpoint in object storage, without its lock (`pipeline estimate`)."""
    bucket = objectstore.Bucket(remote.bucket)
    frames = []
    for key in sorted(bucket.keys(f"{remote.key}/")):
        name = key.removeprefix(f"{remote.key}/")
        body = bucket.get(key) if name.startswith(("results-", "journal/")) else None
        if body:
            frames.append(conform(pl.read_parquet(body)) if name.endswith(".parquet") else _journal_bytes(body))
    everything = newest(pl.concat([pl.DataFrame(schema=STORED_SCHEMA), *frames], how="vertical_relaxed"))
    return everything.filter(pl.col("status") == "ok").sort("request_key")


def pull_ledger(remote: storage.Url, into: Path) -> None:
    """Batch mode's files as the bucket holds them, into `into` (a copy to read, without the job's lock:
    `pipeline batch status`)."""
    bucket = objectstore.Bucket(remote.bucket)
    prefix = f"{remote.key}/"
    for key in bucket.keys(f"{prefix}batches/"):
        target = into.joinpath(*key.removeprefix(prefix).split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        bucket.download(key, target)


def _journal_bytes(body: bytes) -> pl.DataFrame:
    import io

    return pl.read_ndjson(io.BytesIO(body), schema=STORED_SCHEMA)


def publish(local: Path, url: storage.Url, say: Callable[[str], None]) -> bool:
    """Upload a finished file beside the output (the metrics file, the report); a failure is said, not fatal."""
    try:
        objectstore.Bucket(url.bucket).put(url.key, local.read_bytes())
    except (objectstore.StoreError, OSError) as exc:
        say(f"pipeline: could not upload {local} to {url}: {exc}")
        return False
    return True
