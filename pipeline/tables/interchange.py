"""The OpenAI batch file format as an interchange format, both ways.

In: a JSONL `--input` whose lines are OpenAI batch requests (`custom_id`, `method`, `url`, `body`),
as made for OpenAI's batch API or `vllm run-batch`, runs as it is, online or in batch mode: each
`body` is sent verbatim to the chat completions endpoint. The file is read once, a line at a time,
into a table with `custom_id`, `method`, `url` and the body's canonical JSON text, so the rest of
the run (checks, keys, checkpoint, batches) reads it like any table; the request key is the hash of
that canonical body, so a re-run is idempotent even if the ids change.

Out: with such an input, an `--output` ending in `.jsonl` (or any output with `--output-format
openai-batch`) is written as OpenAI batch-output lines, in input order: `id`, `custom_id`,
`response` (`status_code`, `request_id`, `body`: the provider's response as received, kept in the
checkpoint's `responses/`) and `error` (null, or `{code, message}` for a row without a response;
see `BatchOutputSink`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.tables import responses, source, storage
from pipeline.tables.scratch import Scratch
from pipeline.tables.sink import JsonLinesSink

BODY = "body"  # the column that holds each line's body, as canonical JSON text
CHAT_URL = "/v1/chat/completions"


def open_requests(path_text: str) -> source.Table:
    """The batch-request file as a table (custom_id, method, url, body text), every line checked now."""
    scratch = Scratch("pipeline-requests-")
    converted = Path(scratch.name) / "requests.jsonl"
    if storage.is_remote(path_text):  # an object: read from a local copy, named as the user named it
        path = Path(scratch.name) / "requests.source.jsonl"
        storage.download(storage.Url.parse(path_text), path)
    else:
        path = Path(path_text)
    seen: set[str] = set()
    with path.open("rb") as src, converted.open("wb") as out:
        for number, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InputError(
                    f"Input file {path_text} line {number} is not JSON ({exc}). Each line must be one batch request."
                ) from None
            problem = _problem(line)
            if problem is None and line["custom_id"] in seen:
                problem = f"repeats custom_id {line['custom_id']!r} (each must be unique, as OpenAI requires)"
            if problem is not None:
                raise InputError(
                    f"Input file {path_text} line {number} {problem}. Fix the line, or give the file as a plain table."
                )
            seen.add(line["custom_id"])
            body = orjson.dumps(line["body"], option=orjson.OPT_SORT_KEYS).decode()
            out.write(orjson.dumps({"custom_id": line["custom_id"], "method": line.get("method", "POST"),
                                    "url": line.get("url", CHAT_URL), BODY: body}) + b"\n")  # fmt: skip
    table = source.open_table((str(converted),))
    # Named as the user named it; the converted copy lives as long as the table does.
    named: Path | storage.Url = storage.Url.parse(path_text) if storage.is_remote(path_text) else path
    return dataclasses.replace(table, files=(named,), scratch=scratch)


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
    """OpenAI batch-output lines, in input order, one per input line.

    A line carries the provider's response as it was received (status code, request id, body: tool
    calls, several choices, logprobs and refusals included) when the checkpoint's `responses/` hold
    it, the error status and body of a request the provider refused among them. An answer with no
    response kept (one the answer cache gave) is rebuilt from the row's answer and usage. A row with
    no response at all says why in `error`, with a code of ours: `not_sent` (the run never sent it:
    an empty prompt, a spend ceiling, a stop) or `no_response` (sent, but no HTTP answer came: a
    timeout, a lost connection); a batch line the provider answered with an error object and no
    response (`batch_expired`, ...) keeps that object."""

    def __init__(self, path: Path | storage.Url, result_prefix: str = "", responses_in: Path | None = None) -> None:
        super().__init__(path, result_prefix)
        self._prefix = result_prefix  # the result columns arrive under their output names
        self._responses_in = responses_in  # the checkpoint folder whose responses/ the lines take
        self._committing = False

    def _encode(self, frame: pl.DataFrame, out: BinaryIO) -> None:
        # Written with the row's key, replaced by the response kept for it when the output is committed.
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
                message = row.get(p + "error") or ""
                code = "not_sent" if message.startswith("not sent") or not row.get(p + "attempts") else "no_response"
                line = {"id": f"batch_req_{key or row['custom_id']}", "custom_id": row["custom_id"], "response": None,
                        "error": {"code": code, "message": message}}  # fmt: skip
            out.write(orjson.dumps({**line, "_key": key, "_ok": row.get(p + "status") == "ok"}) + b"\n")

    def commit(self) -> None:
        self._committing = True
        super().commit()

    def _close(self) -> bool:
        if not super()._close():
            return False
        if self._committing:
            self._take_responses()
        return True

    def _take_responses(self) -> None:
        """The second pass: each line gets the response kept for its key, if any (one read per line)."""
        kept = responses.index(self._responses_in) if self._responses_in is not None else {}
        final = self._tmp.with_name(self._tmp.name + ".lines")
        with self._tmp.open("rb") as src, final.open("wb") as out:
            for raw in src:
                line = orjson.loads(raw)
                key, ok = line.pop("_key", None), line.pop("_ok", False)
                where = kept.get(key) if isinstance(key, str) else None
                if where is not None:
                    got = responses.read(where)
                    status = got.get("s")
                    # An answer kept by the checkpoint is never shown as a later refusal of the same request.
                    if "e" in got and not ok:
                        line["response"], line["error"] = None, got["e"]
                    elif isinstance(status, int) and (not ok or 200 <= status < 300):
                        line["response"] = {"status_code": status, "request_id": got.get("r"), "body": got.get("b")}
                        line["error"] = None
                    if got.get("i"):
                        line["id"] = got["i"]
                out.write(orjson.dumps(line) + b"\n")
        os.replace(final, self._tmp)
