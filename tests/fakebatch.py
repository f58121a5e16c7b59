"""A fake OpenAI batch service on 127.0.0.1: files (`purpose=batch`) and batches, with a clock.

Endpoints: ``POST /v1/files`` (multipart), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first, ``limit`` and
``after``, metadata echoed), ``POST /v1/batches/{id}/cancel``. Every call needs
``Authorization: Bearer <api_key>``.

Time is the fake clock, not the wall: a batch is ``validating`` at creation, ``in_progress`` once
retrieved, and ``completed`` when the clock passes ``created_at + duration`` (60 s unless set);
``POST /_fake/advance?s=N`` moves the clock, so 24 hours take milliseconds. Answers are built as
the online fake server builds them: ``echo: <last user message>``, usage counted in words; a
message's images and PDFs (OpenAI parts, Anthropic blocks) are echoed as the online fake labels them;
a request with tools gets a call to the tool it asks for, one with ``n`` gets n choices.

Fault switches (``POST /_fake/faults`` with a JSON object, or the constructor's ``faults``):
``expire_after`` (the batch expires after that many lines; the rest are ``batch_expired``),
``line_status`` ({substring of the user message: HTTP status}: that line is an error line),
``fail_validation`` (the batch ends ``failed`` with errors.data naming line 1), ``output_late``
(the first completed poll shows no output_file_id), ``retrieve_faults`` (a list of statuses
answered to the next retrieves, e.g. [429, 500]), ``create_sleep`` (seconds the create sleeps
after registering the batch and before answering: a client killed then has a batch it never
heard of), ``retrieve_fault_rate`` (this share of retrieves, at random from a seeded generator, is
answered 429 or 500), ``content_404_first`` (the first download of each output or error file is
answered 404, as a files endpoint can for a while after the batch completes), ``shuffle`` (output lines out of input order), ``duration`` (virtual seconds a batch
takes). ``GET /_fake/stats`` counts batches created, lines seen per custom_id, polls, cancels.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import socket
import threading
import time
from collections import Counter
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import web

try:
    from tests.fakeserver import _instance, _tool_to_call
except ImportError:  # run as a script: python tests/fakebatch.py
    from fakeserver import _instance, _tool_to_call  # type: ignore[no-redef]

TERMINAL = ("completed", "failed", "expired", "cancelled")
_ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _shown(content: Any) -> str:
    """A message's content as the echo shows it: its text, then a label per image or PDF (as the online
    fake server labels them: kind, media type, bytes decoded, the first 16 hex of their sha256)."""
    if not isinstance(content, list):
        return str(content)
    texts, labels = [], []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text", ""))
            continue
        source = part.get("source") or {}
        if kind == "image_url":
            where, label = part["image_url"]["url"], "image"
        elif kind == "file":
            where, label = part["file"]["file_data"], "document"
        elif source.get("type") == "base64":  # Anthropic's image and document blocks
            where, label = f"data:{source['media_type']};base64,{source['data']}", kind
        else:
            where, label = str(source.get("url")), kind
        if not where.startswith("data:"):
            labels.append(f"[{label}-url {where}]")
            continue
        head, _, data = where.partition(",")
        raw = base64.b64decode(data, validate=True)
        labels.append(
            f"[{label} {head[5:].removesuffix(';base64')} {len(raw)} bytes sha256:{hashlib.sha256(raw).hexdigest()[:16]}]"
        )
    return " ".join(["\n".join(texts), *labels])


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion for a request body (OpenAI's, or an Anthropic request's params): as the online fake
    answers, a call to the tool the request asks for (arguments a deterministic instance of its parameters),
    and n choices where n is asked (choice i says " #i" after choice 0's text)."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = _shown(users[-1]["content"]) if users else ""
    anthropic = any(isinstance(t, dict) and "input_schema" in t for t in body.get("tools") or [])
    tool = _tool_to_call(body, "anthropic" if anthropic else "openai")
    n = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 1 else 1
    prompt = sum(len(_shown(m.get("content", "")).split()) for m in body.get("messages", []))
    choices: list[dict[str, Any]] = []
    for i in range(n):
        if tool is not None:
            arguments = orjson.dumps(_instance(tool[1], "", len(str(content).split()))).decode()
            call = {"id": f"call_{i}", "type": "function", "function": {"name": tool[0], "arguments": arguments}}
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
            choices.append({"index": i, "message": message, "finish_reason": "tool_calls", "_words": len(arguments.split())})
        else:
            text = f"echo: {content}" + (f" #{i}" if i else "")
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                            "_words": len(text.split())})  # fmt: skip
    out = sum(c.pop("_words") for c in choices)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out},
    }


class FakeBatchServer:
    def __init__(self, *, api_key: str = "sk-batch-test-0123456789", faults: dict[str, Any] | None = None) -> None:
        self.api_key = api_key
        self.faults: dict[str, Any] = dict(faults or {})
        self._rng = random.Random(7)
        self._downloaded: set[str] = set()  # files downloaded once (content_404_first)
        self.clock = 1_800_000_000.0  # virtual seconds, epoch-like
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.stats: Counter[str] = Counter()
        self.lines_seen: Counter[str] = Counter()  # custom_id -> lines received in created batches
        self.received_keys: list[str] = []  # Authorization headers seen, to check no key is misplaced
        self._ids = 0
        self._lock = threading.Lock()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- life -------------------------------------------------------------------------
    def start(self) -> Self:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._loop = loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="fakebatch", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._setup(sock), loop).result()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.clock += seconds

    async def _setup(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=300 * 1024 * 1024, middlewares=[self._auth])
        r = app.router
        r.add_post("/v1/files", self._upload)
        r.add_get("/v1/files/{id}", self._file)
        r.add_get("/v1/files/{id}/content", self._content)
        r.add_post("/v1/batches", self._create)
        r.add_get("/v1/batches", self._list)
        r.add_get("/v1/batches/{id}", self._retrieve)
        r.add_post("/v1/batches/{id}/cancel", self._cancel)
        r.add_post("/v1/chat/completions", self._chat)  # online, on the same base URL, as OpenAI serves both
        r.add_post("/v1/messages/batches", self._a_create)
        r.add_get("/v1/messages/batches", self._a_list)
        r.add_get("/v1/messages/batches/{id}", self._a_retrieve)
        r.add_get("/v1/messages/batches/{id}/results", self._a_results)
        r.add_post("/v1/messages/batches/{id}/cancel", self._a_cancel)
        r.add_post("/_fake/advance", self._advance)
        r.add_post("/_fake/faults", self._set_faults)
        r.add_get("/_fake/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await handler(request)
        if request.path.startswith("/v1/messages"):
            auth = request.headers.get("x-api-key", "")
            self.received_keys.append(f"x-api-key {auth}")
            ok = auth == self.api_key and bool(request.headers.get("anthropic-version"))
        else:
            auth = request.headers.get("Authorization", "")
            self.received_keys.append(auth)
            ok = auth == f"Bearer {self.api_key}"
        if not ok:
            return _json({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                    "code": "invalid_api_key"}}, 401)  # fmt: skip
        return await handler(request)

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids:06d}"

    # ---- files --------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch" or not isinstance(upload, web.FileField):
            return _json({"error": {"message": "purpose must be batch and a file given", "type": "invalid_request_error"}}, 400)
        data = upload.file.read()
        fid = self._id("file")
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "purpose": "batch", "data": data,
                           "filename": upload.filename, "created_at": int(self.clock)}  # fmt: skip
        self.stats["uploads"] += 1
        return _json({k: v for k, v in self.files[fid].items() if k != "data"})

    async def _file(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["id"])
        if f is None:
            return _json({"error": {"message": "No such File object", "type": "invalid_request_error"}}, 404)
        return _json({k: v for k, v in f.items() if k != "data"})

    async def _content(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["id"])
        if f is None:
            return _json({"error": {"message": "No such File object", "type": "invalid_request_error"}}, 404)
        fid = request.match_info["id"]
        if self.faults.get("content_404_first") and f.get("purpose") != "batch" and fid not in self._downloaded:
            self._downloaded.add(fid)
            self.stats["content_404"] += 1
            return _json({"error": {"message": "No such File object", "type": "invalid_request_error"}}, 404)
        self.stats["downloads"] += 1
        return web.Response(body=f["data"], content_type="application/jsonl")

    # ---- batches ------------------------------------------------------------------------
    async def _create(self, request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        f = self.files.get(req.get("input_file_id", ""))
        if f is None or req.get("endpoint") != "/v1/chat/completions" or req.get("completion_window") != "24h":
            return _json({"error": {"message": "bad batch request", "type": "invalid_request_error"}}, 400)
        if status := self.faults.get("create_status"):
            return _json({"error": {"message": f"fake create refused ({status})", "type": "invalid_request_error"}}, int(status))
        lines = [orjson.loads(x) for x in f["data"].splitlines() if x.strip()]
        bid = self._id("batch")
        batch = {
            "id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": f["id"], "completion_window": "24h",
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": int(self.clock),
            "expires_at": int(self.clock) + 86400, "metadata": req.get("metadata") or {}, "errors": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "_lines": lines, "_done_at": self.clock + float(self.faults.get("duration", 60)), "_late": bool(self.faults.get("output_late")),
        }  # fmt: skip
        self.batches[bid] = batch
        self.stats["batches_created"] += 1
        for line in lines:
            self.lines_seen[line["custom_id"]] += 1
        if sleep := self.faults.get("create_sleep"):
            await asyncio.sleep(float(sleep))  # registered, not yet answered: a client killed now never heard of it
        return _json(_public(batch))

    async def _retrieve(self, request: web.Request) -> web.Response:
        status = None
        if queued := self.faults.get("retrieve_faults"):
            status = queued.pop(0)
        elif (rate := self.faults.get("retrieve_fault_rate")) and self._rng.random() < float(rate):
            status = self._rng.choice((429, 500))
        if status is not None:
            self.stats["retrieve_faults"] += 1
            return _json({"error": {"message": f"fake {status}", "type": "server_error"}}, int(status))
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _json({"error": {"message": "No such Batch", "type": "invalid_request_error"}}, 404)
        self.stats["polls"] += 1
        self._step(batch)
        return _json(_public(batch))

    async def _list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        after = request.query.get("after")
        ordered = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        if after:
            ordered = [b for b in ordered if b["id"] < after]
        page = ordered[:limit]
        self.stats["lists"] += 1
        return _json({"object": "list", "data": [_public(b) for b in page], "has_more": len(ordered) > limit,
                      "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})  # fmt: skip

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _json({"error": {"message": "No such Batch", "type": "invalid_request_error"}}, 404)
        self.stats["cancels"] += 1
        if batch["status"] not in TERMINAL:
            batch["status"] = "cancelling"
        return _json(_public(batch))

    def _step(self, batch: dict[str, Any]) -> None:
        """Move a batch along on the fake clock, as a poll would find it."""
        status = batch["status"]
        if status == "validating":
            if self.faults.get("fail_validation"):
                batch["status"] = "failed"
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": 1,
                                                               "message": "fake: line 1 is invalid", "param": "body"}]}  # fmt: skip
                return
            batch["status"] = status = "in_progress"  # and on, if its time has come
        if status == "cancelling":
            self._finish(batch, "cancelled", done=len(batch["_lines"]) // 2, why="batch_cancelled")
            return
        if status == "in_progress":
            expire = self.faults.get("expire_after")
            if expire is not None and self.clock >= batch["expires_at"]:
                self._finish(batch, "expired", done=int(expire), why="batch_expired")
            elif expire is None and self.clock >= batch["_done_at"]:
                self._finish(batch, "completed", done=len(batch["_lines"]), why="")
            return
        if status == "completed" and batch["_late"] and batch["output_file_id"] is None:
            batch["output_file_id"] = batch.pop("_held_output")

    def _finish(self, batch: dict[str, Any], status: str, *, done: int, why: str) -> None:
        ok_lines, err_lines = [], []
        codes: dict[str, int] = self.faults.get("line_status", {})
        lines = list(batch["_lines"])
        for i, line in enumerate(lines):
            cid, body = line["custom_id"], line["body"]
            rid = f"batch_req_{self._id('r')}"
            if i >= done:
                err_lines.append(
                    {"id": rid, "custom_id": cid, "response": None, "error": {"code": why, "message": f"fake {why}"}}
                )
                continue
            content = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
            code = next((c for s, c in codes.items() if s in str(content)), 200)
            if code == 200:
                ok_lines.append({"id": rid, "custom_id": cid, "response": {"status_code": 200, "request_id": rid,
                                                                           "body": _answer(body)}, "error": None})  # fmt: skip
            else:
                err = {
                    "error": {"message": f"fake status {code}", "type": "invalid_request_error" if code < 500 else "server_error"}
                }
                err_lines.append({"id": rid, "custom_id": cid, "response": {"status_code": code, "request_id": rid, "body": err},
                                  "error": None})  # fmt: skip
        if self.faults.get("shuffle"):
            random.Random(7).shuffle(ok_lines)
        batch["status"] = status
        batch["request_counts"] = {"total": len(lines), "completed": len(ok_lines), "failed": len(err_lines)}
        if ok_lines:
            out = self._store(ok_lines)
            if batch["_late"]:
                batch["_held_output"] = out  # shown on the next poll
            else:
                batch["output_file_id"] = out
        if err_lines:
            batch["error_file_id"] = self._store(err_lines)

    def _store(self, lines: list[dict[str, Any]]) -> str:
        fid = self._id("file")
        data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "purpose": "batch_output", "data": data,
                           "created_at": int(self.clock)}  # fmt: skip
        return fid

    async def _chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.stats["online"] += 1
        return _json(_answer(body))

    # ---- Anthropic Message Batches: the same batches, in Anthropic's shapes -------------------
    async def _a_create(self, request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        requests = req.get("requests") or []
        ids = [r.get("custom_id") for r in requests]
        if not requests or len(set(ids)) != len(ids) or not all(isinstance(i, str) and _ANTHROPIC_ID.fullmatch(i) for i in ids):
            return _json({"type": "error", "error": {"type": "invalid_request_error", "message": "bad custom_id"}}, 400)
        lines = [{"custom_id": r["custom_id"], "body": r["params"]} for r in requests]
        bid = "msgbatch_" + self._id("a")
        self.batches[bid] = {"id": bid, "kind": "anthropic", "status": "in_progress", "created_at": int(self.clock),
                             "expires_at": int(self.clock) + 86400, "request_counts": {}, "output_file_id": None,
                             "error_file_id": None, "_lines": lines,
                             "_done_at": self.clock + float(self.faults.get("duration", 60)), "_late": False}  # fmt: skip
        self.stats["batches_created"] += 1
        for line in lines:
            self.lines_seen[line["custom_id"]] += 1
        if sleep := self.faults.get("create_sleep"):
            await asyncio.sleep(float(sleep))
        return _json(self._anthropic(self.batches[bid]))

    async def _a_retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _json({"type": "error", "error": {"type": "not_found_error", "message": "no such batch"}}, 404)
        self.stats["polls"] += 1
        self._step(batch)
        return _json(self._anthropic(batch))

    async def _a_list(self, request: web.Request) -> web.Response:
        ordered = sorted((b for b in self.batches.values() if b.get("kind") == "anthropic"), key=lambda b: b["id"], reverse=True)
        self.stats["lists"] += 1
        return _json({"data": [self._anthropic(b) for b in ordered[: int(request.query.get("limit", 20))]], "has_more": False})

    async def _a_cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _json({"type": "error", "error": {"type": "not_found_error", "message": "no such batch"}}, 404)
        self.stats["cancels"] += 1
        if batch["status"] not in TERMINAL:
            batch["status"], batch["_cancel_at"] = "cancelling", self.clock
        return _json(self._anthropic(batch))

    async def _a_results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None or batch["status"] not in TERMINAL:
            return _json({"type": "error", "error": {"type": "invalid_request_error", "message": "not ended"}}, 400)
        out = []
        for fid in (batch.get("output_file_id"), batch.get("error_file_id")):
            if fid:
                out += [orjson.loads(x) for x in self.files[fid]["data"].splitlines()]
        lines = []
        for line in out:
            resp, err = line.get("response"), line.get("error")
            if resp and resp["status_code"] == 200:
                result = {"type": "succeeded", "message": _anthropic_message(resp["body"])}
            elif resp:
                etype = "api_error" if resp["status_code"] >= 500 else "invalid_request_error"
                result = {
                    "type": "errored",
                    "error": {"type": "error", "error": {"type": etype, "message": resp["body"]["error"]["message"]}},
                }
            else:
                result = {"type": "expired" if "expired" in str(err) else "canceled"}
            lines.append(orjson.dumps({"custom_id": line["custom_id"], "result": result}))
        return web.Response(body=b"\n".join(lines), content_type="application/binary")

    def _anthropic(self, batch: dict[str, Any]) -> dict[str, Any]:
        state = {"cancelling": "canceling"}.get(batch["status"], "ended" if batch["status"] in TERMINAL else "in_progress")
        total = len(batch["_lines"])
        counts = batch.get("request_counts") or {}
        done = counts.get("completed", 0)
        failed = counts.get("failed", 0)
        ended = state == "ended"
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch["created_at"]))
        return {"id": batch["id"], "type": "message_batch", "processing_status": state, "created_at": iso,
                "request_counts": {"processing": 0 if ended else total, "succeeded": done if ended else 0,
                                   "errored": failed if ended and batch["status"] == "completed" else 0,
                                   "canceled": failed if ended and batch["status"] == "cancelled" else 0,
                                   "expired": failed if ended and batch["status"] == "expired" else 0},
                "cancel_initiated_at": iso if batch.get("_cancel_at") is not None else None}  # fmt: skip

    # ---- test controls ------------------------------------------------------------------
    async def _advance(self, request: web.Request) -> web.Response:
        self.advance(float(request.query.get("s", "0")))
        return _json({"clock": self.clock})

    async def _set_faults(self, request: web.Request) -> web.Response:
        self.faults.update(orjson.loads(await request.read()))
        return _json(self.faults)

    async def _stats(self, request: web.Request) -> web.Response:
        return _json({**self.stats, "lines_seen": dict(self.lines_seen)})


def _anthropic_message(chat: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion the fake built, as an Anthropic message (a tool call as a tool_use block)."""
    usage = chat.get("usage") or {}
    message = chat["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    content: list[dict[str, Any]] = [
        {"type": "tool_use", "id": f"toolu_{i}", "name": c["function"]["name"], "input": orjson.loads(c["function"]["arguments"])}
        for i, c in enumerate(calls)
    ] or [{"type": "text", "text": message["content"]}]
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": chat.get("model"), "content": content,
            "stop_reason": "tool_use" if calls else "end_turn",
            "usage": {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}}  # fmt: skip


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def main() -> None:  # python tests/fakebatch.py: prints READY <url>, serves until killed
    server = FakeBatchServer().start()
    print(f"READY {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
