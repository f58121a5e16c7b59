"""What every provider adapter shares: the neutral reply type and HTTP status rules.

An adapter is a small object with `url`, `headers`, `body(prompt)` and
`parse(status, headers, body)`. It does no I/O: the transport sends the bytes,
and `parse` either returns a `Completion` or raises a `RequestError` whose
class tells the retry policy what to do.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson

from pipeline import errors
from pipeline.config import CREDENTIAL_HEADERS
from pipeline.requests.media import Attachment
from pipeline.requests.prompts import RequestSpec


@dataclass(frozen=True, slots=True)
class Completion:
    text: str  # the first choice's text ("" for an answer that only calls tools)
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    model: str | None
    tool_calls: tuple[dict[str, Any], ...] | None = None  # {name, arguments} per call, when the request offered tools
    choices: tuple[tuple[str, str | None], ...] | None = None  # (text, finish reason) of each choice, when n > 1 was asked


class Provider(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def secrets(self) -> tuple[str, ...]:
        """The API key and header values read from the environment, so that replies echoing them can be masked."""
        ...

    @property
    def sends_key(self) -> bool:
        """Whether requests carry a credential (the key, or a header the user gave for one)."""
        ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def json_mode(self) -> str | None:
        """How the schema is asked for right now ("json_schema", "json_object"), None if not in response_format."""
        ...

    def use_json_object(self) -> bool:
        """Ask for the schema as json_object from now on; False when this adapter cannot."""
        ...

    def body(
        self,
        payload: str,
        extra: str | None = None,
        followup: list[dict[str, str]] | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> bytes:
        """Request bytes for one row: a prompt (or a JSON list of messages), per-row parameters as a
        JSON object, turns that ask again after an invalid reply, and the row's images and documents."""
        ...

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion: ...


def usage_of(data: dict[str, Any], prompt_field: str, completion_field: str) -> tuple[int | None, int | None]:
    """Token counts from a reply's `usage`, or None where the server sent none (or nonsense)."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return _count(usage.get(prompt_field)), _count(usage.get(completion_field))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        snippet = body[:120].decode("utf-8", "replace")
        raise errors.MalformedReply(f"reply is not valid JSON: {snippet!r}", kind="malformed_reply") from None


def maybe_json(body: bytes) -> Any:
    """The body parsed, or None: error replies are not always JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


MAX_RETRY_AFTER = 366 * 86400.0  # longer is nonsense; the run stops on anything past --max-wait anyway


def retry_after(headers: Mapping[str, str], body_value: Any = None) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, Retry-After (seconds or a date), or a body field.

    NaN and infinity count as no wait named; a wait is clamped to [0, a year]."""
    for seconds in _waits(headers, body_value):
        if seconds is not None and math.isfinite(seconds):
            return min(max(0.0, seconds), MAX_RETRY_AFTER)
    return None


def _waits(headers: Mapping[str, str], body_value: Any) -> Iterator[float | None]:
    ms = headers.get("retry-after-ms")
    if ms:
        yield _number(ms, scale=0.001)
    value = headers.get("retry-after")
    if value:
        seconds = _number(value)
        if seconds is None:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, OverflowError):
                seconds = None  # neither seconds nor a date: as if the server named no wait
        yield seconds
    if isinstance(body_value, int | float) and not isinstance(body_value, bool):
        yield float(body_value)


def _number(text: str, *, scale: float = 1.0) -> float | None:
    try:
        return float(text) * scale
    except ValueError:
        return None


def clip(message: object, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Said only by out-of-quota answers. Not "billing": OpenAI's ordinary rate-limit
# message links to the billing page, and a rate limit must back off, not stop.
QUOTA_WORDS = ("insufficient_quota", "exceeded your current quota", "credit balance", "insufficient credit", "out of credits")


# A 429 about requests in flight (ModelsLab: "Maximum 5 queued requests allowed") asks for
# fewer at once; one about requests or tokens per unit of time asks for a slower pace.
_CONCURRENCY_WORDS = ("queued request", "concurrent", "in flight", "in-flight", "parallel request", "simultaneous")
_RATE_WORDS = (
    "per minute",
    "per second",
    "per day",
    "per hour",
    "rpm",
    "tpm",
    "rpd",
    "requests per",
    "tokens per",
    "limit reached for",
)
_NAMED_LIMIT = re.compile(
    r"(?:maximum|max|limit(?: of)?|up to)\s+(\d{1,5})\s+(?:queued|concurrent|parallel|simultaneous|in[- ]flight)"
)


def limit_scope(message: str) -> tuple[str, int | None]:
    """Whether a 429's message is about requests in flight ("concurrency") or per unit of time ("rate"), and
    the in-flight limit when the message names it; "unknown" when it does not say."""
    low = message.lower()
    if any(w in low for w in _CONCURRENCY_WORDS):
        m = _NAMED_LIMIT.search(low)
        return "concurrency", int(m[1]) if m and int(m[1]) > 0 else None
    if any(w in low for w in _RATE_WORDS):
        return "rate", None
    return "unknown", None


# A request the server's validation refused: servers built on pydantic (llama-cpp-python,
# some proxies) answer that with a 500, but the same body gets the same answer every time.
_VALIDATION = re.compile(
    r"\bvalidation errors?\b|input should be|field required|extra inputs are not permitted|"
    r"failed to deserialize the json body|unknown variant"
)


def request_refused(message: str) -> bool:
    """Whether an error message is a validation error of the request itself (certain to repeat)."""
    return _VALIDATION.search(message.lower()) is not None


class SchemaFormatRefused(errors.PermanentError):
    """The server does not take response_format json_schema (llama-cpp-python answers 500, TGI 422):
    the engine switches the run to json_object once and sends the row again, uncharged."""


def refuses_json_schema(status: int, message: str) -> bool:
    """A refusal of the response_format form, not of the schema in it. OpenAI's "Invalid schema for
    response_format" is the user's schema at fault: another form would only hide that."""
    low = message.lower()
    return (
        status in (200, 400, 422, 500, 501)  # 200: ModelsLab says every error so
        and ("json_schema" in low or "response_format" in low)
        and "invalid schema" not in low
    )


