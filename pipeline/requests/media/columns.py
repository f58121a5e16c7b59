"""Image and document columns (--image-column): each row's cells read while its batch is rendered,
typed by their magic bytes, checked against the provider's limits and hashed, into a small descriptor
(JSON, about a hundred bytes a cell); the bytes are not kept. They are read again when the row's
request is built, and checked against the hash: what is sent is what the key names.

Per cell, at render time:
  - a local path, file://, s3://, data: URL or binary cell: its bytes streamed through blake2b, the
    type sniffed, the size and (for images) the pixel size or (for PDFs) the pages read as they pass;
  - an http(s) URL: sent as it is, not fetched, and keyed by the URL, unless --inline-images (or a
    PDF for a provider that takes none by URL), when it is fetched and keyed by its bytes.
A cell that cannot be sent (missing, of a type no provider takes, over a limit) gives the row its
reason ("not sent: ..."); the row is written with it and the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.requests.media import kinds
from pipeline.requests.media.kinds import IMAGES, PDF, Attachment
from pipeline.requests.media.rules import Rules, b64_size
from pipeline.requests.media.sources import Ref, Unreadable, chunks, resolve, size_of

MEDIA, MEDIA_KEY, MEDIA_SKIP, MEDIA_KIND = "__media", "__media_key", "__media_skip", "__media_kind"
MEDIA_TOKENS, MEDIA_MOST, MEDIA_BYTES = "__media_tokens", "__media_most", "__media_bytes"
READERS = 16  # cells read at once while a batch renders: the reads wait on disks and servers, not the CPU
DOCUMENT_SUFFIXES = (".pdf",)


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell as rendered: where its bytes are, what they are, what they cost."""

    column: str
    ref: Ref
    mime: str
    digest: str | None  # None: an http(s) URL sent as it is
    size: int
    tokens: int
    most: int
    pages: int | None = None

    @property
    def key(self) -> str:
        return f"url:{self.ref.where}" if self.digest is None else f"{self.mime}:{self.digest}"

    def descriptor(self) -> dict[str, Any]:
        return {"c": self.column, "s": self.ref.scheme, "w": self.ref.where, "v": self.ref.shown, "m": self.mime,
                "d": self.digest, "n": self.size, "p": self.pages}  # fmt: skip


class Refusal(NamedTuple):
    """Why a cell (or a row's cells together) cannot be sent, and the kind the run counts it under."""

    why: str
    kind: str  # image_missing, image_unreadable, image_type, image_too_large; not_sent for an empty cell


