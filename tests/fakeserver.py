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
(400) -> max_in_flight (429) -> rpm (429) -> tpm (429) -> random fault -> directives -> slot
-> latency.  ModelsLab answers auth and validation errors with HTTP 200 ``{"status": "error",
...}`` like the real one.  ``count_tokens`` and ``/v1/models`` ignore directives, slots and
latency.  Rate windows admit max(1, int(rpm / 60)) requests per wall-clock second ("second") or
int(rpm) in any sliding 60 s ("minute"); rejected requests are not counted in either window.

Limits, each a keyword of FakeLLMServer and a CLI option (read per request):
  tpm / --tpm: a token window beside the request one, same rate_window; a chat request costs
      P + its max_tokens (or max_completion_tokens, else 0) at admission, as OpenAI and Azure
      charge.  A request larger than the whole budget still passes when the window is empty.
  rate_headers / --rate-headers openai|anthropic|none (--no-ratelimit-headers = none): on every
      answer of a chat request, errors and ModelsLab included, when rpm or tpm is set.  Values
      describe the windows when the answer is sent.  openai: ``x-ratelimit-{limit,remaining,
      reset}-{requests,tokens}``, reset a Go duration ("532ms", "1.2s", "1m0s", "0s" when
      full).  anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
      {limit,remaining,reset}``, reset an RFC 3339 UTC instant, plus ``Date``.  The limit is
      the per-minute figure even with the per-second window (as OpenAI quantizes); remaining
      counts the current window; reset is when the window is back to full (the next
      wall-clock second, or the newest entry leaving the sliding minute).  input-tokens and
      output-tokens are reported against the same tpm, which enforces only their sum.
  clock_skew_s / --clock-skew-s: added to every absolute time sent (Date, RFC 3339 resets).
  limit_schedule / --limit-schedule "0:6000,15:3000,35:6000": rpm becomes the value at t
      seconds after the first chat request since start or reset().
  in_flight_message / --in-flight-message named|generic: the max_in_flight 429 names N
      ("Maximum N queued requests allowed.", ModelsLab only, as today) or says "Rate limit
      exceeded. Please try again later." on every dialect.
  slots / --slots: vLLM-like, at most that many requests in service (slow, hang, latency);
      the rest wait in a FIFO queue, never rejected.  A client that gives up leaves it.
  refuse_formats / --refuse-format TYPE (repeatable): OpenAI-dialect requests whose
      response_format type is one of these are answered as llama-cpp-python 0.3 answers
      json_schema (checked against the real server): HTTP 500, its pydantic message ("1 validation
      error: ... 'loc': ('body', 'response_format', 'type'), 'msg': "Input should be 'text' or
      'json_object'", 'input': 'json_schema' ..."), type internal_server_error.  Checked right
      after auth, as its request validation comes first.
  auth_header / --auth-header NAME: with api_key, OpenAI-dialect requests are authorized by this
      header holding the key (Azure's ``api-key``) instead of ``Authorization: Bearer``; a 401
      echoes what the header held.
Azure OpenAI's path ``/openai/deployments/{name}/chat/completions`` speaks the OpenAI dialect and
answers 404 "Resource not found" without an ``api-version`` query parameter, as Azure does.
``GET /timeline`` (and ``timeline()``) counts chat answers per second since the first chat
request: ``{"t0": <monotonic>, "buckets": [{"t": s, "ok": n, "429": n, "other": n,
"ok_by_model": {model: n}}]}``, only seconds with answers, a small dict per second.

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
anyOf/oneOf their first choice.  A request that offers tools (OpenAI ``tools`` with ``function.parameters``,
Anthropic ``tools`` with ``input_schema``) is answered with a call to one, its arguments such an instance
of the tool's parameters: the tool ``tool_choice`` names, else the first; none with ``tool_choice`` none.
OpenAI sends the call as ``message.tool_calls`` with ``content`` null and the arguments as JSON text,
finish reason ``tool_calls``; Anthropic as a ``tool_use`` block, stop reason ``tool_use``.  ``notool``
answers in text even so (a model that chose not to call), ``badjson`` too.  ``n`` (OpenAI dialects) gives
n choices: choice i is choice 0's text with `` #i`` after it, each cut to max_tokens alone, the
completion tokens their sum; Anthropic answers ``n`` with a 400, as its API does.  ``@S`` is seconds
(float) for ``slow`` and the Retry-After of ``429`` (default 1).  ``xN`` limits a directive
to N attempts; without it the directive covers every remaining attempt.  Directives form a
queue consumed in order: with ``[[fault:500x1]][[fault:503x1]]`` attempt 1 gets 500,
attempt 2 gets 503, attempt 3+ succeed.  Attempts are counted per (path, raw content) and
only for requests that reached the directive stage (passed every earlier check).
Unknown directives are answered with 400 so typos fail loudly.  ``reset`` closes the socket
with an RST: aiohttp clients see ``ClientOSError`` (errno 104, ConnectionResetError).

Images and documents in a request (OpenAI ``image_url`` and ``file`` parts, Anthropic ``image`` and
``document`` blocks) are decoded and checked as the real APIs check them (400 for a damaged base64, a
media type the API does not take, bytes that are not what the media type says, an Anthropic image
over 5 MB of base64), and echoed after the text, one label each, so a test sees what arrived:
``[image image/png 1234 bytes sha256:<first 16 hex>]``, ``[document application/pdf ...]``, or
``[image-url <url>]`` / ``[document-url <url>]`` for a URL sent unfetched.  They are billed as prompt
tokens by the providers' published rules for PNG and GIF sizes (OpenAI: 85 + 170 a 512 px tile, or
85 with detail low; Anthropic: width x height / 750 after scaling to 1568 px, at most 1,600), 85
(OpenAI) or 1,600 (Anthropic) for other images and URLs, and 1,000 a document.
``serve_file(name, data)`` serves bytes at ``GET /files/<name>`` (an image server for tests of
http(s) image URLs; stats count ``file_gets``), ``serve_file(name, None)`` makes it a 404.

