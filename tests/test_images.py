"""Image and document columns end to end: real PNG and PDF files read from the input's folder, sent as
each provider expects, received intact by a real server on 127.0.0.1; the key follows the bytes
(a changed image is sent again, an unchanged one never, across real processes); cells that cannot be
sent are marked per row, or the job refused before anything is sent; http(s) images by URL or inlined."""

from __future__ import annotations

import base64
import hashlib
import signal
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests import imagefiles
from tests.conftest import chat_requests, run_cli, spawn, write_table
from tests.fakeserver import FakeLLMServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def label(data: bytes, mime: str = "image/png", kind: str = "image") -> str:
    """What the fake server echoes for an image or document it received."""
    return f"[{kind} {mime} {len(data)} bytes sha256:{sha(data)}]"


def user_content(request: Any) -> list[dict[str, Any]]:
    users = [m for m in request.body["messages"] if m["role"] == "user"]
    content = users[-1]["content"]
    assert isinstance(content, list)
    return content


def decoded(data_url: str) -> bytes:
    head, _, data = data_url.partition(",")
    assert head.endswith(";base64")
    return base64.b64decode(data)


def args(
    server: FakeLLMServer, *extra: str, inp: str = "data/rows.csv", out: str = "out/result.parquet", model: str = "gpt-4o"
) -> list[str]:
    return [
        "run", "-i", inp, "-o", out, "-p", "Describe: {text}", "--image-column", "photo", "--base-url",
        f"{server.url}/v1", "-m", model, "--no-progress", "--max-attempts", "2", *extra,
    ]  # fmt: skip


def image_table(*more: dict[str, Any]) -> dict[str, bytes]:
    """data/rows.csv, whose image cells are paths relative to it: two PNGs and a PDF (and `more` rows);
    returns the files' bytes by path."""
    made = {"img/a.png": imagefiles.png(640, 480, seed=1), "img/b.png": imagefiles.png(100, 80, seed=2),
            "docs/invoice.pdf": imagefiles.pdf(2)}  # fmt: skip
    for name, data in made.items():
        Path("data", name).parent.mkdir(parents=True, exist_ok=True)
        Path("data", name).write_bytes(data)
    rows = [{"id": 1, "photo": "img/a.png", "text": "first"}, {"id": 2, "photo": "img/b.png", "text": "second"},
            {"id": 3, "photo": "docs/invoice.pdf", "text": "third"}, *more]  # fmt: skip
    write_table("data/rows.csv", rows)
    return made


@pytest.fixture
def files() -> dict[str, bytes]:
    """A table in data/ whose image cells are paths relative to it: two PNGs and a PDF."""
    return image_table()


def test_real_png_and_pdf_reach_an_openai_server_intact(server: FakeLLMServer, files: dict[str, bytes]) -> None:
    result = run_cli(*args(server))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet").sort("id")
    assert out["status"].to_list() == ["ok"] * 3
    a, b, pdf = files["img/a.png"], files["img/b.png"], files["docs/invoice.pdf"]
    assert out["completion"].to_list() == [
        f"echo: Describe: first {label(a)}",
        f"echo: Describe: second {label(b)}",
        f"echo: Describe: third {label(pdf, 'application/pdf', 'document')}",
    ]
    by_text = {user_content(r)[-1]["text"]: user_content(r) for r in chat_requests(server)}
    image, text = by_text["Describe: first"]
    assert image["type"] == "image_url" and "detail" not in image["image_url"]  # images first, detail only when asked
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert decoded(image["image_url"]["url"]) == a
    assert text == {"type": "text", "text": "Describe: first"}
    document = by_text["Describe: third"][0]
    assert document["type"] == "file" and document["file"]["filename"] == "invoice.pdf"
    assert decoded(document["file"]["file_data"]) == pdf
    # Billed by OpenAI's rule: 640 x 480 is 2 x 1 tiles after scaling, 85 + 2 x 170.
    assert out.filter(pl.col("id") == 1)["prompt_tokens"].item() == 425 + 2 + 3


