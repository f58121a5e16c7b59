"""The OpenAI batch file format as an interchange format, both ways.

In: a JSONL `--input` whose lines are OpenAI batch requests (`custom_id`, `method`, `url`, `body`),
as made for OpenAI's batch API or `vllm run-batch`, runs as it is, online or in batch mode: each
`body` is sent verbatim to the chat completions endpoint. The file is read once, a line at a time,
into a table with `custom_id`, `method`, `url` and the body's canonical JSON text, so the rest of
the run (checks, keys, checkpoint, batches) reads it like any table; the request key is the hash of
that canonical body, so a re-run is idempotent even if the ids change.

Out: with such an input, an `--output` ending in `.jsonl` (or any output with `--output-format
openai-batch`) is written as OpenAI batch-output lines, in input order: `id`, `custom_id`,
`response` (`status_code`, `request_id`, `body`: a chat.completion rebuilt from the row's answer
and usage) and `error` (null, or `{code, message}` for a row without an answer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.tables import source, storage
from pipeline.tables.scratch import Scratch
from pipeline.tables.sink import JsonLinesSink

BODY = "body"  # the column that holds each line's body, as canonical JSON text
CHAT_URL = "/v1/chat/completions"


def open_requests(path_text: str) -> source.Table:
    """The batch-request file as a table (custom_id, method, url, body text), every line checked now."""
    path = Path(path_text)
    scratch = Scratch("pipeline-requests-")
    converted = Path(scratch.name) / "requests.jsonl"
    seen: set[str] = set()
    with path.open("rb") as src, converted.open("wb") as out:
        for number, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InputError(
                    f"Input file {path} line {number} is not JSON ({exc}). Each line must be one batch request."
                ) from None
            problem = _problem(line)
            if problem is None and line["custom_id"] in seen:
                problem = f"repeats custom_id {line['custom_id']!r} (each must be unique, as OpenAI requires)"
            if problem is not None:
                raise InputError(f"Input file {path} line {number} {problem}. Fix the line, or give the file as a plain table.")
            seen.add(line["custom_id"])
            body = orjson.dumps(line["body"], option=orjson.OPT_SORT_KEYS).decode()
            out.write(orjson.dumps({"custom_id": line["custom_id"], "method": line.get("method", "POST"),
                                    "url": line.get("url", CHAT_URL), BODY: body}) + b"\n")  # fmt: skip
    table = source.open_table((str(converted),))
    # Named as the user named it; the converted copy lives as long as the table does.
    return dataclasses.replace(table, files=(path,), scratch=scratch)


def _problem(line: Any) -> str | None:
    if not isinstance(line, dict):
        return "is not a JSON object"
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        return "has no custom_id"
    if not isinstance(line.get("body"), dict) or not isinstance(line["body"].get("messages"), list):
        return "has no body with messages (only chat completions requests are supported)"
    if line.get("url", CHAT_URL) not in (CHAT_URL, "/chat/completions"):
        return f"asks for {line.get('url')!r}; only {CHAT_URL} is supported"
    if line.get("method", "POST") != "POST":
        return f"uses method {line.get('method')!r}; batch requests are POST"
    return None


class BatchOutputSink(JsonLinesSink):
    """OpenAI batch-output lines, in input order, one per input line."""

    def __init__(self, path: Path | storage.Url, result_prefix: str = "") -> None:
        super().__init__(path, result_prefix)
        self._prefix = result_prefix  # the result columns arrive under their output names

    def _encode(self, frame: pl.DataFrame, out: BinaryIO) -> None:
        p = self._prefix
        for row in frame.iter_rows(named=True):
            key = row.get(p + "request_key")
            if row.get(p + "status") == "ok":
                pt, ct = row.get(p + "prompt_tokens"), row.get(p + "completion_tokens")
                body = {
                    "id": f"chatcmpl-{key}", "object": "chat.completion", "model": row.get(p + "model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": row.get(p + "completion")},
                                 "finish_reason": row.get(p + "finish_reason")}],
                    "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": row.get(p + "total_tokens")},
                }  # fmt: skip
                line = {"id": f"batch_req_{key}", "custom_id": row["custom_id"],
                        "response": {"status_code": 200, "request_id": key, "body": body}, "error": None}  # fmt: skip
            else:
                line = {"id": f"batch_req_{key or row['custom_id']}", "custom_id": row["custom_id"], "response": None,
                        "error": {"code": "pipeline_error", "message": row.get(p + "error")}}  # fmt: skip
            out.write(orjson.dumps(line) + b"\n")