Run standalone: ``python tests/fakeserver.py --port 0`` prints ``READY http://...``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import hashlib
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
from datetime import UTC, datetime
from email.utils import formatdate
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
    "oddretry", "oddusage", "ratelink", "notool",
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
    query: str = ""  # the raw query string, e.g. "api-version=2024-06-01"


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


def _prompt_tokens(body: dict[str, Any], dialect: Dialect, media: list[_Media] | None = None) -> int:
    """Words and messages, and the images and documents (`media`: as decoded already, else decoded here)."""
    n = sum(len(_text(m.get("content")).split()) + 3 for m in body["messages"])
    if dialect == "anthropic":
        n += len(_text(body.get("system")).split())
    found = _media(body, dialect) if media is None else media
    return n + (sum(m.tokens for m in found) if isinstance(found, list) else 0)


@dataclass(frozen=True)
class _Media:
    """One image or document of a request, as decoded."""

    kind: str  # "image" or "document"
    mime: str | None
    size: int | None  # bytes decoded; None for a URL
    sha: str | None  # sha256 of the bytes
    url: str | None
    tokens: int

    def label(self) -> str:
        if self.url is not None:
            return f"[{self.kind}-url {self.url}]"
        return f"[{self.kind} {self.mime} {self.size} bytes sha256:{(self.sha or '')[:16]}]"


_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8", "application/pdf": b"%PDF-"}


def _media(body: Any, dialect: Dialect) -> list[_Media] | str:
    """Every image and document part of the request, or the message of the 400 the API would answer."""
    found: list[_Media] = []
    messages = body.get("messages") if isinstance(body, dict) else None
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict) or part.get("type") in ("text", None):
                continue
            got = _anthropic_part(part) if dialect == "anthropic" else _openai_part(part)
            if isinstance(got, str):
                return got
            found.append(got)
    return found


def _openai_part(part: dict[str, Any]) -> _Media | str:
    kind = part.get("type")
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else None
        if not isinstance(url, str):
            return "Invalid 'image_url': expected an object with a 'url'."
        detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
        if detail not in ("low", "high", "auto"):
            return f"Invalid value for 'detail': {detail!r}."
        if not url.startswith("data:"):
            return _Media("image", None, None, None, url, 85)
        head, _, data = url.partition(",")
        mime = head[5:].removesuffix(";base64")
        if mime not in _IMAGE_TYPES or not head.endswith(";base64"):
            return "Invalid MIME type. Only image types are supported."
        raw = _b64(data)
        if raw is None or not raw.startswith(_MAGIC.get(mime, b"RIFF")):
            return "You uploaded an unsupported image. Please make sure your image is valid."
        if len(raw) > 20_000_000:
            return "Image too large: images must be at most 20 MB."
        size = _png_or_gif_size(raw)
        tokens = 85 if detail == "low" or size is None else _tiles(*size)
        return _Media("image", mime, len(raw), hashlib.sha256(raw).hexdigest(), None, tokens)
    if kind == "file":
        spec = part.get("file")
        data = spec.get("file_data") if isinstance(spec, dict) else None
        if not isinstance(data, str) or not data.startswith("data:application/pdf;base64,"):
            return "Invalid 'file': expected file_data as a data:application/pdf;base64 URL."
        raw = _b64(data.partition(",")[2])
        if raw is None or not raw.startswith(b"%PDF-"):
            return "The file is not a valid PDF."
        return _Media("document", "application/pdf", len(raw), hashlib.sha256(raw).hexdigest(), None, 1000)
    return f"Invalid content part type: {kind!r}."