def test_anthropic_gets_image_and_document_blocks(server: FakeLLMServer, files: dict[str, bytes]) -> None:
    cmd = args(server, "--provider", "anthropic", "--api-key-env", "ANTHROPIC_KEY", model="claude-sonnet-4-5")
    cmd[cmd.index("--base-url") + 1] = server.url
    result = run_cli(*cmd, env={"ANTHROPIC_KEY": "sk-ant-test-0123456789"})
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet").sort("id")
    assert out["completion"][0] == f"echo: Describe: first {label(files['img/a.png'])}"
    assert out["completion"][2] == f"echo: Describe: third {label(files['docs/invoice.pdf'], 'application/pdf', 'document')}"
    by_text = {user_content(r)[-1]["text"]: user_content(r) for r in chat_requests(server)}
    image, text = by_text["Describe: first"]
    assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": base64.b64encode(files["img/a.png"]).decode()}}  # fmt: skip
    assert text["type"] == "text"
    document = by_text["Describe: third"][0]
    assert document["type"] == "document" and document["source"]["media_type"] == "application/pdf"
    assert base64.b64decode(document["source"]["data"]) == files["docs/invoice.pdf"]
    assert out["prompt_tokens"][0] == 410 + 2 + 3  # 640 x 480 / 750, rounded up


