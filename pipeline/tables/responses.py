"""Provider responses as received, for an output that hands them back: OpenAI batch-output lines.

A job whose input is a file of batch requests and whose output is batch-output lines keeps, in
its checkpoint folder, what the provider answered each request:

    responses/<ns>-<pid>.jsonl   one JSON line per answer: the request key (`k`), the HTTP status
                                 (`s`), the request id (`r`), the line id a batch gave (`i`) and the
                                 body as received (`b`); or `e`, the provider's own error object, for
                                 a batch line that had no response (expired, cancelled)

Lines are appended unbuffered as answers arrive (a kill loses nothing written) and the newest
line of a key wins. The output reads them once, at its commit, through an index of offsets, so
memory grows with the rows, not with the bodies. API keys the run holds are masked in every body
before it is written, as they are in every message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

FOLDER = "responses"
MIN_SECRET = 8  # as providers.MIN_SECRET: shorter "keys" are placeholders, and masking them would mangle bodies


class ResponseLog:
    """Appends the responses of one process to its own file in `<checkpoint>/responses/`."""

    def __init__(self, checkpoint: Path, secrets: tuple[str, ...] = ()) -> None:
        self.folder = checkpoint / FOLDER
        self._secrets = [s.encode() for s in secrets if len(s) >= MIN_SECRET]
        self._fd: int | None = None

    def _write(self, line: dict[str, Any]) -> None:
        if self._fd is None:  # made on the first answer: a run that answers nothing leaves no folder behind
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
            self._fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        data = orjson.dumps(line) + b"\n"
        for secret in self._secrets:
            data = data.replace(secret, b"***")
        os.write(self._fd, data)

    def response(self, key: str, status: int, request_id: str | None, body: bytes, line_id: str | None = None) -> None:
        """The HTTP answer to a request: its status and body as received (JSON, or the text of a body that is not)."""
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = body.decode("utf-8", "replace")
        self._write({"k": key, "s": status, "r": request_id, "i": line_id, "b": parsed})

    def error(self, key: str, error: Mapping[str, Any], line_id: str | None = None) -> None:
        """A batch line the provider answered with an error object and no response."""
        self._write({"k": key, "i": line_id, "e": dict(error)})

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def index(checkpoint: Path) -> dict[str, tuple[Path, int, int]]:
    """key -> (file, offset, length) of its newest line, over every file of the folder (oldest first)."""
    found: dict[str, tuple[Path, int, int]] = {}
    folder = checkpoint / FOLDER
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.jsonl")):
        offset = 0
        with path.open("rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):  # a torn last line (a kill in mid-write) is not an answer
                    try:
                        key = orjson.loads(raw)["k"]
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        key = None
                    if isinstance(key, str):
                        found[key] = (path, offset, len(raw))
                offset += len(raw)
    return found


def read(where: tuple[Path, int, int]) -> dict[str, Any]:
    path, offset, length = where
    with path.open("rb") as f:
        f.seek(offset)
        line: dict[str, Any] = orjson.loads(f.read(length))
    return line