def _anthropic_part(part: dict[str, Any]) -> _Media | str:
    kind = part.get("type")
    if kind not in ("image", "document"):
        return f"messages: Input tag '{kind}' found using 'type' does not match any of the expected tags"
    source = part.get("source")
    if not isinstance(source, dict):
        return f"messages: {kind}.source: Field required"
    if source.get("type") == "url":
        url = source.get("url")
        return _Media(kind, None, None, None, str(url), 1600 if kind == "image" else 1000)
    if source.get("type") != "base64":
        return f"messages: {kind}.source.type: Input should be 'base64' or 'url'"
    mime, data = source.get("media_type"), source.get("data")
    allowed = _IMAGE_TYPES if kind == "image" else ("application/pdf",)
    if mime not in allowed:
        return f"messages: {kind}.source.media_type: Input should be " + " or ".join(repr(a) for a in allowed)
    if not isinstance(data, str):
        return f"messages: {kind}.source.data: Field required"
    if kind == "image" and len(data) > 5 * 1024 * 1024:
        return "messages: image exceeds 5 MB maximum"
    raw = _b64(data)
    if raw is None:
        return f"messages: {kind}.source.data: invalid base64 data"
    if not raw.startswith(_MAGIC.get(str(mime), b"RIFF")):
        return f"messages: Image does not match the provided media type {mime}"
    size = _png_or_gif_size(raw) if kind == "image" else None
    tokens = 1000 if kind == "document" else 1600 if size is None else _area(*size)
    return _Media(kind, str(mime), len(raw), hashlib.sha256(raw).hexdigest(), None, tokens)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _png_or_gif_size(raw: bytes) -> tuple[int, int] | None:
    if raw.startswith(b"\x89PNG") and raw[12:16] == b"IHDR":
        return struct.unpack(">II", raw[16:24])  # type: ignore[return-value]
    if raw.startswith(b"GIF8"):
        return struct.unpack("<HH", raw[6:10])  # type: ignore[return-value]
    return None


def _tiles(w: int, h: int) -> int:
    """OpenAI's published rule, detail high: fit 2048 x 2048, short side to 768, 85 + 170 a 512 px tile."""
    fw, fh = float(w), float(h)
    s = min(1.0, 2048 / max(fw, fh))
    fw, fh = fw * s, fh * s
    s = min(1.0, 768 / min(fw, fh))
    fw, fh = fw * s, fh * s
    return 85 + 170 * math.ceil(fw / 512) * math.ceil(fh / 512)


def _area(w: int, h: int) -> int:
    """Anthropic's published rule: width x height / 750, after scaling to a 1568 px long edge and ~1,600 tokens."""
    s = min(1.0, 1568 / max(w, h), math.sqrt(1600 * 750 / (w * h)))
    return min(1600, math.ceil(w * s * h * s / 750))


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


def _null_field(value: object, where: str) -> str | None:
    """The path of the first null inside messages (messages[0].name), if any."""
    if value is None:
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found = _null_field(inner, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def _validate(body: object, dialect: Dialect, kind: Kind) -> str | None:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "Missing required parameter: 'messages'."
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "Invalid 'messages': every message needs a 'role'."
    if dialect != "modelslab" and (where := _null_field(messages, "messages")) is not None:
        # As OpenAI answers a message with "name": null (an optional field filled in by a table reader).
        return f"Invalid type for '{where}': expected a value, but got null instead."
    if not (body.get("model_id") if dialect == "modelslab" else None) and not body.get("model"):
        return "You must provide a model parameter."
    if body.get("stream"):
        return "The fake server does not support streaming."
    if dialect == "anthropic" and "n" in body:  # as the Messages API answers a parameter it does not have
        return "n: Extra inputs are not permitted"
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if kind == "chat" and dialect == "anthropic" and limit is None:
        return "max_tokens: Field required"
    if limit is not None and (type(limit) is not int or limit < 1):
        return "Invalid 'max_tokens': expected an integer >= 1."
    return None


def _error(
    dialect: Dialect,
    status: int,
    msg: str | None = None,
    *,
    wait: float | None = None,
    etype: str | None = None,
    oa_type: str | None = None,
) -> _Reply:
    """An error in the dialect's shape; ``wait`` becomes Retry-After (a body field on ModelsLab).

    ``etype`` replaces the error type (and the OpenAI code); ``oa_type`` only the OpenAI type."""
    default_type, an_type, default = _ERRORS.get(status) or _ERRORS[500 if status >= 500 else 400]
    oa_type = oa_type or default_type
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


def _refuse_format(sent: str, refused: tuple[str, ...]) -> _Reply:
    """llama-cpp-python's answer to a response_format type it does not know: pydantic's validation
    error surfaced as a 500 (byte for byte but for the traceback's file path)."""
    allowed = " or ".join(f"'{t}'" for t in ("text", "json_object", "json_schema") if t not in refused)
    message = (
        "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
        f"'msg': \"Input should be {allowed}\", 'input': '{sent}', 'ctx': {{'expected': \"{allowed}\"}}}}\n\n"
        '  File "/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in create_chat_completion\n'
        "    POST /v1/chat/completions"
    )
    body = {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}}
    return 500, orjson.dumps(body), None, False


