"""Where an image cell's bytes come from, read as a stream of chunks: a local path (or file://), an
http(s):// URL, an s3:// object, a data: URL, or the cell itself (a binary column).

A relative path is looked for in each of the run's base folders in turn (the input table's folder,
then the current one: see `media.columns`). Every failure is an `Unreadable` whose message names the
cell and says why: it becomes the row's reason, never an exception that ends the run. Nothing here
keeps bytes: the caller hashes them as they pass, or holds them for one request.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.tables import storage

CHUNK = 1 << 20  # bytes read at a time: a 20 MB image never sits whole in a reader's memory
HTTP_TIMEOUT = 60.0  # seconds for one image from a web server
HTTP_ATTEMPTS = 2  # a 5xx, a timeout or a dropped connection is tried once more
USER_AGENT = "pipeline (batch LLM inference; images for --inline-images)"

Scheme = Literal["file", "http", "s3", "data", "cell"]


class Unreadable(Exception):
    """A cell whose bytes cannot be had; the message says which cell and why, and `kind` counts it."""

    def __init__(self, message: str, kind: str = "image_unreadable") -> None:
        super().__init__(message)
        self.message, self.kind = message, kind


@dataclass(frozen=True, slots=True)
class Ref:
    """Where one cell's bytes are: a file, a URL, an object, or the cell's own text or bytes."""

    scheme: Scheme
    where: str  # the file's path, the URL, the s3:// address; "" for data: and binary cells
    shown: str  # the cell as the user wrote it, shortened for messages

    @property
    def name(self) -> str:
        """A file name for the provider (OpenAI's file parts want one)."""
        if self.scheme in ("data", "cell"):
            return "file"
        tail = urllib.parse.urlsplit(self.where).path if self.scheme != "file" else self.where
        return tail.rstrip("/").rsplit("/", 1)[-1] or "file"


def shorten(text: str, most: int = 120) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def resolve(cell: Any, bases: Sequence[Path]) -> Ref:
    """Where a cell's bytes are. A relative path is taken from the first base folder that has it."""
    if isinstance(cell, bytes | bytearray | memoryview):
        return Ref("cell", "", f"<{len(cell):,} bytes>")
    text = str(cell).strip()
    shown = shorten(text)
    low = text[:10].lower()
    if low.startswith(("http://", "https://")):
        return Ref("http", text, shown)
    if low.startswith("s3://"):
        storage.Url.parse(text)  # refuses an address with no key, as an input's would be
        return Ref("s3", text, shown)
    if low.startswith("data:"):
        return Ref("data", "", shorten(text, 40))
    if low.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    elif "://" in text[:12]:
        raise Unreadable(
            f"{shown} is not an address pipeline reads: give a local path, an http(s):// URL or an s3:// address",
            kind="image_unreadable",
        )
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [base / path for base in bases]
    for found in candidates:
        if found.is_file():
            return Ref("file", str(found), shown)
    if any(c.is_dir() for c in candidates):
        raise Unreadable(f"{shown} is a folder, not a file", kind="image_missing")
    # The folders by their full paths: the same message from a Ray actor (whose current folder is its own) as from here.
    looked = "" if path.is_absolute() else f" (looked in {', '.join(str(b) for b in bases)})"
    raise Unreadable(f"file {shown} does not exist{looked}", kind="image_missing")


def chunks(ref: Ref, cell: Any) -> Iterator[bytes]:
    """The cell's bytes, a chunk at a time; raises Unreadable. `cell` is the cell itself (data: and binary)."""
    if ref.scheme == "cell":
        yield bytes(cell)
    elif ref.scheme == "data":
        yield _data_url(str(cell).strip(), ref)
    elif ref.scheme == "file":
        try:
            with open(ref.where, "rb", buffering=0) as f:
                # Reads of the file's own size (one byte more, to see its end), not of CHUNK: CPython
                # allocates what read(n) asks before it shrinks to what came, a megabyte for every image.
                left = os.fstat(f.fileno()).st_size
                while chunk := f.read(min(CHUNK, left + 1)):
                    left -= len(chunk)
                    if left < 0:  # the file grew as it was read: on in whole chunks (its hash will say so)
                        left = CHUNK
                    yield chunk
        except FileNotFoundError:
            raise Unreadable(f"file {ref.shown} no longer exists", kind="image_missing") from None
        except OSError as exc:
            raise Unreadable(f"file {ref.shown} could not be read: {exc.strerror or exc}") from None
    elif ref.scheme == "http":
        yield from _http(ref)
    else:
        yield from _s3(ref)


def size_of(ref: Ref, cell: Any) -> int | None:
    """The size in bytes when it is known without reading (a file's, a binary cell's), else None."""
    if ref.scheme == "cell":
        return len(cell)
    if ref.scheme == "file":
        try:
            return Path(ref.where).stat().st_size
        except OSError:
            return None
    return None


def _data_url(text: str, ref: Ref) -> bytes:
    header, comma, body = text.partition(",")
    if not comma:
        raise Unreadable(f"{ref.shown} is not a data: URL (no comma before its data)")
    try:
        if header.lower().endswith(";base64"):
            return base64.b64decode(body, validate=False)
        return urllib.parse.unquote_to_bytes(body)
    except (binascii.Error, ValueError):
        raise Unreadable(f"{ref.shown}: its base64 data is damaged") from None


def _http(ref: Ref) -> Iterator[bytes]:
    request = urllib.request.Request(ref.where, headers={"User-Agent": USER_AGENT})
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as reply:
                first = True
                while chunk := reply.read(CHUNK):
                    first = False
                    yield chunk
                if first:
                    yield b""
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == HTTP_ATTEMPTS:
                raise Unreadable(f"{ref.shown} answered HTTP {exc.code} ({exc.reason})", kind="image_unreadable") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == HTTP_ATTEMPTS:
                why = getattr(exc, "reason", exc)
                raise Unreadable(f"{ref.shown} could not be fetched: {why}", kind="image_unreadable") from None


_FS: list[Any] = []  # one S3 filesystem for the process (pyarrow's is thread-safe); made on first use
_FS_LOCK = threading.Lock()


def _filesystem() -> Any:
    with _FS_LOCK:
        if not _FS:
            _FS.append(storage.filesystem())
        return _FS[0]


def _s3(ref: Ref) -> Iterator[bytes]:
    url = storage.Url.parse(ref.where)
    try:
        with _filesystem().open_input_stream(url.fs_path) as src:
            while chunk := src.read(CHUNK):
                yield chunk
    except FileNotFoundError:
        raise Unreadable(f"{ref.shown} does not exist in the bucket", kind="image_missing") from None
    except OSError as exc:
        raise Unreadable(str(storage.explain(exc, url, "read")).removeprefix("Cannot read ")) from None
