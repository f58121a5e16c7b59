"""Image columns in the other ways a job runs: batch mode against the batch fake (OpenAI's files and
Anthropic's Message Batches), cells in object storage (moto's S3 server), and --engine ray on a real Ray.
What reached the server is checked against the files' bytes, as in test_images.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests import imagefiles
from tests.conftest import chat_requests, run_cli, write_table
from tests.fakebatch import FakeBatchServer
from tests.fakeserver import FakeLLMServer
from tests.test_images import decoded, image_table, label, user_content

KEY = "sk-batch-test-0123456789"


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBatchServer]:
    monkeypatch.setenv("BATCH_KEY", KEY)
    with FakeBatchServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def files() -> dict[str, bytes]:
    """data/rows.csv: two PNGs and a PDF by paths relative to the table, and a row whose file is missing."""
    return image_table({"id": 4, "photo": "img/gone.png", "text": "gone"})


def batch_job(srv: FakeBatchServer, provider: str, *more: str) -> list[str]:
    base = f"{srv.url}/v1" if provider == "openai" else srv.url
    return ["run", "-i", "data/rows.csv", "-o", "out/r.parquet", "-p", "Describe: {text}", "--image-column", "photo",
            "--base-url", base, "-m", "gpt-4o" if provider == "openai" else "claude-sonnet-4-5", "--api-key-env",
            "BATCH_KEY", "--mode", "batch", "--provider", provider, "--no-progress", "--no-report",
            "--max-error-rate", "0.5", *more]  # fmt: skip


def sent_lines(srv: FakeBatchServer) -> list[dict[str, Any]]:
    """Every request line the fake received, in either API's form, as {custom_id, body}."""
    return [line for b in srv.batches.values() for line in b["_lines"]]