def _go_duration(seconds: float) -> str:
    """OpenAI's reset format: "0s", "532ms", "1.2s", "1m0s"; rounded up so a client never waits too little."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{secs}" if minutes else secs


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_schedule(text: str) -> tuple[list[float], list[float]]:
    """ "0:6000,15:3000" -> ([0, 15], [6000, 3000]), sorted by time; raises ValueError on garbage."""
    steps = sorted((float(at), float(rpm)) for at, rpm in (part.split(":") for part in text.split(",")))
    if not steps or any(at < 0 or rpm <= 0 for at, rpm in steps):
        raise ValueError(f"bad limit schedule {text!r}: expected 'seconds:rpm,...'")
    return [at for at, _ in steps], [rpm for _, rpm in steps]


class _Window:
    """What was admitted per wall-clock second ("second") or in any sliding 60 s ("minute").

    A cost is a tuple whose first item is what the budget limits; the others (input and output
    tokens) are only reported.  Both shapes are kept so rate_window may change mid-run.  Called
    with the server's lock held."""

    def __init__(self, parts: int) -> None:
        self._parts = parts
        self.clear()

    def clear(self) -> None:
        self._second, self._in_second = 0, [0] * self._parts
        self._log: deque[tuple[float, tuple[int, ...]]] = deque()
        self._in_log = [0] * self._parts
        self._newest = [0.0] * self._parts  # when the newest entry with each part > 0 came (wall or monotonic)

    def used(self, per_second: bool, wall: float, now: float) -> list[int]:
        if per_second:
            return self._in_second if int(wall) == self._second else [0] * self._parts
        log, in_log = self._log, self._in_log
        while log and log[0][0] <= now - 60.0:
            for i, c in enumerate(log.popleft()[1]):
                in_log[i] -= c
        return in_log

    def wait(self, per_second: bool, budget: int, cost: int, wall: float, now: float) -> float | None:
        """None when `cost` fits (always in an empty window, or a big request could never pass),
        else the seconds until it would."""
        used = self.used(per_second, wall, now)[0]
        if used == 0 or used + cost <= budget:
            return None
        if per_second:
            return int(wall) + 1 - wall
        for t, c in self._log:  # oldest first: when has enough left?
            used -= c[0]
            if used == 0 or used + cost <= budget:
                return t + 60.0 - now
        return 60.0  # not reached: the loop ends with used == 0

    def add(self, per_second: bool, cost: tuple[int, ...], wall: float, now: float) -> None:
        if per_second:
            if int(wall) != self._second:
                self._second, self._in_second = int(wall), [0] * self._parts
            totals = self._in_second
        else:
            self._log.append((now, cost))
            totals = self._in_log
        for i, c in enumerate(cost):
            totals[i] += c
            if c:
                self._newest[i] = wall if per_second else now

    def drained_in(self, per_second: bool, part: int, wall: float, now: float) -> float:
        """Seconds until `part` of the window is back to full: 0 when it is."""
        if self.used(per_second, wall, now)[part] == 0:
            return 0.0
        return int(wall) + 1 - wall if per_second else max(0.0, self._newest[part] + 60.0 - now)