def http_error(status: int, message: str, *, wait: float | None, quota: bool = False) -> errors.RequestError:
    """Map a non-2xx answer to the exception class the retry policy acts on."""
    text = f"HTTP {status}: {clip(message)}" if message else f"HTTP {status}"
    kind = f"http_{status}"
    if quota or status == 402 or any(w in message.lower() for w in QUOTA_WORDS):
        return errors.OutOfQuota(text, kind="quota")
    if status in (401, 403):
        return errors.KeyRefused(text, kind=kind)
    if status == 429:
        scope, limit = limit_scope(message)
        return errors.RateLimited(text, kind=kind, retry_after=wait, scope=scope, limit=limit)
    if status in (501, 505):  # not implemented, HTTP version not supported: the same answer every time
        return errors.PermanentError(text, kind=kind)
    if status >= 500 and request_refused(message):
        return errors.PermanentError(text, kind=kind)
    if status in (408, 409) or status >= 500:
        return errors.ServerError(text, kind=kind, retry_after=wait, overloaded=status in (503, 529))
    return errors.PermanentError(text, kind=kind)


def endpoint(base_url: str, path: str) -> str:
    """`path` appended to the base URL's path, its query kept after it: Azure OpenAI's base
    .../deployments/NAME?api-version=2024-06-01 gives .../deployments/NAME/chat/completions?api-version=..."""
    parts = urlsplit(base_url.strip())
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))


def json_headers(own: Mapping[str, str], user: Mapping[str, str] | None = None) -> dict[str, str]:
    """The adapter's headers with the user's laid over them; a user header replaces the adapter's
    of the same name in any case (its own Authorization or api-key for a gateway, say)."""
    merged = {"Content-Type": "application/json", "Accept": "application/json", **own}
    if user:
        names = {name.lower() for name in user}
        merged = {k: v for k, v in merged.items() if k.lower() not in names}
        merged.update(user)
    return merged


class Wire:
    """What every adapter holds besides its format: where it posts, the headers (the user's over its
    own), the values to mask in replies, and whether any credential goes out (for a 401's advice)."""

    PATH: ClassVar[str]  # appended to the base URL

    def __init__(
        self,
        base_url: str,
        spec: RequestSpec,
        api_key: str | None,
        headers: Mapping[str, str] | None = None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self._spec = spec
        self.url = endpoint(base_url, self.PATH)
        self.headers = json_headers(self._own_headers(api_key), headers)
        self.secrets = tuple(s for s in (api_key, *secrets) if s)
        self.sends_key = bool(api_key) or any(name.lower() in CREDENTIAL_HEADERS for name in headers or {})
        self._ready(api_key)

    def _own_headers(self, api_key: str | None) -> dict[str, str]:
        """The adapter's headers (its way of sending the key); the user's are laid over them."""
        return {}

    def _ready(self, api_key: str | None) -> None:
        """What the adapter precomputes once per run from the spec."""