def test_binary_and_data_url_cells(server: FakeLLMServer) -> None:
    png, gif = imagefiles.png(32, 32, seed=5), imagefiles.gif(9, 9)
    data_url = "data:image/gif;base64," + base64.b64encode(gif).decode()
    write_table("rows.parquet", pl.DataFrame({"photo": [png], "logo": [data_url], "text": ["x"]}))
    result = run_cli(*args(server, "--image-column", "logo", inp="rows.parquet"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["completion"].item() == f"echo: Describe: x {label(png)} {label(gif, 'image/gif')}"
    assert out["photo"].item() == png  # the input's cells as they were


def test_a_changed_image_is_sent_again_and_an_unchanged_one_never(files: dict[str, bytes]) -> None:
    """Real processes: a first run killed part-way, an answered row's image changed before the resume,
    then another image changed on disk."""
    for i in range(3, 21):
        Path(f"data/img/{i}.png").write_bytes(imagefiles.png(16, 16, seed=i))
    rows = [{"id": i, "photo": f"img/{i}.png", "text": f"row {i}"} for i in range(3, 21)]
    write_table("data/rows.csv", rows)
    with FakeLLMServer(latency=0.15) as server:
        proc = spawn(*args(server, "--concurrency", "1"))
        checkpoint = Path("out/result.checkpoint")
        deadline = time.monotonic() + 60
        while sum(len(j.read_bytes().splitlines()) for j in checkpoint.glob("journal-*.jsonl")) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        order = [user_content(r)[-1]["text"] for r in chat_requests(server)]
        first = set(order)
        # One at a time and 4 answers journaled: the first request's answer is kept. Its image changes
        # while no process runs: the resumed run must send it again, with the new bytes.
        answered = int(order[0].rsplit(" ", 1)[1])
        redrawn = imagefiles.png(16, 16, seed=500)
        Path(f"data/img/{answered}.png").write_bytes(redrawn)
        server.reset()
        resumed = run_cli(*args(server))
        assert resumed.exit_code == 0, resumed.output
        second = [user_content(r)[-1]["text"] for r in chat_requests(server)]
        assert order[0] in second
        assert len(first & set(second) - {order[0]}) <= 1  # besides it, only the one in flight at the kill
        assert len(first | set(second)) == 18 and len(second) == len(set(second))
        out = pl.read_parquet("out/result.parquet")
        assert out.filter(pl.col("id") == answered)["completion"].item().endswith(label(redrawn))

        changed = imagefiles.png(16, 16, seed=99)
        Path("data/img/7.png").write_bytes(changed)
        server.reset()
        again = run_cli(*args(server))
        assert again.exit_code == 0, again.output
        sent = chat_requests(server)
        assert [user_content(r)[-1]["text"] for r in sent] == ["Describe: row 7"]  # the changed one, and only it
        assert decoded(user_content(sent[0])[0]["image_url"]["url"]) == changed
        out = pl.read_parquet("out/result.parquet")
        assert out.filter(pl.col("id") == 7)["completion"].item().endswith(label(changed))
        server.reset()
        assert run_cli(*args(server)).exit_code == 0
        assert chat_requests(server) == []  # nothing changed: nothing sent


def test_an_image_changed_between_reading_and_sending_is_not_sent_under_the_old_key(files: dict[str, bytes]) -> None:
    """The run reads every image of a batch, then sends one at a time; a file rewritten meanwhile is refused
    (its answer would be kept under the old bytes' key), and the next run sends the new bytes."""
    with FakeLLMServer(latency=0.5) as server:
        proc = spawn(*args(server, "--concurrency", "1", "--max-error-rate", "1"))
        deadline = time.monotonic() + 60
        while not chat_requests(server):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        new = imagefiles.png(20, 20, seed=42)
        Path("data/docs/invoice.pdf").write_bytes(imagefiles.pdf(3))  # row 3, still waiting its turn
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        out = pl.read_parquet("out/result.parquet").sort("id")
        assert out["status"].to_list() == ["ok", "ok", "error"]
        assert "docs/invoice.pdf changed after this run read it" in out["error"][2]
        assert "image_changed" in stderr
        assert len(chat_requests(server)) == 2
        server.reset()
        Path("data/img/b.png").write_bytes(new)
        again = run_cli(*args(server))
        assert again.exit_code == 0, again.output
        assert sorted(user_content(r)[-1]["text"] for r in chat_requests(server)) == ["Describe: second", "Describe: third"]


def test_missing_files_and_types_no_provider_takes_are_refused_per_row(server: FakeLLMServer, files: dict[str, bytes]) -> None:
    Path("data/img/notes.png").write_bytes(b"meeting notes, saved with the wrong name")  # text named like an image
    Path("data/img/scan.png").write_bytes(b"II*\x00" + bytes(200))  # a TIFF
    rows = [{"id": 1, "photo": "img/a.png", "text": "ok"}, {"id": 2, "photo": "img/gone.png", "text": "missing"},
            {"id": 3, "photo": "img/notes.png", "text": "text"}, {"id": 4, "photo": "img/scan.png", "text": "tiff"}]  # fmt: skip
    write_table("data/rows.csv", rows)
    result = run_cli(*args(server))
    assert result.exit_code == 4, result.output  # rows failed, above --max-error-rate 0
    assert "3 rows were not sent because of an image or PDF" in result.output
    assert "image_missing x1" in result.output and "image_type x2" in result.output
    out = pl.read_parquet("out/result.parquet").sort("id")
    assert out["status"].to_list() == ["ok", "error", "error", "error"]
    assert out["error"][1].startswith("not sent: column 'photo': file img/gone.png does not exist (looked in ")
    assert "img/notes.png is text, not an image OpenAI takes" in out["error"][2]
    assert "img/scan.png is a TIFF image" in out["error"][3]
    assert [user_content(r)[-1]["text"] for r in chat_requests(server)] == ["Describe: ok"]


def test_not_one_image_readable_refuses_the_job_before_anything_is_sent(server: FakeLLMServer, files: dict[str, bytes]) -> None:
    # The paths are relative to data/, and the table was copied elsewhere without them.
    Path("elsewhere").mkdir()
    Path("elsewhere/rows.csv").write_bytes(Path("data/rows.csv").read_bytes())
    result = run_cli(*args(server, inp="elsewhere/rows.csv"))
    assert result.exit_code == 2, result.output
    assert "Not one image of the first 3 in elsewhere/rows.csv can be sent, so nothing was" in result.output
    assert "row 1, column 'photo': file img/a.png does not exist" in result.output
    assert "Traceback" not in result.output
    assert chat_requests(server) == []


def without(cmd: list[str], flag: str) -> list[str]:
    at = cmd.index(flag)
    return cmd[:at] + cmd[at + 2 :]


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("no such column", "The image column 'picture' (--image-column) is not in data/rows.csv"),
        ("not a column of paths", "Column 'id' of data/rows.csv holds Int64 values, but an image column holds"),
        ("embedded model", "the embedded model (SmolLM2-135M-Instruct) reads text only, so it cannot take the image column"),
        ("inline without images", "--inline-images is for image columns: add --image-column COLUMN"),
        ("messages", "a conversation (--messages-column) carries its own images"),
        ("detail for anthropic", "--image-detail is OpenAI's setting"),
        ("several models", "--image-column takes one model per run, and this run asks 2"),
    ],
)
def test_bad_image_settings_are_refused_with_exit_2(server: FakeLLMServer, files: dict[str, bytes], case: str, says: str) -> None:
    base = args(server)
    cmd = {
        "no such column": [*base, "--image-column", "picture"],
        "not a column of paths": [*without(base, "--image-column"), "--image-column", "id"],
        "embedded model": [*without(base, "--base-url"), "--provider", "local"],
        "inline without images": [*without(base, "--image-column"), "--inline-images"],
        "messages": [*without(base, "-p"), "--messages-column", "text"],
        "detail for anthropic": [*base, "--provider", "anthropic", "--image-detail", "low"],
        "several models": [*base, "-m", "gpt-4o-mini"],
    }[case]
    result = run_cli(*cmd)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert chat_requests(server) == []