@dataclass(frozen=True)
class MediaColumns:
    """The job's image columns, where relative paths are read from, and the provider's rules."""

    columns: tuple[str, ...]
    rules: Rules
    bases: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd(),))
    inline: bool = False  # --inline-images: http(s) images fetched and sent as data, keyed by their bytes
    null_as_empty: bool = False  # a null or empty cell: the row is sent without that image

    def check(self, schema: pl.Schema, where: str) -> str | None:
        """Why a column cannot hold images (its type), or None."""
        for c in self.columns:
            dtype = schema[c]
            if dtype not in (pl.String, pl.Binary, pl.Null) and not isinstance(dtype, pl.Categorical | pl.Enum):
                return (
                    f"Column {c!r} of {where} holds {dtype} values, but an image column holds, per row, a file's path, "
                    "an http(s):// URL, an s3:// address, a data: URL or the image's bytes (a binary column)."
                )
        return None

    def render(self, df: pl.DataFrame, skip: Sequence[str | None]) -> pl.DataFrame:
        """The media columns for `df`'s rows: descriptor, key part, reason not to send (and its kind),
        typical and most tokens, bytes to load. Rows `skip` already holds back are not read."""
        n = df.height
        series = {c: df.get_column(c) for c in self.columns}
        todo = [(row, c) for row in range(n) if skip[row] is None for c in self.columns]
        # Each reader takes its cell from the column itself: a binary column's bytes are not copied out for the batch.
        with ThreadPoolExecutor(max_workers=min(READERS, max(1, len(todo))), thread_name_prefix="pipeline-media") as pool:
            read = list(pool.map(lambda t: self._cell(t[1], series[t[1]][t[0]]), todo))
        per_row: dict[int, list[Cell | Refusal | None]] = {}
        for (row, _), got in zip(todo, read, strict=True):
            per_row.setdefault(row, []).append(got)
        out: dict[str, list[Any]] = {k: [None] * n for k in (MEDIA, MEDIA_KEY, MEDIA_SKIP, MEDIA_KIND)}
        out.update({k: [0] * n for k in (MEDIA_TOKENS, MEDIA_MOST, MEDIA_BYTES)})
        for row, cells in per_row.items():
            sent = [c for c in cells if isinstance(c, Cell)]
            refused = next((c for c in cells if isinstance(c, Refusal)), None) or self._request_problem(sent)
            if refused is not None:
                out[MEDIA_SKIP][row], out[MEDIA_KIND][row] = f"not sent: {refused.why}", refused.kind
                continue
            out[MEDIA][row] = orjson.dumps([c.descriptor() for c in sent]).decode()
            out[MEDIA_KEY][row] = "\x1e".join(c.key for c in sent)
            out[MEDIA_TOKENS][row] = sum(c.tokens for c in sent)
            out[MEDIA_MOST][row] = sum(c.most for c in sent)
            out[MEDIA_BYTES][row] = sum(c.size for c in sent if c.digest is not None)
        schema = {MEDIA: pl.String, MEDIA_KEY: pl.String, MEDIA_SKIP: pl.String, MEDIA_KIND: pl.String,
                  MEDIA_TOKENS: pl.Int64, MEDIA_MOST: pl.Int64, MEDIA_BYTES: pl.Int64}  # fmt: skip
        return pl.DataFrame(out, schema=schema)

    def check_first(self, frame: pl.DataFrame, where: str) -> None:
        """Refuse the job (InputError, exit 2) when not one image cell of `frame` (the table's first rows)
        can be sent: a wrong folder, credentials or setting, not bad rows, and every row would fail alike.
        Cells that fail among others that load are left to their rows."""
        cells = [(row, c, frame.get_column(c)[row]) for row in range(frame.height) for c in self.columns]
        tried = [(row, c, v) for row, c, v in cells if v is not None and not (isinstance(v, str) and not v.strip())]
        if not tried:
            return
        results = [self._cell(c, v) for _, c, v in tried]
        if any(not isinstance(r, Refusal) for r in results):
            return
        first = results[0]
        assert isinstance(first, Refusal)
        hint = {
            "image_missing": "A relative path is read from the input's folder, then the current one: check the paths, or "
            "give absolute ones.",
            "image_type": "Convert the files to PNG, JPEG, GIF or WebP (or PDF for documents).",
            "image_too_large": "Shrink the files, or send fewer image columns.",
        }.get(first.kind, "Check the addresses, and for s3:// the AWS credentials and endpoint in the environment.")
        raise InputError(
            f"Not one image of the first {len(tried)} in {where} can be sent, so nothing was: row {tried[0][0] + 1}, "
            f"{first.why}. {hint}"
        )

    def _cell(self, column: str, value: Any) -> Cell | Refusal | None:
        """One cell read and checked: a Cell, why it cannot be sent, or None (empty, and left out)."""
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, bytes) and not value):
            if self.null_as_empty:
                return None
            return Refusal(f"column '{column}' is {'null' if value is None else 'empty'} in this row", "not_sent")
        try:
            ref = resolve(value, self.bases)
            if ref.scheme == "http" and not self._fetch(ref):
                # Not fetched, so not typed: an image unless the URL names a .pdf, at the rule's most tokens.
                if _names_pdf(ref):
                    return Cell(column, ref, PDF, None, 0, *self.rules.document_tokens(None))
                return Cell(column, ref, kinds.ANY_IMAGE, None, 0, self.rules.image_most, self.rules.image_most)
            return self._read(column, ref, value)
        except Unreadable as exc:
            return Refusal(f"column '{column}': {exc.message}", exc.kind)

    def _fetch(self, ref: Ref) -> bool:
        """Whether an http(s) cell is fetched (and inlined) rather than sent as its URL."""
        if self.inline:
            return True
        return _names_pdf(ref) and not self.rules.document_urls  # OpenAI's file parts take no URL

    def _read(self, column: str, ref: Ref, value: Any) -> Cell | Refusal:
        rules = self.rules
        known = size_of(ref, value)
        digest = blake2b(digest_size=16)
        head, size, mime, limit = b"", 0, "", 0
        pages: kinds.PageCounter | None = None
        for chunk in _whole_head(chunks(ref, value)):
            if not mime:  # the first chunk holds the head: the type, its limit, a JPEG's size
                head = chunk[: kinds.HEAD]
                found = kinds.sniff(head)
                if found is None:
                    what = kinds.describe_other(head)
                    return Refusal(
                        f"column '{column}': {ref.shown} is {what}, not an image {rules.name} takes "
                        f"({', '.join(sorted(kinds.LABELS[m] for m in IMAGES))}) nor a PDF; convert it to PNG or JPEG",
                        "image_missing" if what == "empty" else "image_type",
                    )
                mime, limit = found, _raw_limit(rules, found)
                if known is not None and (why := rules.too_big(mime, known)):
                    return Refusal(f"column '{column}': {ref.shown} {why}; shrink it before the run", "image_too_large")
                pages = kinds.PageCounter() if mime == PDF else None
            size += len(chunk)
            if size > limit:  # a source of unknown size: reading stops here
                return Refusal(
                    f"column '{column}': {ref.shown} is more than {limit:,} bytes, {rules.over(mime)}; shrink it",
                    "image_too_large",
                )
            digest.update(chunk)
            if pages is not None:
                pages.feed(chunk)
        if not mime:
            return Refusal(f"column '{column}': {ref.shown} is empty", "image_missing")
        if pages is not None:
            typical, most = rules.document_tokens(pages.pages)
            return Cell(column, ref, mime, digest.hexdigest(), size, typical, most, pages.pages)
        dims = kinds.dimensions(mime, head)
        if dims is not None and rules.max_edge is not None and max(dims) > rules.max_edge:
            return Refusal(
                f"column '{column}': {ref.shown} is {dims[0]} x {dims[1]} px, over {rules.name}'s {rules.max_edge} px a "
                "side; scale it down before the run",
                "image_too_large",
            )
        tokens = rules.image_tokens(dims)
        return Cell(column, ref, mime, digest.hexdigest(), size, tokens, tokens)

    def _request_problem(self, sent: Sequence[Cell]) -> Refusal | None:
        """Why one row's attachments together are over the provider's limits for a request, or None."""
        rules = self.rules
        encoded = sum(b64_size(c.size) for c in sent)
        if rules.request_bytes is not None and encoded > rules.request_bytes:
            return Refusal(
                f"this row's images and documents come to {encoded / 1e6:,.1f} MB as base64, over {rules.name}'s "
                f"{rules.request_bytes / 1e6:,.0f} MB a request; shrink them or send fewer columns",
                "image_too_large",
            )
        image_bytes = sum(c.size for c in sent if c.mime in IMAGES)
        if rules.image_request_bytes is not None and image_bytes > rules.image_request_bytes:
            return Refusal(
                f"this row's images come to {image_bytes / 1e6:,.1f} MB, over {rules.name}'s "
                f"{rules.image_request_bytes / 1e6:,.0f} MB of images a request; shrink them",
                "image_too_large",
            )
        pages = sum(c.pages or 0 for c in sent)
        if pages > rules.pages_per_request:
            return Refusal(
                f"this row's PDFs have {pages} pages, over {rules.name}'s {rules.pages_per_request} a request; split them",
                "image_too_large",
            )
        return None

    def load(self, descriptor: str, frame: pl.DataFrame | None, row: int) -> list[Attachment]:
        """The row's attachments, read again (blocking: call it in a thread). Raises Unreadable when a
        file went missing or changed since the batch was rendered: the key was made from the bytes read
        then, and an answer to other bytes must not be kept under it."""
        out = []
        for item in orjson.loads(descriptor):
            ref = Ref(item["s"], item["w"], item["v"])
            if item["d"] is None:
                out.append(Attachment(item["m"], None, url=ref.where, name=ref.name))
                continue
            cell = frame.get_column(item["c"])[row] if ref.scheme in ("cell", "data") and frame is not None else None
            data = b"".join(chunks(ref, cell))
            if blake2b(data, digest_size=16).hexdigest() != item["d"]:
                raise Unreadable(
                    f"column '{item['c']}': {ref.shown} changed after this run read it ({item['n']:,} bytes then, "
                    f"{len(data):,} now): its answer would be kept under the old image's key. Run the same command "
                    "again to send it as it is now",
                    kind="image_changed",
                )
            out.append(Attachment(item["m"], data, name=file_name(ref, item["m"])))
        return out


