"""What an image or document holds, read from its bytes: its type by the magic bytes it starts with
(never its file name), its pixel size from the image's header, a PDF's page count.

Parsed by hand from the formats' headers rather than with an imaging library: a cell's file is read
once, hashed as it streams past, and never decoded, so only a few hundred bytes of its start are
looked at (a JPEG's size sits after its metadata segments: `HEAD` bytes are kept for it).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

HEAD = 256 << 10  # bytes kept from a file's start: its type, and a JPEG's size after EXIF, ICC and XMP segments

PNG, JPEG, GIF, WEBP, PDF = "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"
IMAGES = frozenset({PNG, JPEG, GIF, WEBP})  # what every provider here takes as an image
ANY_IMAGE = "image/*"  # an image sent by its URL, not fetched: its exact type is the provider's to find
LABELS = {PNG: "PNG", JPEG: "JPEG", GIF: "GIF", WEBP: "WebP", PDF: "PDF"}
EXTENSIONS = {PNG: "png", JPEG: "jpg", GIF: "gif", WEBP: "webp", PDF: "pdf"}


@dataclass(frozen=True, slots=True)
class Attachment:
    """One image or document as a request carries it: its bytes (`data`), or the URL the provider
    fetches itself (`url`, with `data` None)."""

    mime: str
    data: bytes | None
    url: str | None = None
    name: str = "file"  # a file name to show the provider (OpenAI's file parts want one)

    @property
    def document(self) -> bool:
        return self.mime == PDF


def sniff(head: bytes) -> str | None:
    """The MIME type of a file from its first bytes, for the types a provider takes; None for any other."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head.find(b"%PDF-", 0, 1024) >= 0:  # the header may follow a little junk (PDF 1.7, annex H)
        return PDF
    return None


# Types a user may well have in an image column, named in the refusal so that it says what to convert.
_OTHERS: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "a TIFF image"),
    (b"MM\x00*", 0, "a TIFF image"),
    (b"BM", 0, "a BMP image"),
    (b"\x00\x00\x01\x00", 0, "an ICO icon"),
    (b"8BPS", 0, "a Photoshop document"),
    (b"PK\x03\x04", 0, "a ZIP archive (or a Word, Excel or PowerPoint file)"),
    (b"\xd0\xcf\x11\xe0", 0, "an old Office document"),
    (b"<svg", 0, "an SVG drawing"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", 0, "a JPEG 2000 image"),
)
_FTYP = {b"heic": "a HEIC photo", b"heix": "a HEIC photo", b"mif1": "a HEIF image", b"avif": "an AVIF image"}


def describe_other(head: bytes) -> str:
    """What a file of a type no provider takes seems to be, for the message that refuses it."""
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP:
        return _FTYP[head[8:12]]
    for magic, at, what in _OTHERS:
        if head[at : at + len(magic)] == magic:
            return what
    if not head:
        return "empty"
    start = head[:512].lstrip()
    if start.startswith(b"<?xml") and b"<svg" in start:
        return "an SVG drawing"
    if start[:1] in (b"<", b"{", b"[") or _looks_like_text(head):
        return "text"
    return "of a type not recognised"


def _looks_like_text(head: bytes) -> bool:
    try:
        head[:512].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def dimensions(mime: str, head: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels from an image's header; None when the header does not say (or is cut)."""
    try:
        if mime == PNG and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return int(w), int(h)
        if mime == GIF:
            w, h = struct.unpack("<HH", head[6:10])
            return int(w), int(h)
        if mime == WEBP:
            return _webp(head)
        if mime == JPEG:
            return _jpeg(head)
    except struct.error:
        return None
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the frame's start code
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and head[20:21] == b"\x2f":  # lossless: two 14-bit fields, each stored minus one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit canvas sizes, each stored minus one
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


# Start-of-frame markers carry the size; C4 (Huffman tables), C8 (reserved) and CC (arithmetic coding) do not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(head: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None  # not at a marker: a damaged file
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _SOF:
            h, w = struct.unpack(">HH", head[i + 5 : i + 9])
            return w, h
        if marker == 0xDA:  # start of scan: no frame header came before it
            return None
        i += 2 + length
    return None


# A page object; `/Type /Pages` (the tree's nodes) is not one.
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]{0,400}?/Count\s+(\d{1,6})|/Count\s+(\d{1,6})[^>]{0,400}?/Type\s*/Pages\b")
# An object stream: its dictionary, then the keyword after which its compressed bytes start.
_OBJSTM = re.compile(rb"/Type\s*/ObjStm(?![A-Za-z]).{0,1000}?stream\r?\n", re.DOTALL)
_TAIL = 2048  # bytes carried from one chunk to the next, so that a marker split by a chunk boundary is found
_MOST_INFLATED = 64 << 20  # an object stream inflated past this is left: a bomb, not a page tree


class PageCounter:
    """Counts a PDF's page objects as its bytes stream past, inside compressed object streams too
    (PDF 1.5 files often keep their page objects there); falls back to the page tree's /Count.

    An estimate, not a parser: an incrementally updated file may count a page twice, and a stream
    compressed other than with Flate is not looked into."""

    def __init__(self) -> None:
        self._pages = 0
        self._count = 0
        self._tail = b""
        self._inflater: zlib._Decompress | None = None
        self._inflated = 0
        self._itail = b""

    @property
    def pages(self) -> int | None:
        return self._pages or self._count or None

    def feed(self, data: bytes) -> None:
        while data:
            if self._inflater is not None:
                data = self._inflate(data)
                continue
            buf, seen = self._tail + data, len(self._tail)
            stream = _OBJSTM.search(buf)
            if stream is not None and stream.end() > seen:
                self._scan(buf[: stream.end()], seen)
                self._inflater, self._inflated, self._itail = zlib.decompressobj(), 0, b""
                self._tail, data = b"", buf[stream.end() :]
                continue
            self._scan(buf, seen)
            self._tail, data = buf[-_TAIL:], b""

    def _inflate(self, data: bytes) -> bytes:
        """Feed an object stream's bytes to the inflater; returns what follows the stream, once it ends."""
        assert self._inflater is not None
        try:
            out = self._inflater.decompress(data, 1 << 20)
            while self._inflater.unconsumed_tail and self._inflated < _MOST_INFLATED:
                self._inflated += len(out)
                self._scan_inflated(out)
                out = self._inflater.decompress(self._inflater.unconsumed_tail, 1 << 20)
        except zlib.error:
            self._inflater = None  # not Flate, or damaged: read on as plain bytes
            return data
        self._inflated += len(out)
        self._scan_inflated(out)
        if self._inflater.eof or self._inflated >= _MOST_INFLATED:
            rest = self._inflater.unused_data
            self._inflater = None
            return rest
        return b""

    def _scan_inflated(self, out: bytes) -> None:
        buf, seen = self._itail + out, len(self._itail)
        self._scan(buf, seen)
        self._itail = buf[-_TAIL:]

    def _scan(self, buf: bytes, seen: int) -> None:
        """Count what ends past `seen` (what came before was counted with the previous chunk)."""
        self._pages += sum(1 for m in _PAGE.finditer(buf) if m.end() > seen)
        for m in _COUNT.finditer(buf):
            if m.end() > seen:
                self._count = max(self._count, int(m[1] or m[2]))
