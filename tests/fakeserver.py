"""A fake LLM provider: a real aiohttp server on 127.0.0.1 for tests and benchmarks.

Speaks OpenAI chat completions, ModelsLab v7 and Anthropic Messages, injects faults on
demand and records what it received.  Replies are deterministic: ``"echo: " + <last user
message with fault directives removed and surrounding whitespace stripped>``.

Token counting (deterministic, identical on every path):
  P (prompt/input) = whitespace-separated words of every message's text + 3 per message,
      plus the words of the top-level ``system`` on Anthropic paths.  Text is a string
      ``content`` or the ``text`` of each list part; counted on the raw text as received.
  C (completion/output) = words of the reply; when ``max_tokens`` (OpenAI also
      ``max_completion_tokens``) is below C the reply is cut to that many words
      (joined by single spaces) and the finish reason is "length" / "max_tokens".

Order of checks per request: auth (401; skipped when api_key is None) -> request validation
(400) -> max_in_flight (429) -> rpm (429) -> random fault -> directives -> latency.  ModelsLab
answers auth and validation errors with HTTP 200 ``{"status": "error", ...}`` like the real
one.  ``count_tokens`` and ``/v1/models`` ignore directives and latency.  Rate windows admit
max(1, int(rpm / 60)) requests per wall-clock second ("second") or int(rpm) in any sliding 60 s
("minute"); rejected requests are not counted in the window.

Fault directives live in the last user message that holds any: ``[[fault:KIND[@S][xN]]]``.
KIND is an HTTP status (e.g. 429, 500, 529), ``quota``, ``reset``, ``hang``, ``slow`` (needs
``@S``), ``malformed``, ``error200``, ``nochoices``, ``nousage``, ``empty``, ``oddretry`` (429
with ``Retry-After: soon``), ``oddusage`` (usage is a string), ``ratelink`` (OpenAI's rate-limit
message, which links to the billing page), or for requests
that ask for structured output ``badjson`` (prose instead of JSON) and ``wrongtype`` (JSON
whose first field has the wrong type).  A request with a schema (OpenAI ``response_format``
json_schema/json_object with ``schema``, or an Anthropic forced tool) is answered with a
deterministic instance of it: strings ``"<field>-value"``, integers the word count of the
content, numbers half that, booleans true, enums their first value, arrays two items,
anyOf/oneOf their first choice.  ``@S`` is seconds
(float) for ``slow`` and the Retry-After of ``429`` (default 1).  ``xN`` limits a directive
to N attempts; without it the directive covers every remaining attempt.  Directives form a
queue consumed in order: with ``[[fault:500x1]][[fault:503x1]]`` attempt 1 gets 500,
attempt 2 gets 503, attempt 3+ succeed.  Attempts are counted per (path, raw content) and
only for requests that reached the directive stage (passed every earlier check).
Unknown directives are answered with 400 so typos fail loudly.  ``reset`` closes the socket
with an RST: aiohttp clients see ``ClientOSError`` (errno 104, ConnectionResetError).

Run standalone: ``python tests/fakeserver.py --port 0`` prints ``READY http://...``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self

import orjson
from aiohttp import web

Dialect = Literal["openai", "modelslab", "anthropic"]
Kind = Literal["chat", "count", "models"]
# (status, body, extra headers, counts as a genuine success); status 0 = abort the connection
_Reply = tuple[int, bytes, dict[str, str] | None, bool]

_DIRECTIVE = re.compile(r"\[\[fault:([^\]]*)\]\]")
_NAMED_KINDS = (
    "quota", "reset", "hang", "slow", "malformed", "error200", "nochoices", "nousage", "empty", "badjson", "wrongtype",
    "oddretry", "oddusage", "ratelink",
)  # fmt: skip
# Kinds are spelled out: a generic [a-z]+ would swallow the "x" of "resetx2".
_SPEC = re.compile(rf"(?P<kind>\d{{3}}|{'|'.join(_NAMED_KINDS)})(?:@(?P<arg>\d+(?:\.\d*)?))?(?:x(?P<n>\d+))?")
# status -> (OpenAI error type, Anthropic error type, message)
_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request_error", "Invalid request"),
    401: ("invalid_request_error", "authentication_error", "Incorrect API key provided"),
    402: ("insufficient_quota", "billing_error", "Payment required"),
    403: ("permission_error", "permission_error", "You are not allowed to use this model"),
    404: ("invalid_request_error", "not_found_error", "The model does not exist"),
    408: ("timeout", "timeout_error", "Request timed out"),
    409: ("conflict", "invalid_request_error", "Conflict"),
    429: ("requests", "rate_limit_error", "Rate limit reached for requests"),
    500: ("server_error", "api_error", "The server had an error processing your request"),
    502: ("server_error", "api_error", "Bad gateway"),
    503: ("server_error", "api_error", "The engine is currently overloaded"),
    529: ("server_error", "overloaded_error", "Overloaded"),
}
_OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_ML_BAD_KEY = "Invalid API key. Please check your key."
_MODELS = b'{"object":"list","data":[{"id":"fake-model","object":"model"}]}'
_ERROR200 = b'{"status":"error","message":"Model is currently unavailable"}'
_PRESET_STATUSES = (200, *sorted(_ERRORS))


@dataclass(frozen=True)
class Received:
    """One request as the server saw it; ``status`` 0 means no HTTP answer (yet)."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any
    content: str
    status: int
    t: float


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return "\n".join(t for t in parts if isinstance(t, str))
    return ""