def _names_pdf(ref: Ref) -> bool:
    return ref.where.lower().split("?")[0].split("#")[0].endswith(DOCUMENT_SUFFIXES)


def _whole_head(stream: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks of `stream`, the first one at least `kinds.HEAD` bytes long (or the whole file), so
    that the type and a JPEG's size are read from one piece whatever the source's chunking."""
    first = bytearray()
    for chunk in stream:
        first += chunk
        if len(first) >= kinds.HEAD:
            break
    yield bytes(first)
    yield from stream


def _raw_limit(rules: Rules, mime: str) -> int:
    """The most bytes a file of `mime` may have: reading stops past it."""
    if mime in IMAGES:
        return rules.image_bytes * 3 // 4 if rules.b64_limit else rules.image_bytes
    return rules.document_bytes


def file_name(ref: Ref, mime: str) -> str:
    """The name a provider is shown for a file: its own, with the extension its type has."""
    name = ref.name
    ext = kinds.EXTENSIONS.get(mime, "bin")
    return name if name.lower().endswith("." + ext) else f"{os.path.splitext(name)[0] or 'file'}.{ext}"


def bases_for(files: Sequence[object]) -> tuple[Path, ...]:
    """Where relative paths in image cells are looked for: the input's folder when every input file is
    local and in one folder, then the current folder."""
    cwd = Path.cwd()
    folders = {Path(os.path.abspath(f)).parent for f in files if isinstance(f, Path)}
    if len(folders) == 1 and len(files) == sum(isinstance(f, Path) for f in files):
        folder = folders.pop()
        return (folder,) if folder == cwd else (folder, cwd)
    return (cwd,)