def content(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The user turn's content parts of a request body."""
    parts = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    assert isinstance(parts, list)
    return parts


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_batch_mode_sends_images_inline_and_collects_their_answers(
    batches: FakeBatchServer, files: dict[str, bytes], provider: str
) -> None:
    first = run_cli(*batch_job(batches, provider))
    assert first.exit_code == 3, first.output
    lines = sent_lines(batches)
    assert len(lines) == 3  # the missing file's row is not in the batch
    by_text = {content(line["body"])[-1]["text"]: content(line["body"]) for line in lines}
    image, document = by_text["Describe: first"][0], by_text["Describe: third"][0]
    if provider == "openai":
        assert decoded(image["image_url"]["url"]) == files["img/a.png"]
        assert document["type"] == "file" and decoded(document["file"]["file_data"]) == files["docs/invoice.pdf"]
    else:
        assert image["type"] == "image" and base64.b64decode(image["source"]["data"]) == files["img/a.png"]
        assert document["type"] == "document" and base64.b64decode(document["source"]["data"]) == files["docs/invoice.pdf"]

    batches.advance(120)
    done = run_cli(*batch_job(batches, provider))
    assert done.exit_code == 0, done.output
    out = pl.read_parquet("out/r.parquet").sort("id")
    assert out["status"].to_list() == ["ok", "ok", "ok", "error"]
    assert out["completion"][0] == f"echo: Describe: first {label(files['img/a.png'])}"
    assert out["completion"][2] == f"echo: Describe: third {label(files['docs/invoice.pdf'], 'application/pdf', 'document')}"
    assert out["error"][3].startswith("not sent: column 'photo': file img/gone.png does not exist")
    assert sum(batches.lines_seen.values()) == 3

    # Collected: the same command sends nothing. A changed image is sent again, alone, in a new batch.
    assert run_cli(*batch_job(batches, provider)).exit_code == 0 and batches.stats["batches_created"] == 1
    changed = imagefiles.png(100, 80, seed=77)
    Path("data/img/b.png").write_bytes(changed)
    assert run_cli(*batch_job(batches, provider)).exit_code == 3
    assert batches.stats["batches_created"] == 2 and sum(batches.lines_seen.values()) == 4
    batches.advance(120)
    assert run_cli(*batch_job(batches, provider)).exit_code == 0
    out = pl.read_parquet("out/r.parquet").sort("id")
    assert out["completion"][1] == f"echo: Describe: second {label(changed)}"


def test_batch_mode_marks_an_image_gone_before_its_line_is_written(batches: FakeBatchServer, files: dict[str, bytes]) -> None:
    """The batch's rows are read twice: rendered (the key) and written into the request file. A file that
    went away in between is not in the batch, and its row says why; the others go."""
    from pipeline.requests.media import columns

    real = columns.MediaColumns.load

    def load_after_removal(self: columns.MediaColumns, descriptor: str, frame: Any, row: int) -> Any:
        Path("data/img/b.png").unlink(missing_ok=True)
        return real(self, descriptor, frame, row)

    batches.faults["duration"] = 0  # finished at the first poll
    with pytest.MonkeyPatch.context() as m:
        m.setattr(columns.MediaColumns, "load", load_after_removal)
        result = run_cli(*batch_job(batches, "openai", "--wait"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/r.parquet").sort("id")
    assert out["status"].to_list() == ["ok", "error", "ok", "error"]
    assert out["error"][1].startswith("not sent: column 'photo': file img/b.png ")  # gone: "no longer exists", "does not exist"
    assert len(sent_lines(batches)) == 2


# ---- s3:// cells ----------------------------------------------------------------------------------


def test_s3_image_cells_are_read_from_the_bucket(server: FakeLLMServer, s3: Any) -> None:
    photo, scan = imagefiles.png(64, 48, seed=3), imagefiles.pdf(1)
    s3.put_object(Bucket="lake", Key="photos/cat.png", Body=photo)
    s3.put_object(Bucket="lake", Key="scans/receipt.pdf", Body=scan)
    rows = [{"photo": "s3://lake/photos/cat.png", "text": "cat"}, {"photo": "s3://lake/scans/receipt.pdf", "text": "receipt"},
            {"photo": "s3://lake/photos/missing.png", "text": "missing"}]  # fmt: skip
    write_table("rows.csv", rows)
    cmd = ["run", "-i", "rows.csv", "-o", "out/r.parquet", "-p", "Describe: {text}", "--image-column", "photo",
           "--base-url", f"{server.url}/v1", "-m", "gpt-4o", "--no-progress", "--max-error-rate", "0.5"]  # fmt: skip
    result = run_cli(*cmd)
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/r.parquet")
    assert out["completion"][0] == f"echo: Describe: cat {label(photo)}"
    assert out["completion"][1] == f"echo: Describe: receipt {label(scan, 'application/pdf', 'document')}"
    assert out["error"][2] == "not sent: column 'photo': s3://lake/photos/missing.png does not exist in the bucket"
    sent = {user_content(r)[-1]["text"]: user_content(r)[0] for r in chat_requests(server)}
    assert decoded(sent["Describe: cat"]["image_url"]["url"]) == photo  # a data: URL: the provider never sees s3://
    assert sent["Describe: receipt"]["file"]["filename"] == "receipt.pdf"

    # The key follows the object's bytes: the same objects are not sent again; a replaced one is.
    server.reset()
    assert run_cli(*cmd).exit_code == 0 and chat_requests(server) == []
    s3.put_object(Bucket="lake", Key="photos/cat.png", Body=imagefiles.png(64, 48, seed=4))
    assert run_cli(*cmd).exit_code == 0
    assert [user_content(r)[-1]["text"] for r in chat_requests(server)] == ["Describe: cat"]


def test_s3_cells_without_credentials_refuse_the_job_before_sending(
    server: FakeLLMServer, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_object(Bucket="lake", Key="photos/cat.png", Body=imagefiles.png(8, 8))
    write_table("rows.csv", [{"photo": "s3://lake/photos/cat.png", "text": "cat"}])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    from pipeline.requests.media import sources

    monkeypatch.setattr(sources, "_FS", [])  # a filesystem made with credentials by an earlier test is not reused
    result = run_cli("run", "-i", "rows.csv", "-o", "out/r.parquet", "-p", "{text}", "--image-column", "photo",
                     "--base-url", f"{server.url}/v1", "-m", "gpt-4o", "--no-progress")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "No credentials for object storage. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.output
    assert "Traceback" not in result.output
    assert chat_requests(server) == []
