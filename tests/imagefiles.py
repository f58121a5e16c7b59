"""Real image and PDF files for tests, written byte by byte (no imaging library): a PNG any viewer opens,
a PDF any reader opens (classic, or PDF 1.5 with its pages in a compressed object stream), and the
headers of JPEG, GIF and WebP files for the size readers."""

from __future__ import annotations

import random
import struct
import zlib


def png(width: int, height: int, *, seed: int = 0, noise: bool = True) -> bytes:
    """An 8-bit RGB PNG; with `noise` its pixels are random, so it does not compress (about 3 bytes a pixel)."""
    rng = random.Random(seed)
    row = width * 3
    raw = b"".join(b"\x00" + (rng.randbytes(row) if noise else bytes([seed % 256]) * row) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def png_of_size(nbytes: int, *, seed: int = 0) -> bytes:
    """A noisy PNG of about `nbytes` bytes (square)."""
    side = max(1, int((nbytes / 3) ** 0.5))
    return png(side, side, seed=seed)


def jpeg_header(width: int, height: int, *, exif: int = 0) -> bytes:
    """The start of a baseline JPEG: SOI, APP1 segments of `exif` bytes in all, a quantisation table, SOF0."""
    out = b"\xff\xd8"
    while exif > 0:  # a segment holds at most 65,533 bytes
        n = min(exif, 65_000)
        out += b"\xff\xe1" + struct.pack(">H", n + 2) + b"Exif\x00\x00" + bytes(max(0, n - 6))
        exif -= n
    out += b"\xff\xdb" + struct.pack(">H", 67) + bytes(65)
    out += b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes(9)
    return out + b"\xff\xda" + struct.pack(">H", 12) + bytes(10) + b"\x00" * 64 + b"\xff\xd9"


def gif(width: int, height: int) -> bytes:
    """A whole 1-colour GIF89a of that size (a real file)."""
    return (
        b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
        b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"
    )


def webp_lossless(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + bits.to_bytes(4, "little") + bytes(8)
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload


def webp_lossy(width: int, height: int) -> bytes:
    frame = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(10)
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(frame)) + b"WEBP" + b"VP8 " + struct.pack("<I", len(frame)) + frame


def webp_extended(width: int, height: int) -> bytes:
    payload = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8X" + struct.pack("<I", len(payload)) + payload


def _page_content(text: str, n: int) -> bytes:
    return f"BT /F1 18 Tf 72 720 Td ({text} page {n}) Tj ET".encode()


def pdf(pages: int, text: str = "Invoice 42") -> bytes:
    """A classic PDF 1.4: catalog, page tree, `pages` pages of Helvetica text, a cross-reference table."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(pages))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    font = 3 + 2 * pages
    for i in range(pages):
        content = _page_content(text, i + 1)
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def pdf_with_object_streams(pages: int, text: str = "Report") -> bytes:
    """A PDF 1.5 whose page tree and pages sit in one compressed object stream, as modern writers save
    them, with a cross-reference stream: its page objects cannot be seen in the file's bytes."""
    # Objects 1 and 2 (catalog, page tree) and the pages 3.. in the object stream; contents and font outside.
    page_ids = [3 + i for i in range(pages)]
    content_ids = [3 + pages + i for i in range(pages)]
    font_id, objstm_id, xref_id = 3 + 2 * pages, 4 + 2 * pages, 5 + 2 * pages
    inside = {1: b"<< /Type /Catalog /Pages 2 0 R >>"}
    inside[2] = f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {pages} >>".encode()
    for p, c in zip(page_ids, content_ids, strict=True):
        inside[p] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {c} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>"
        ).encode()
    header, bodies = [], b""
    for number, body in inside.items():
        header.append(f"{number} {len(bodies)}")
        bodies += body + b" "
    first = (" ".join(header) + " ").encode()
    packed = zlib.compress(first + bodies)
    out = bytearray(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    where: dict[int, tuple[int, int, int]] = {}  # object -> (type, field 2, field 3) of its xref entry
    for index, number in enumerate(inside):
        where[number] = (2, objstm_id, index)
    for n, c in enumerate(content_ids):
        content = _page_content(text, n + 1)
        where[c] = (1, len(out), 0)
        out += b"%d 0 obj\n<< /Length %d >>\nstream\n" % (c, len(content)) + content + b"\nendstream\nendobj\n"
    where[font_id] = (1, len(out), 0)
    out += b"%d 0 obj\n<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>\nendobj\n" % font_id
    where[objstm_id] = (1, len(out), 0)
    out += b"%d 0 obj\n<< /Type /ObjStm /N %d /First %d /Filter /FlateDecode /Length %d >>\nstream\n" % (
        objstm_id, len(inside), len(first), len(packed))  # fmt: skip
    out += packed + b"\nendstream\nendobj\n"
    where[xref_id] = (1, len(out), 0)
    rows = (
        b"\x00"
        + bytes(4)
        + b"\xff"
        + b"".join(
            struct.pack(">BIB", *where[n]) if where[n][0] == 1 else struct.pack(">BIB", 2, where[n][1], where[n][2])
            for n in range(1, xref_id + 1)
        )
    )
    stream = zlib.compress(rows)
    out += b"%d 0 obj\n<< /Type /XRef /Size %d /W [1 4 1] /Root 1 0 R /Filter /FlateDecode /Length %d >>\nstream\n" % (
        xref_id, xref_id + 1, len(stream))  # fmt: skip
    xref = where[xref_id][1]
    out += stream + b"\nendstream\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)