def _last_user(body: object) -> str:
    """The last user message that holds a fault directive, else the last user message.

    A client that re-asks (appending its own correction turn) keeps the row's
    directive, so attempts keep being counted against the same content."""
    messages = body.get("messages") if isinstance(body, dict) else None
    users = (
        [_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if isinstance(messages, list)
        else []
    )
    marked = [u for u in users if "[[fault:" in u]
    return (marked or users or [""])[-1]


def _prompt_tokens(body: dict[str, Any], dialect: Dialect) -> int:
    n = sum(len(_text(m.get("content")).split()) + 3 for m in body["messages"])
    if dialect == "anthropic":
        n += len(_text(body.get("system")).split())
    return n


def _plan(content: str) -> list[tuple[str, float | None, int | None]] | str:
    """Parse directives into (kind, @arg, xN); a str result is the offending spec."""
    plan: list[tuple[str, float | None, int | None]] = []
    spec: str
    for spec in _DIRECTIVE.findall(content):
        m = _SPEC.fullmatch(spec.strip())
        if not m or (m["kind"] == "slow" and m["arg"] is None):
            return spec
        arg = float(m["arg"]) if m["arg"] is not None else None
        plan.append((m["kind"], arg, int(m["n"]) if m["n"] is not None else None))
    return plan


def _validate(body: object, dialect: Dialect, kind: Kind) -> str | None:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "Missing required parameter: 'messages'."
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "Invalid 'messages': every message needs a 'role'."
    if not (body.get("model_id") if dialect == "modelslab" else None) and not body.get("model"):
        return "You must provide a model parameter."
    if body.get("stream"):
        return "The fake server does not support streaming."
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if kind == "chat" and dialect == "anthropic" and limit is None:
        return "max_tokens: Field required"
    if limit is not None and (type(limit) is not int or limit < 1):
        return "Invalid 'max_tokens': expected an integer >= 1."
    return None


def _error(
    dialect: Dialect, status: int, msg: str | None = None, *, wait: float | None = None, etype: str | None = None
) -> _Reply:
    """An error in the dialect's shape; ``wait`` becomes Retry-After (a body field on ModelsLab)."""
    oa_type, an_type, default = _ERRORS.get(status) or _ERRORS[500 if status >= 500 else 400]
    if dialect == "modelslab":
        if msg is None and status == 429:
            msg = "Rate limit exceeded. Maximum 5 queued requests allowed."
        body: dict[str, Any] = {"status": "error", "message": msg or default}
        if wait is not None:  # ModelsLab puts the delay in the body only, never in a Retry-After header
            body["retry_after"] = math.ceil(wait)
        return status, orjson.dumps(body), None, False
    if dialect == "anthropic":
        body = {"type": "error", "error": {"type": etype or an_type, "message": msg or default}}
    else:
        code = etype if etype is not None else _OPENAI_CODES.get(status)
        body = {"error": {"message": msg or default, "type": etype or oa_type, "param": None, "code": code}}
    return status, orjson.dumps(body), None if wait is None else {"Retry-After": f"{wait:g}"}, False


class FakeLLMServer:
    """A real HTTP server on 127.0.0.1:random-port speaking OpenAI chat completions, ModelsLab
    v7 and Anthropic Messages, with fault injection and a record of every request received.

    ``stats()`` counts: "requests" (arrivals), "ok" (well-formed successful completions, not
    malformed/error200/nochoices), "status_<code>" per HTTP status answered, "no_response"
    (reset directive, client gave up, or server stopped), "in_flight" and
    "max_in_flight_seen" (concurrent handlers, rejected ones included; with latency 0 a
    handler never yields, so expect 1 there).  Received.status is 0 while a request is
    still being handled and for requests that never got an answer.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        rpm: float | None = None,
        rate_window: Literal["second", "minute"] = "minute",
        max_in_flight: int | None = None,
        fault_rate: float = 0.0,
        fault_statuses: tuple[int, ...] = (500, 503),
        seed: int = 0,
        send_usage: bool = True,
        record: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        # Public and read per request, so a test may retune a running server.
        self.latency, self.api_key, self.rpm, self.rate_window = latency, api_key, rpm, rate_window
        self.max_in_flight, self.fault_rate = max_in_flight, fault_rate
        self.fault_statuses, self.seed = fault_statuses, seed
        self.send_usage, self.record = send_usage, record
        self.host, self.port, self.url = host, port, ""
        self._lock = threading.Lock()  # guards everything below shared with the test thread
        self._records: list[Received] = []
        self._generation = 0  # bumped by reset() so late finishers don't touch fresh stats
        self._stats: dict[str, int] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._window: deque[float] = deque()
        self._bucket = (0, 0)  # (wall-clock second, requests admitted in it)
        self._rng = random.Random(seed)
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._sleepers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.reset()

    # ---- public API ------------------------------------------------------------------
    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeLLMServer already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # bound here so a busy port raises in the caller
        host, port = sock.getsockname()[:2]
        self.port, self.url = port, f"http://{host}:{port}"
        self._loop = loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fakeserver", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._setup(sock), loop).result()
        except BaseException:
            sock.close()
            self.stop()
            raise
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._records)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "in_flight": self._in_flight}

    def reset(self) -> None:
        """Clear records, stats, rate windows and directive attempt counters; reseed the random faults."""
        with self._lock:
            self._generation += 1
            self._records = []
            self._stats = {"requests": 0, "ok": 0, "no_response": 0, "max_in_flight_seen": self._in_flight}
            self._stats.update({f"status_{s}": 0 for s in _PRESET_STATUSES})
            self._attempts.clear()
            self._window.clear()
            self._bucket = (0, 0)
            self._rng.seed(self.seed)  # same seed after reset -> same fault sequence

    # ---- event-loop thread -----------------------------------------------------------
    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Hanging/slow handlers would otherwise hold shutdown for their full sleep.
            for task in list(self._sleepers):
                task.cancel()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _setup(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        add, serve = app.router.add_route, self._serve
        for path in ("/v1/chat/completions", "/chat/completions"):
            add("POST", path, partial(serve, dialect="openai", kind="chat"))
        add("POST", "/api/v7/llm/chat/completions", partial(serve, dialect="modelslab", kind="chat"))
        for pre in ("", "/api/v7/llm"):
            add("POST", pre + "/v1/messages", partial(serve, dialect="anthropic", kind="chat"))
            add("POST", pre + "/v1/messages/count_tokens", partial(serve, dialect="anthropic", kind="count"))
        for path in ("/v1/models", "/models"):
            add("GET", path, partial(serve, dialect="openai", kind="models"))
        add("GET", "/stats", self._http_stats)
        add("POST", "/reset", self._http_reset)
        # handler_cancellation: a client that times out on `hang` frees its in-flight slot.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=1024).start()

    async def _http_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"reset":true}', content_type="application/json")

    async def _serve(self, request: web.Request, *, dialect: Dialect, kind: Kind) -> web.StreamResponse:
        t = time.monotonic()
        raw = await request.read() if request.body_exists else b""
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        content = _last_user(body)
        rec = None
        if self.record:
            headers = {k.lower(): v for k, v in request.headers.items()}
            rec = Received(request.path, headers, body, content, 0, t)
        with self._lock:
            gen, index = self._generation, len(self._records)
            self._in_flight += 1
            self._stats["requests"] += 1
            seen = self._stats["max_in_flight_seen"]
            self._stats["max_in_flight_seen"] = max(seen, self._in_flight)
            if rec is not None:
                self._records.append(rec)
        status, ok = 0, False
        try:
            status, payload, extra, ok = await self._answer(request, dialect, kind, body, content)
            if status == 0:
                self._abort(request)
                return web.Response()  # never sent: the transport is already gone
            return web.Response(status=status, body=payload, headers=extra, content_type="application/json")
        finally:
            with self._lock:
                self._in_flight -= 1
                if gen == self._generation:
                    key = f"status_{status}" if status else "no_response"
                    self._stats[key] = self._stats.get(key, 0) + 1
                    self._stats["ok"] += ok
                    if rec is not None:
                        self._records[index] = replace(rec, status=status)

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns the close into a real RST instead of a polite FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None  # always called from a request handler task
        self._sleepers.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._sleepers.discard(task)

    def _authorized(self, request: web.Request, dialect: Dialect, body: Any) -> bool:
        if self.api_key is None:
            return True
        if dialect == "anthropic":
            return request.headers.get("x-api-key") == self.api_key
        bearer = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        if dialect == "modelslab" and isinstance(body, dict):
            return bearer or body.get("key") == self.api_key
        return bearer

    def _admit(self, dialect: Dialect) -> _Reply | None:
        """In-flight cap, rate window and random faults; caller holds the lock."""
        if self.max_in_flight is not None and self._in_flight > self.max_in_flight:
            msg = f"Rate limit exceeded. Maximum {self.max_in_flight} queued requests allowed."
            return _error(dialect, 429, msg if dialect == "modelslab" else None, wait=1)
        if self.rpm is not None:
            if self.rate_window == "second":
                wall = time.time()
                second, used = self._bucket
                if int(wall) != second:
                    second, used = int(wall), 0
                if used >= max(1, int(self.rpm / 60)):
                    return _error(dialect, 429, wait=max(1, math.ceil(second + 1 - wall)))
                self._bucket = (second, used + 1)
            else:
                now, window = time.monotonic(), self._window
                while window and window[0] <= now - 60.0:
                    window.popleft()
                if len(window) >= max(1, int(self.rpm)):
                    return _error(dialect, 429, wait=max(1, math.ceil(window[0] + 60.0 - now)))
                window.append(now)
        if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            status = self._rng.choice(self.fault_statuses)
            return _error(dialect, status, wait=1 if status == 429 else None)
        return None

    async def _answer(self, request: web.Request, dialect: Dialect, kind: Kind, body: Any, content: str) -> _Reply:
        if not self._authorized(request, dialect, body):
            if dialect == "modelslab":  # ModelsLab reports auth failures with HTTP 200
                # Echo the rejected key, as careless servers do: clients must not write it anywhere.
                sent = body.get("key") if isinstance(body, dict) else None
                message = f"{_ML_BAD_KEY} Received key: {sent}" if sent else _ML_BAD_KEY
                return 200, orjson.dumps({"status": "error", "message": message}), None, False
            if dialect == "anthropic":
                return _error(dialect, 401, f"invalid x-api-key: {request.headers.get('x-api-key', '')}")
            return _error(
                dialect, 401, f"Incorrect API key provided: {request.headers.get('Authorization', '').removeprefix('Bearer ')}"
            )
        if dialect == "anthropic" and "anthropic-version" not in request.headers:
            return _error(dialect, 400, "anthropic-version: header is required")
        if kind == "models":
            return 200, _MODELS, None, True
        problem = _validate(body, dialect, kind)
        if problem is not None:
            if dialect == "modelslab":
                return 200, orjson.dumps({"status": "error", "message": problem}), None, False
            return _error(dialect, 400, problem)
        plan = _plan(content) if kind == "chat" and "[[fault:" in content else []
        if isinstance(plan, str):
            return _error(dialect, 400, f"fakeserver: unknown fault directive {plan!r}")
        attempt = 0
        with self._lock:
            rejected = self._admit(dialect)
            if rejected is None and plan:
                key = (request.path, content)
                attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        if rejected is not None:
            return rejected
        if kind == "count":
            return 200, orjson.dumps({"input_tokens": _prompt_tokens(body, dialect)}), None, True
        fault, fault_arg = "", None
        for fkind, arg, n in plan:
            if n is None or attempt <= n:
                fault, fault_arg = fkind, arg
                break
            attempt -= n
        return await self._apply(dialect, body, content, fault, fault_arg)

    async def _apply(self, dialect: Dialect, body: dict[str, Any], content: str, fault: str, arg: float | None) -> _Reply:
        if fault.isdigit():
            status = int(fault)
            return _error(dialect, status, wait=(1.0 if arg is None else arg) if status == 429 else None)
        if fault == "oddretry":  # a Retry-After that is neither seconds nor a date
            status, payload, _, ok = _error(dialect, 429)
            return status, payload, {"Retry-After": "soon"}, ok
        if fault == "ratelink":  # OpenAI's free-tier rate limit: mentions billing, is not a quota
            msg = "Rate limit reached for requests. Visit https://platform.openai.com/account/billing to add a payment method."
            return _error(dialect, 429, msg, wait=0.1, etype="rate_limit_exceeded")
        if fault == "quota":
            etype = "insufficient_quota" if dialect == "openai" else None
            return _error(dialect, 429, "You exceeded your current quota", etype=etype)
        if fault == "reset":
            return 0, b"", None, False
        if fault == "malformed":
            return 200, b'{"choices": [', None, False
        if fault == "error200":
            return 200, _ERROR200, None, False
        if fault == "nochoices":
            return 200, b'{"id":"x","object":"chat.completion"}', None, False
        if fault == "hang":
            await self._sleep(3600.0)
        elif fault == "slow" and arg:
            await self._sleep(arg)
        if self.latency > 0:
            await self._sleep(self.latency)
        reply = self._success(dialect, body, content, fault=fault, usage=self.send_usage and fault != "nousage")
        if fault == "oddusage":  # usage of the wrong type, as some proxies send
            data = orjson.loads(reply[1])
            data["usage"] = "n/a"
            return reply[0], orjson.dumps(data), reply[2], reply[3]
        return reply

    def _success(self, dialect: Dialect, body: dict[str, Any], content: str, *, fault: str, usage: bool) -> _Reply:
        cleaned = _DIRECTIVE.sub("", content).strip() if "[[fault:" in content else content
        schema = _requested_schema(body, dialect)
        tool_input: Any = None
        if fault == "empty":
            reply = ""
        elif schema is not None and fault != "badjson":
            tool_input = _instance(schema, "", len(cleaned.split()))
            if fault == "wrongtype":
                tool_input = _break(tool_input)
            reply = orjson.dumps(tool_input).decode()
        elif fault == "badjson":
            reply = "Sure! Here are the fields: {not json"
        else:
            reply = "echo: " + cleaned
        words = reply.split()
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        truncated = limit is not None and len(words) > limit
        if truncated:
            words = words[:limit]
            reply = " ".join(words)
        prompt, completion = _prompt_tokens(body, dialect), len(words)
        n = next(self._ids)
        out: dict[str, Any]
        if dialect == "anthropic":
            out = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body.get("model")}
            if tool_input is not None:  # structured output arrives as the forced tool's input
                out["content"] = [{"type": "tool_use", "id": f"toolu_{n}", "name": body["tools"][0]["name"], "input": tool_input}]
            else:
                out["content"] = [{"type": "text", "text": reply}]
            out["stop_reason"], out["stop_sequence"] = "max_tokens" if truncated else "end_turn", None
            if usage:
                out["usage"] = {"input_tokens": prompt, "output_tokens": completion}
        else:
            model = (body.get("model_id") if dialect == "modelslab" else None) or body.get("model")
            out = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": model}
            message = {"role": "assistant", "content": reply}
            out["choices"] = [{"index": 0, "message": message, "finish_reason": "length" if truncated else "stop"}]
            if usage:
                out["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return 200, orjson.dumps(out), None, True


def _requested_schema(body: dict[str, Any], dialect: Dialect) -> dict[str, Any] | None:
    """The JSON Schema a request asks its reply to follow, if any."""
    if dialect == "anthropic":
        tools = body.get("tools") or []
        return tools[0].get("input_schema") if tools and body.get("tool_choice") else None
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    if fmt.get("type") == "json_object":
        return fmt.get("schema") or {"type": "object", "properties": {}}
    return None


def _instance(schema: dict[str, Any], name: str, words: int) -> Any:
    """A deterministic value that satisfies `schema`: strings are '<name>-value', integers the
    prompt's word count, numbers half of it, booleans true, enums their first value, arrays two items."""
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("anyOf") or schema.get("oneOf"):
        return _instance((schema.get("anyOf") or schema["oneOf"])[0], name, words)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {k: _instance(sub, k, words) for k, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_instance(schema.get("items") or {"type": "string"}, name, words) for _ in range(2)]
    if kind == "integer":
        return words
    if kind == "number":
        return words / 2
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return f"{name}-value"


def _break(value: Any) -> Any:
    """The same object with its first field of the wrong type, to exercise schema validation."""
    if isinstance(value, dict) and value:
        first = next(iter(value))
        return {**value, first: 12345 if isinstance(value[first], str) else "not the right type"}
    return "not an object"


def main(argv: list[str] | None = None) -> int:
    # Every option's dest is a FakeLLMServer keyword, so the parsed namespace is passed straight through.
    p = argparse.ArgumentParser(description="Fake LLM provider for tests and benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--rate-window", choices=("second", "minute"), default="minute")
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    # Off by default so memory stays flat across millions of benchmark requests.
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--no-usage", dest="send_usage", action="store_false")
    server = FakeLLMServer(**vars(p.parse_args(argv)))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: done.set())
    with server:
        sys.stdout.write(f"READY {server.url}\n")
        sys.stdout.flush()
        while not done.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