def test_http_images_go_as_urls_unless_inlined(server: FakeLLMServer) -> None:
    png = imagefiles.png(50, 50, seed=3)
    url = server.serve_file("cat.png", png, "image/png")
    write_table("rows.csv", [{"photo": url, "text": "cat"}, {"photo": server.url + "/files/gone.png", "text": "gone"}])

    result = run_cli(*args(server, "--max-error-rate", "1", inp="rows.csv"))
    assert result.exit_code == 0, result.output
    assert server.stats().get("file_gets", 0) == 0  # the provider fetches a URL itself: we never do
    sent = [user_content(r)[0]["image_url"]["url"] for r in chat_requests(server)]
    assert sorted(sent) == sorted([url, server.url + "/files/gone.png"])

    server.reset()
    result = run_cli(*args(server, "--inline-images", "--max-error-rate", "1", inp="rows.csv", out="out/inline.parquet"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/inline.parquet")
    assert out["completion"][0] == f"echo: Describe: cat {label(png)}"  # fetched, inlined, intact
    assert out["error"][1] == f"not sent: column 'photo': {server.url}/files/gone.png answered HTTP 404 (Not Found)"
    assert [decoded(user_content(r)[0]["image_url"]["url"]) for r in chat_requests(server)] == [png]
    # Inlined images are keyed by their bytes: new bytes at the same URL are sent again, the same never.
    server.reset()
    assert (
        run_cli(*args(server, "--inline-images", "--max-error-rate", "1", inp="rows.csv", out="out/inline.parquet")).exit_code
        == 0
    )
    assert chat_requests(server) == []
    server.serve_file("cat.png", imagefiles.png(50, 50, seed=4), "image/png")
    assert (
        run_cli(*args(server, "--inline-images", "--max-error-rate", "1", inp="rows.csv", out="out/inline.parquet")).exit_code
        == 0
    )
    assert len(chat_requests(server)) == 1


def test_anthropic_size_and_pixel_limits_are_checked_before_sending(server: FakeLLMServer) -> None:
    Path("big.png").write_bytes(imagefiles.png_of_size(4_000_000, seed=1))  # 5.3 MB as base64: over Anthropic's 5 MB
    Path("wide.png").write_bytes(imagefiles.png(9000, 4, noise=False))
    Path("fine.png").write_bytes(imagefiles.png(64, 64))
    write_table("rows.csv", [{"photo": p, "text": p} for p in ("big.png", "wide.png", "fine.png")])
    cmd = args(server, "--provider", "anthropic", "--api-key-env", "K", "--max-error-rate", "1", inp="rows.csv", model="claude")
    cmd[cmd.index("--base-url") + 1] = server.url
    result = run_cli(*cmd, env={"K": "sk-ant-test-0123456789"})
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["error", "error", "ok"]
    assert "big.png is 4.0 MB (5.3 MB as base64 text), over Anthropic's 5.2 MB of base64 text for an image" in out["error"][0]
    assert "wide.png is 9000 x 4 px, over Anthropic's 8000 px a side" in out["error"][1]
    assert len(chat_requests(server)) == 1
    # The same big image is within OpenAI's 20 MB.
    server.reset()
    result = run_cli(*args(server, "--max-error-rate", "1", inp="rows.csv", out="out/openai.parquet"))
    assert pl.read_parquet("out/openai.parquet")["status"][0] == "ok", result.output


def test_modelslab_takes_openai_parts_with_its_key_in_the_body(server: FakeLLMServer, files: dict[str, bytes]) -> None:
    cmd = args(server, "--provider", "modelslab", model="llava")
    cmd[cmd.index("--base-url") + 1] = f"{server.url}/api/v7/llm"
    result = run_cli(*cmd, env={"MODELSLAB_API_KEY": "ml-test-0123456789"})
    assert result.exit_code == 0, result.output
    request = next(r for r in chat_requests(server) if user_content(r)[-1]["text"] == "Describe: first")
    assert request.body["key"] == "ml-test-0123456789"
    assert decoded(user_content(request)[0]["image_url"]["url"]) == files["img/a.png"]


def test_image_detail_goes_in_the_part_and_the_key(server: FakeLLMServer, files: dict[str, bytes]) -> None:
    assert run_cli(*args(server, "--image-detail", "low")).exit_code == 0
    parts = [user_content(r)[0] for r in chat_requests(server) if user_content(r)[0]["type"] == "image_url"]
    assert {p["image_url"]["detail"] for p in parts} == {"low"}
    out = pl.read_parquet("out/result.parquet").sort("id")
    assert out["prompt_tokens"][0] == 85 + 2 + 3  # detail low: a flat 85
    server.reset()
    assert run_cli(*args(server)).exit_code == 0  # the detail is part of the request: a new key, sent again
    assert len(chat_requests(server)) == 3