class FakeLLMServer:
    """A real HTTP server on 127.0.0.1:random-port speaking OpenAI chat completions, ModelsLab
    v7 and Anthropic Messages, with fault injection and a record of every request received.

    ``stats()`` counts: "requests" (arrivals), "ok" (well-formed successful completions, not
    malformed/error200/nochoices), "status_<code>" per HTTP status answered, "no_response"
    (reset directive, client gave up, or server stopped), "in_flight" and
    "max_in_flight_seen" (concurrent handlers, rejected ones included; with latency 0 a
    handler never yields, so expect 1 there).  With ``slots``: "slot_served" (requests that got a
    slot), "queue_wait_ms_total" (their summed wait for it), "max_queue_seen" and
    "max_in_service_seen".  "billed_prompt_tokens" / "billed_completion_tokens" (present once one is
    billed): the usage of every answer that carried usage, as an invoice would sum it.  Received.status is 0 while a request is still being handled and for
    requests that never got an answer.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        rpm: float | None = None,
        rate_window: Literal["second", "minute"] = "minute",
        tpm: float | None = None,
        rate_headers: Literal["openai", "anthropic", "none"] = "openai",
        clock_skew_s: float = 0.0,
        limit_schedule: str | None = None,
        max_in_flight: int | None = None,
        in_flight_message: Literal["named", "generic"] = "named",
        slots: int | None = None,
        refuse_formats: tuple[str, ...] = (),
        auth_header: str | None = None,
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
        self.tpm, self.rate_headers, self.clock_skew_s = tpm, rate_headers, clock_skew_s
        self.in_flight_message, self.slots = in_flight_message, slots
        self.refuse_formats, self.auth_header = tuple(refuse_formats), auth_header
        if limit_schedule is not None:
            _parse_schedule(limit_schedule)  # a typo fails here, not as a 500 on the first request
        self.limit_schedule = limit_schedule
        self.host, self.port, self.url = host, port, ""
        self._lock = threading.Lock()  # guards everything below shared with the test thread
        self._records: list[Received] = []
        self._files: dict[str, tuple[bytes, str]] = {}  # name -> (bytes, content type) served at GET /files/<name>
        self._generation = 0  # bumped by reset() so late finishers don't touch fresh stats
        self._stats: dict[str, int] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._requests = _Window(1)
        self._tokens = _Window(3)  # (prompt + max_tokens, prompt, max_tokens)
        self._t0: float | None = None  # first chat request since start/reset: schedule and timeline clock
        self._timeline: dict[int, dict[str, Any]] = {}
        self._schedule: tuple[str, list[float], list[float]] | None = None  # parsed limit_schedule, by text
        self._schedule_step: tuple[str, int] | None = None  # the step last applied to rpm
        self._queue_wait_s = 0.0
        # Slot state lives on the event loop only: no lock.
        self._serving = 0
        self._waiting = 0
        self._queue: deque[asyncio.Future[None]] = deque()
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
            return {**self._stats, "in_flight": self._in_flight, "queue_wait_ms_total": round(self._queue_wait_s * 1000)}

    def timeline(self) -> dict[str, Any]:
        """Chat answers per second since the first chat request (see the module docstring)."""
        with self._lock:
            buckets = [{"t": t, **b, "ok_by_model": dict(b["ok_by_model"])} for t, b in sorted(self._timeline.items())]
            return {"t0": self._t0, "buckets": buckets}

    def reset(self) -> None:
        """Clear records, stats, rate windows, timeline, schedule clock and directive attempt
        counters; reseed the random faults.  A rpm set by the schedule stays until its next step."""
        with self._lock:
            self._generation += 1
            self._records = []
            self._stats = {"requests": 0, "ok": 0, "no_response": 0, "max_in_flight_seen": self._in_flight}
            self._stats.update({f"status_{s}": 0 for s in _PRESET_STATUSES})
            self._stats.update(slot_served=0, max_queue_seen=self._waiting, max_in_service_seen=self._serving)
            self._queue_wait_s = 0.0
            self._attempts.clear()
            self._requests.clear()
            self._tokens.clear()
            self._t0, self._schedule_step = None, None
            self._timeline = {}
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
        for path in ("/v1/chat/completions", "/chat/completions", "/openai/deployments/{deployment}/chat/completions"):
            add("POST", path, partial(serve, dialect="openai", kind="chat"))
        add("POST", "/api/v7/llm/chat/completions", partial(serve, dialect="modelslab", kind="chat"))
        for pre in ("", "/api/v7/llm"):
            add("POST", pre + "/v1/messages", partial(serve, dialect="anthropic", kind="chat"))
            add("POST", pre + "/v1/messages/count_tokens", partial(serve, dialect="anthropic", kind="count"))
        for path in ("/v1/models", "/models"):
            add("GET", path, partial(serve, dialect="openai", kind="models"))
        add("GET", "/files/{name}", self._http_file)
        add("GET", "/stats", self._http_stats)
        add("GET", "/timeline", self._http_timeline)
        add("POST", "/reset", self._http_reset)
        # handler_cancellation: a client that times out on `hang` frees its in-flight slot.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=1024).start()

    def serve_file(self, name: str, data: bytes | None, content_type: str = "application/octet-stream") -> str:
        """Serve `data` at GET /files/<name> (None: answer 404 there); returns its URL."""
        with self._lock:
            if data is None:
                self._files.pop(name, None)
            else:
                self._files[name] = (data, content_type)
        return f"{self.url}/files/{name}"

    async def _http_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with self._lock:
            self._stats["file_gets"] = self._stats.get("file_gets", 0) + 1
            found = self._files.get(name)
        if found is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=found[0], content_type=found[1])

    async def _http_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _http_timeline(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.timeline()), content_type="application/json")

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
            rec = Received(request.path, headers, body, content, 0, t, request.query_string)
        with self._lock:
            if kind == "chat":  # first, so a bad schedule set mid-run fails before any counter moves
                if self._t0 is None:
                    self._t0 = t
                if self.limit_schedule is not None:
                    self._follow_schedule(t - self._t0)
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
            if kind == "chat" and (rate := self._rate_headers()):
                extra = {**(extra or {}), **rate}
            if self.clock_skew_s and not (extra and "Date" in extra):
                extra = {**(extra or {}), "Date": formatdate(time.time() + self.clock_skew_s, usegmt=True)}
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
                    if kind == "chat" and status and self._t0 is not None:
                        self._count_answer(dialect, body, status, ok)

    def _count_answer(self, dialect: Dialect, body: Any, status: int, ok: bool) -> None:
        """One chat answer into its second of the timeline; caller holds the lock."""
        assert self._t0 is not None
        second = int(time.monotonic() - self._t0)
        bucket = self._timeline.get(second)
        if bucket is None:
            bucket = self._timeline[second] = {"ok": 0, "429": 0, "other": 0, "ok_by_model": {}}
        if ok:
            bucket["ok"] += 1
            model = str((body.get("model_id") if dialect == "modelslab" else None) or body.get("model"))
            bucket["ok_by_model"][model] = bucket["ok_by_model"].get(model, 0) + 1
        else:
            bucket["429" if status == 429 else "other"] += 1

    def _follow_schedule(self, elapsed: float) -> None:
        """Set rpm to the limit_schedule step in force `elapsed` s after t0; caller holds the lock.

        Applied on entering a step only, so a test that retunes rpm by hand keeps its value until the next one."""
        text = self.limit_schedule
        assert text is not None
        if self._schedule is None or self._schedule[0] != text:
            self._schedule = (text, *_parse_schedule(text))
        _, times, rpms = self._schedule
        step = bisect.bisect_right(times, elapsed) - 1
        if step >= 0 and self._schedule_step != (text, step):
            self._schedule_step = (text, step)
            self.rpm = rpms[step]

    def _rate_headers(self) -> dict[str, str]:
        """The window state as the provider's rate-limit headers, at the moment the answer is sent."""
        style, rpm, tpm = self.rate_headers, self.rpm, self.tpm
        if style == "none" or (rpm is None and tpm is None):
            return {}
        per_second = self.rate_window == "second"
        wall, now = time.time(), time.monotonic()
        dims: list[tuple[str, float, _Window, int]] = []  # (name, per-minute limit, window, part of its cost)
        if rpm is not None:
            dims.append(("requests", rpm, self._requests, 0))
        if tpm is not None:
            dims.append(("tokens", tpm, self._tokens, 0))
            if style == "anthropic":
                dims += [("input-tokens", tpm, self._tokens, 1), ("output-tokens", tpm, self._tokens, 2)]
        out: dict[str, str] = {}
        with self._lock:
            for name, per_minute, window, part in dims:
                budget = max(1, int(per_minute / 60) if per_second else int(per_minute))
                remaining = max(0, budget - window.used(per_second, wall, now)[part])
                reset = window.drained_in(per_second, part, wall, now)
                if style == "openai":
                    out[f"x-ratelimit-limit-{name}"] = str(int(per_minute))
                    out[f"x-ratelimit-remaining-{name}"] = str(remaining)
                    out[f"x-ratelimit-reset-{name}"] = _go_duration(reset)
                else:
                    out[f"anthropic-ratelimit-{name}-limit"] = str(int(per_minute))
                    out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
                    out[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(wall + self.clock_skew_s + reset)
        if style == "anthropic":  # clients must measure resets against this, not their own clock
            out["Date"] = formatdate(wall + self.clock_skew_s, usegmt=True)
        return out

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

    async def _take_slot(self, slots: int) -> bool:
        """Wait, first come first served, for one of `slots` places in service, as vLLM queues
        beyond max_num_seqs; never rejects.  Returns True once the place is held."""
        gen, t = self._generation, time.monotonic()
        if self._waiting == 0 and self._serving < slots:
            self._serving += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append(fut)
            self._waiting += 1
            with self._lock:
                self._stats["max_queue_seen"] = max(self._stats["max_queue_seen"], self._waiting)
            self._wake()  # slots may have been raised since the last release
            task = asyncio.current_task()
            assert task is not None
            self._sleepers.add(task)  # so stop() does not wait for the queue to drain
            try:
                await fut  # _wake counts us in _serving before it resolves fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed a place just as the client gave up
                    self._give_slot()
                raise
            finally:
                self._waiting -= 1
                self._sleepers.discard(task)
        with self._lock:
            if gen == self._generation:
                self._queue_wait_s += time.monotonic() - t
                self._stats["slot_served"] += 1
                self._stats["max_in_service_seen"] = max(self._stats["max_in_service_seen"], self._serving)
        return True

    def _give_slot(self) -> None:
        self._serving -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free places to the oldest waiters; a waiter that gave up left a cancelled future behind."""
        queue = self._queue
        while queue and (self.slots is None or self._serving < self.slots):
            fut = queue.popleft()
            if not fut.done():
                self._serving += 1
                fut.set_result(None)

    def _authorized(self, request: web.Request, dialect: Dialect, body: Any) -> bool:
        if self.api_key is None:
            return True
        if dialect == "anthropic":
            return request.headers.get("x-api-key") == self.api_key
        if self.auth_header is not None and dialect == "openai":
            return request.headers.get(self.auth_header) == self.api_key
        bearer = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        if dialect == "modelslab" and isinstance(body, dict):
            return bearer or body.get("key") == self.api_key
        return bearer

    def _admit(self, dialect: Dialect, tokens: tuple[int, int, int] | None) -> _Reply | None:
        """In-flight cap, request and token windows, random faults; caller holds the lock.

        ``tokens`` is (cost, prompt, max_tokens), None for requests that spend no tokens."""
        if self.max_in_flight is not None and self._in_flight > self.max_in_flight:
            if self.in_flight_message == "generic":
                msg: str | None = "Rate limit exceeded. Please try again later."
            else:
                named = f"Rate limit exceeded. Maximum {self.max_in_flight} queued requests allowed."
                msg = named if dialect == "modelslab" else None
            return _error(dialect, 429, msg, wait=1)
        rpm, tpm = self.rpm, self.tpm
        if tpm is None:
            tokens = None
        if rpm is not None or tokens is not None:
            per_second = self.rate_window == "second"
            wall, now = time.time(), time.monotonic()
            if rpm is not None:
                budget = max(1, int(rpm / 60) if per_second else int(rpm))
                wait = self._requests.wait(per_second, budget, 1, wall, now)
                if wait is not None:
                    return _error(dialect, 429, wait=max(1, math.ceil(wait)))
            if tokens is not None and tpm is not None:
                budget = max(1, int(tpm / 60) if per_second else int(tpm))
                wait = self._tokens.wait(per_second, budget, tokens[0], wall, now)
                if wait is not None:  # both checked before either counts: a rejected request costs nothing
                    return _error(dialect, 429, "Rate limit reached for tokens", wait=max(1, math.ceil(wait)), oa_type="tokens")
                self._tokens.add(per_second, tokens, wall, now)
            if rpm is not None:
                self._requests.add(per_second, (1,), wall, now)
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
            if self.auth_header is not None:
                return _error(
                    dialect, 401, f"Access denied: invalid {self.auth_header} {request.headers.get(self.auth_header, '')!r}"
                )
            return _error(
                dialect, 401, f"Incorrect API key provided: {request.headers.get('Authorization', '').removeprefix('Bearer ')}"
            )
        if dialect == "anthropic" and "anthropic-version" not in request.headers:
            return _error(dialect, 400, "anthropic-version: header is required")
        if kind == "models":
            return 200, _MODELS, None, True
        if "deployment" in request.match_info and "api-version" not in request.query:
            return 404, orjson.dumps({"error": {"code": "404", "message": "Resource not found"}}), None, False
        fmt = body.get("response_format") if isinstance(body, dict) else None
        if dialect == "openai" and isinstance(fmt, dict) and fmt.get("type") in self.refuse_formats:
            return _refuse_format(str(fmt["type"]), self.refuse_formats)
        problem = _validate(body, dialect, kind)
        media: list[_Media] = []
        if problem is None:
            decoded = _media(body, dialect)
            problem, media = (decoded, []) if isinstance(decoded, str) else (None, decoded)
        if problem is not None:
            if dialect == "modelslab":
                return 200, orjson.dumps({"status": "error", "message": problem}), None, False
            return _error(dialect, 400, problem)
        plan = _plan(content) if kind == "chat" and "[[fault:" in content else []
        if isinstance(plan, str):
            return _error(dialect, 400, f"fakeserver: unknown fault directive {plan!r}")
        attempt, tokens = 0, None
        if kind == "chat" and self.tpm is not None:  # charged at admission, as OpenAI and Azure do
            prompt, most = _prompt_tokens(body, dialect, media), body.get("max_tokens", body.get("max_completion_tokens")) or 0
            tokens = (prompt + most, prompt, most)
        with self._lock:
            rejected = self._admit(dialect, tokens)
            if rejected is None and plan:
                key = (request.path, content)
                attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        if rejected is not None:
            return rejected
        if kind == "count":
            return 200, orjson.dumps({"input_tokens": _prompt_tokens(body, dialect, media)}), None, True
        fault, fault_arg = "", None
        for fkind, arg, n in plan:
            if n is None or attempt <= n:
                fault, fault_arg = fkind, arg
                break
            attempt -= n
        return await self._apply(dialect, body, content, fault, fault_arg, media)

    async def _apply(
        self, dialect: Dialect, body: dict[str, Any], content: str, fault: str, arg: float | None, media: list[_Media]
    ) -> _Reply:
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
        held = self.slots is not None and await self._take_slot(self.slots)
        try:  # the service time: what a slot is held for
            if fault == "hang":
                await self._sleep(3600.0)
            elif fault == "slow" and arg:
                await self._sleep(arg)
            if self.latency > 0:
                await self._sleep(self.latency)
        finally:
            if held:
                self._give_slot()
        reply = self._success(dialect, body, content, fault=fault, usage=self.send_usage and fault != "nousage", media=media)
        if fault == "oddusage":  # usage of the wrong type, as some proxies send
            data = orjson.loads(reply[1])
            data["usage"] = "n/a"
            return reply[0], orjson.dumps(data), reply[2], reply[3]
        return reply

    def _success(
        self, dialect: Dialect, body: dict[str, Any], content: str, *, fault: str, usage: bool, media: list[_Media]
    ) -> _Reply:
        cleaned = _DIRECTIVE.sub("", content).strip() if "[[fault:" in content else content
        tool = None if fault in ("notool", "badjson") else _tool_to_call(body, dialect)
        # Anthropic's structured output is a forced tool: a tool call or nothing (tool_choice none, badjson).
        schema = tool[1] if tool is not None else None if dialect == "anthropic" else _requested_schema(body, dialect)
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
            reply = "echo: " + cleaned + "".join(" " + m.label() for m in media)
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        n = body.get("n") if dialect != "anthropic" and isinstance(body.get("n"), int) else 1
        # Choice i of n says the same with " #i" after it (choice 0 as without n), each cut to max_tokens alone.
        texts, cut = [], []
        for i in range(max(1, n)):
            words = (reply + (f" #{i}" if i else "")).split()
            cut.append(limit is not None and len(words) > limit)
            texts.append(" ".join(words[:limit]) if cut[-1] else (reply + (f" #{i}" if i else "")))
        truncated = cut[0]
        prompt, completion = _prompt_tokens(body, dialect, media), sum(len(t.split()) for t in texts)
        if usage:  # what a provider would invoice, for spend tests: only answers that carry usage are billed
            with self._lock:
                self._stats["billed_prompt_tokens"] = self._stats.get("billed_prompt_tokens", 0) + prompt
                self._stats["billed_completion_tokens"] = self._stats.get("billed_completion_tokens", 0) + completion
        k = next(self._ids)
        out: dict[str, Any]
        if dialect == "anthropic":
            out = {"id": f"msg_{k}", "type": "message", "role": "assistant", "model": body.get("model")}
            if tool_input is not None:  # structured output and tool calls arrive as a tool_use block
                name = tool[0] if tool is not None else body["tools"][0]["name"]
                out["content"] = [{"type": "tool_use", "id": f"toolu_{k}", "name": name, "input": tool_input}]
            else:
                out["content"] = [{"type": "text", "text": texts[0]}]
            stop = "tool_use" if tool is not None and tool_input is not None else "end_turn"
            out["stop_reason"], out["stop_sequence"] = "max_tokens" if truncated else stop, None
            if usage:
                out["usage"] = {"input_tokens": prompt, "output_tokens": completion}
        else:
            model = (body.get("model_id") if dialect == "modelslab" else None) or body.get("model")
            out = {"id": f"chatcmpl-{k}", "object": "chat.completion", "created": int(time.time()), "model": model}
            out["choices"] = []
            for i, text in enumerate(texts):
                if tool is not None and tool_input is not None:  # the call's arguments as JSON text, as OpenAI sends them
                    call = {"id": f"call_{k}_{i}", "type": "function", "function": {"name": tool[0], "arguments": text}}
                    message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
                    reason = "tool_calls"
                else:
                    message, reason = {"role": "assistant", "content": text}, "stop"
                out["choices"].append({"index": i, "message": message, "finish_reason": "length" if cut[i] else reason})
            if usage:
                out["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return 200, orjson.dumps(out), None, True


def _tool_to_call(body: dict[str, Any], dialect: Dialect) -> tuple[str, dict[str, Any]] | None:
    """The tool a request that offers tools is answered with a call to: the one its tool_choice names, else
    the first (a model that chose to call one); None for tool_choice none, or no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    if dialect == "anthropic":
        if isinstance(choice, dict) and choice.get("type") == "none":
            return None
        named = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" else None
        defs = [(t.get("name"), t.get("input_schema") or {}) for t in tools if isinstance(t, dict)]
    else:
        if choice == "none":
            return None
        named = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        fns = [t.get("function") or {} for t in tools if isinstance(t, dict)]
        defs = [(f.get("name"), f.get("parameters") or {"type": "object", "properties": {}}) for f in fns]
    return next(((str(name), schema) for name, schema in defs if named is None or name == named), None)


def _requested_schema(body: dict[str, Any], dialect: Dialect) -> dict[str, Any] | None:
    """The JSON Schema an OpenAI-dialect request asks its reply to follow in response_format, if any."""
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
    p.add_argument("--tpm", type=float, default=None)
    p.add_argument("--rate-headers", choices=("openai", "anthropic", "none"), default="openai")
    p.add_argument("--no-ratelimit-headers", dest="rate_headers", action="store_const", const="none")
    p.add_argument("--clock-skew-s", type=float, default=0.0)
    p.add_argument("--limit-schedule", default=None, help='e.g. "0:6000,15:3000,35:6000" (seconds:rpm)')
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--in-flight-message", choices=("named", "generic"), default="named")
    p.add_argument("--slots", type=int, default=None)
    p.add_argument("--refuse-format", dest="refuse_formats", action="append", default=[])
    p.add_argument("--auth-header", default=None)
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
