"""The batch ledger (`<checkpoint>/batches/ledger.jsonl`): append-only, one fsync per line, a torn last
line ignored. The request file is written and `prepared` recorded before any network call, `created`
as soon as the provider answers; replaying the events gives each batch's state (an `Entry`)."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

BATCHES, LEDGER = "batches", "ledger.jsonl"


@dataclass
class Entry:
    """One batch file, from `prepared` to `folded`."""

    local: str
    n: int = 0
    ts: float = 0.0
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    folded: bool = False
    lost: bool = False

    @property
    def open(self) -> bool:
        """Not yet folded: its keys must not be sent again."""
        return not self.folded and not self.lost


class Ledger:
    """What was submitted and what became of it, in the checkpoint folder."""

    def __init__(self, checkpoint: Path) -> None:
        self.folder = checkpoint / BATCHES
        self.path = self.folder / LEDGER

    def append(self, event: str, **fields: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps({"event": event, "ts": time.time(), **fields}) + b"\n"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a line torn by a kill: end it, so this event stands on a line of its own
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        for raw in self.path.read_bytes().splitlines():
            try:
                yield orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a torn last line: the event it began did not happen as far as anyone knows

    def entries(self) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for e in self.events():
            local = e.get("local")
            if local is None:
                continue
            entry = found.setdefault(local, Entry(local))
            kind = e["event"]
            if kind == "prepared":
                entry.n, entry.ts = e["n"], e["ts"]
            elif kind == "uploaded":
                entry.file_id = e["file_id"]
            elif kind == "created":
                entry.batch_id, entry.status = e["batch_id"], e.get("status")
            elif kind == "status":
                entry.status, entry.counts = e["status"], e.get("counts") or {}
            elif kind == "folded":
                entry.folded = True
            elif kind == "lost":
                entry.lost = True
        return found

    def failed(self) -> dict[str, str]:
        """Keys whose answer was a permanent refusal: recorded as errors, never sent again."""
        out: dict[str, str] = {}
        for e in self.events():
            if e["event"] == "folded":
                out.update(e.get("failed") or {})
        return out

    def requests_file(self, local: str) -> Path:
        return self.folder / f"{local}.requests.jsonl"

    def keys_of(self, local: str) -> list[str]:
        path = self.requests_file(local)
        if not path.exists():
            return []
        return [orjson.loads(raw)["custom_id"] for raw in path.read_bytes().splitlines() if raw.strip()]

    def submissions(self, entries: Mapping[str, Entry]) -> Counter[str]:
        """How many created batches held each key: its attempts so far."""
        counts: Counter[str] = Counter()
        for entry in entries.values():
            if entry.batch_id is not None:
                counts.update(self.keys_of(entry.local))
        return counts

    def forget_orphans(self, entries: Mapping[str, Entry]) -> None:
        """Request files written by a run killed before it recorded `prepared`: never submitted."""
        if not self.folder.exists():
            return
        for path in self.folder.glob("*.requests.jsonl"):
            if path.name.removesuffix(".requests.jsonl") not in entries:
                path.unlink(missing_ok=True)
