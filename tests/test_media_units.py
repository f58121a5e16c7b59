"""The pieces of image columns on their own: types by magic bytes, pixel sizes from headers, PDF pages,
each provider's published token rule and limits, where a cell's bytes are found, the room for bytes in
flight, and a rendered batch that holds descriptors, never the images."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import polars as pl
import pytest

from pipeline.limits.room import Room
from pipeline.requests.media import MEDIA, MEDIA_KEY, MEDIA_KIND, MEDIA_SKIP, MediaColumns, Unreadable, kinds, rules_for
from pipeline.requests.media.columns import bases_for
from pipeline.requests.media.sources import chunks, resolve
from tests import imagefiles


def test_types_come_from_the_bytes_not_the_name() -> None:
    assert kinds.sniff(imagefiles.png(3, 2)) == kinds.PNG
    assert kinds.sniff(imagefiles.jpeg_header(10, 10)) == kinds.JPEG
    assert kinds.sniff(imagefiles.gif(4, 4)) == kinds.GIF
    assert kinds.sniff(imagefiles.webp_lossless(4, 4)) == kinds.WEBP
    assert kinds.sniff(imagefiles.pdf(1)) == kinds.PDF
    assert kinds.sniff(b"junk\n" + imagefiles.pdf(1)) == kinds.PDF  # a header after a little junk still counts
    for data, what in [
        (b"II*\x00rest", "a TIFF image"),
        (b"BM\x00\x00", "a BMP image"),
        (b"\x00\x00\x00\x18ftypheic", "a HEIC photo"),
        (b'<?xml version="1.0"?><svg xmlns="x"/>', "an SVG drawing"),
        (b"hello, world", "text"),
        (b"", "empty"),
    ]:
        assert kinds.sniff(data) is None
        assert kinds.describe_other(data) == what


def test_pixel_sizes_from_the_headers() -> None:
    assert kinds.dimensions(kinds.PNG, imagefiles.png(640, 480)[:64]) == (640, 480)
    assert kinds.dimensions(kinds.GIF, imagefiles.gif(17, 9)) == (17, 9)
    assert kinds.dimensions(kinds.WEBP, imagefiles.webp_lossy(321, 123)) == (321, 123)
    assert kinds.dimensions(kinds.WEBP, imagefiles.webp_lossless(300, 200)) == (300, 200)
    assert kinds.dimensions(kinds.WEBP, imagefiles.webp_extended(1000, 2000)) == (1000, 2000)
    # A JPEG's frame header comes after its metadata: found past 100 kB of EXIF, within the head kept.
    assert kinds.dimensions(kinds.JPEG, imagefiles.jpeg_header(4032, 3024, exif=100_000)) == (4032, 3024)
    assert kinds.dimensions(kinds.JPEG, imagefiles.jpeg_header(10, 10, exif=300_000)[: kinds.HEAD]) is None
    assert kinds.dimensions(kinds.PNG, b"\x89PNG\r\n\x1a\n") is None  # cut short: unknown, not a crash


@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_pdf_pages_counted_as_the_bytes_stream_past(chunk: int) -> None:
    for data, pages in [(imagefiles.pdf(3), 3), (imagefiles.pdf_with_object_streams(5), 5)]:
        counter = kinds.PageCounter()
        for i in range(0, len(data), chunk):
            counter.feed(data[i : i + chunk])
        assert counter.pages == pages
    assert b"/Type /Page " not in imagefiles.pdf_with_object_streams(5)  # the pages really are compressed away


def test_openai_token_rule_matches_the_published_examples() -> None:
    gpt4o = rules_for("openai", "gpt-4o")
    assert gpt4o.image_tokens((1024, 1024)) == 765  # 4 tiles
    assert gpt4o.image_tokens((2048, 4096)) == 1105  # 768 x 1536: 6 tiles
    assert gpt4o.image_tokens((512, 512)) == 255
    assert gpt4o.image_tokens(None) == gpt4o.image_most == 85 + 8 * 170
    assert rules_for("openai", "gpt-4o", "low").image_tokens((4000, 4000)) == 85
    assert rules_for("openai", "gpt-4o-mini-2024-07-18").image_tokens((1024, 1024)) == 2833 + 4 * 5667
    assert rules_for("openai", "o1").image_tokens((512, 512)) == 75 + 150
    assert rules_for("openai", "gpt-5").image_tokens((1024, 1024)) == 70 + 4 * 140
    assert rules_for("openai", "gpt-5", "low").image_tokens((1024, 1024)) == 70
    assert rules_for("openai", "gpt-5-mini").image_tokens((1024, 1024)) == 1659  # a patch model, not gpt-5's tiles
    mini = rules_for("openai", "gpt-4.1-mini")
    assert mini.image_tokens((1024, 1024)) == 1659  # 1024 patches x 1.62, rounded up
    assert mini.image_tokens((1800, 2400)) == 2353  # 1452 patches after the scale-down, x 1.62
    assert rules_for("modelslab", "llama").image_tokens((1024, 1024)) == 765


def test_anthropic_token_rule_matches_the_published_table() -> None:
    claude = rules_for("anthropic", "claude-sonnet-4-5")
    assert claude.image_tokens((200, 200)) == 54
    assert claude.image_tokens((1000, 1000)) == 1334
    assert claude.image_tokens((1092, 1092)) == 1590
    assert claude.image_tokens((4000, 3000)) <= 1600  # scaled down first
    assert claude.image_most == 1600
    typical, most = claude.document_tokens(3)
    assert typical == 3 * (2250 + 1600) and most == 3 * (3000 + 1600)
    assert claude.document_tokens(None)[1] == 100 * (3000 + 1600)  # pages unknown: the most a request holds


def test_limits_per_provider() -> None:
    four_mb = 4_000_000
    assert rules_for("anthropic", "c").too_big(kinds.PNG, four_mb) is not None  # 5.3 MB as base64, over 5 MiB
    assert rules_for("anthropic", "c").too_big(kinds.PNG, 3_900_000) is None
    assert rules_for("openai", "gpt-4o").too_big(kinds.PNG, four_mb) is None
    assert "20.0 MB" in (rules_for("openai", "gpt-4o").too_big(kinds.JPEG, 21_000_000) or "")
    assert rules_for("openai", "gpt-4o").too_big(kinds.PDF, 33_000_000) is not None


def test_where_a_cell_is_read_from(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    bases = bases_for((data / "rows.csv",))
    assert bases == (data, Path.cwd())
    assert resolve("img/a.png", bases).where == str(data / "img" / "a.png")  # beside the input first
    assert resolve("b.png", bases).where == str(tmp_path / "b.png")  # then the current folder
    assert resolve(f"file://{data}/img/a.png", bases).scheme == "file"
    assert resolve(" https://example.org/a.jpg ", bases).scheme == "http"
    with pytest.raises(Unreadable, match=r"file img/none.png does not exist \(looked in .*data, /"):
        resolve("img/none.png", bases)
    with pytest.raises(Unreadable, match="is a folder"):
        resolve("img", bases)
    with pytest.raises(Unreadable, match="not an address pipeline reads"):
        resolve("gs://bucket/a.png", bases)
    ref = resolve("data:image/png;base64,iVBORw0KGgo=", bases)
    assert b"".join(chunks(ref, "data:image/png;base64,iVBORw0KGgo=")) == b"\x89PNG\r\n\x1a\n"
    # Inputs in several folders: relative paths are read from the current folder only.
    assert bases_for((data / "a.csv", tmp_path / "b.csv")) == (Path.cwd(),)


def test_a_rendered_batch_holds_descriptors_not_images(tmp_path: Path) -> None:
    """Memory flat in rows: 200 rows of 100 kB images render to a few hundred bytes a row."""
    paths = []
    for i in range(200):
        p = tmp_path / f"{i}.png"
        p.write_bytes(imagefiles.png_of_size(100_000, seed=i))
        paths.append(str(p))
    df = pl.DataFrame({"photo": paths})
    media = MediaColumns(columns=("photo",), rules=rules_for("openai", "gpt-4o"))
    out = media.render(df, [None] * df.height)
    assert out.get_column(MEDIA_SKIP).null_count() == df.height
    assert out.estimated_size() < 400 * df.height  # 20 MB of images, under 80 kB rendered
    first = out.get_column(MEDIA_KEY)[0]
    assert first == f"image/png:{hashlib.blake2b(Path(paths[0]).read_bytes(), digest_size=16).hexdigest()}"
    loaded = media.load(out.get_column(MEDIA)[0], df, 0)
    assert loaded[0].data == Path(paths[0]).read_bytes() and loaded[0].mime == kinds.PNG


def test_a_file_changed_after_rendering_is_refused_when_loaded(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(imagefiles.png(8, 8, seed=1))
    df = pl.DataFrame({"photo": [str(p)]})
    media = MediaColumns(columns=("photo",), rules=rules_for("openai", "gpt-4o"))
    described = media.render(df, [None]).get_column(MEDIA)[0]
    p.write_bytes(imagefiles.png(8, 8, seed=2))
    with pytest.raises(Unreadable, match="changed after this run read it") as caught:
        media.load(described, df, 0)
    assert caught.value.kind == "image_changed"
    os.remove(p)
    with pytest.raises(Unreadable, match="no longer exists"):
        media.load(described, df, 0)


def test_cells_refused_with_their_kind(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_bytes(b"just text, named like an image")
    (tmp_path / "scan.tif").write_bytes(b"II*\x00" + bytes(100))
    (tmp_path / "wide.png").write_bytes(imagefiles.png(9000, 2, noise=False))
    df = pl.DataFrame({"photo": ["fake.png", "scan.tif", "wide.png", "none.png", None]})
    media = MediaColumns(columns=("photo",), rules=rules_for("anthropic", "claude"), bases=(tmp_path,))
    out = media.render(df, [None] * df.height)
    assert out.get_column(MEDIA_KIND).to_list() == ["image_type", "image_type", "image_too_large", "image_missing", "not_sent"]
    reasons = out.get_column(MEDIA_SKIP).to_list()
    assert "fake.png is text, not an image Anthropic takes" in reasons[0]
    assert "scan.tif is a TIFF image" in reasons[1] and "convert it to PNG or JPEG" in reasons[1]
    assert "9000 x 2 px, over Anthropic's 8000 px a side" in reasons[2]
    assert reasons[4] == "not sent: column 'photo' is null in this row"
    # With --null-as-empty a null cell leaves that image out instead of holding the row back.
    lenient = MediaColumns(columns=("photo",), rules=media.rules, bases=(tmp_path,), null_as_empty=True)
    assert lenient.render(df[4:], [None]).get_column(MEDIA).to_list() == ["[]"]


def test_room_bounds_bytes_in_flight_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        room, order = Room(100), []

        async def user(name: str, n: int, hold: float) -> None:
            taken = await room.take(n)
            order.append(name)
            assert room.used <= room.capacity
            await asyncio.sleep(hold)
            room.give(taken)

        await asyncio.gather(user("a", 60, 0.05), user("b", 60, 0.01), user("c", 10, 0.01), user("huge", 500, 0.01))
        assert room.used == 0
        return order

    # b waits for a; c, though small enough to fit beside a, waits its turn behind b; the huge one goes alone.
    assert asyncio.run(scenario()) == ["a", "b", "c", "huge"]


def test_the_mmap_threshold_is_held_on_glibc() -> None:
    """Runs with image columns keep glibc's mmap threshold fixed (memory flat in rows: see make bench, scenario 14)."""
    import platform

    from pipeline.limits.room import hold_mmap_threshold

    assert hold_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
