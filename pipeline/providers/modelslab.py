"""ModelsLab v7 LLM API: OpenAI-shaped, but the key and `model_id` ride in the body
and errors may come back as HTTP 200 with `{"status": "error", "message": ...}`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline import errors
from pipeline.providers.base import (
    Completion,
    SchemaFormatRefused,
    clip,
    decode,
    http_error,
    limit_scope,
    refuses_json_schema,
    request_refused,
    retry_after,
)
from pipeline.providers.openai import SchemaForms, chat_messages, generation_params, parse_choices, row_params
from pipeline.requests.media import Attachment

_AUTH_WORDS = ("api key", "unauthori", "invalid key", "not authenticated")
_QUOTA_WORDS = ("credit", "balance", "quota", "subscription", "plan limit")
# Said only of the request itself: sending it again gets the same answer. Anything
# else ("Provider returned error", "Something went wrong", "Server Error, please try
# again") is the service having a bad moment, retried like a 5xx.
_PERMANENT_WORDS = (
    "required", "invalid", "must be", "must not", "not found", "does not exist", "doesn't exist", "not exist",
    "unknown model", "no such model", "not supported", "unsupported", "validation", "too long", "too large",
    "exceeds", "context length", "maximum context", "not allowed", "not a valid",
)  # fmt: skip


def classify_message(message: str, status: int, wait: float | None) -> errors.RequestError:
    low = message.lower()
    text = f"ModelsLab error (HTTP {status}): {clip(message)}"
    # Quota before rate limit: an exhausted account may also answer 429.
    if any(w in low for w in _QUOTA_WORDS):
        return errors.OutOfQuota(text, kind="quota")
    if status == 429 or "rate limit" in low or "queued requests" in low:
        # ModelsLab limits requests in flight per account (5, 10 or 15 by plan), not per minute.
        _, named = limit_scope(message)
        return errors.RateLimited(text, kind="rate_limited", retry_after=wait, scope="concurrency", limit=named)
    if any(w in low for w in _AUTH_WORDS) or status in (401, 403):
        return errors.KeyRefused(text, kind="auth")
    if status in (501, 505) or (status < 500 and any(w in low for w in _PERMANENT_WORDS)) or request_refused(message):
        return errors.ErrorReply(text, kind="error_reply")
    return errors.ServerError(text, kind="server_error", retry_after=wait, overloaded=status in (503, 529))


class ModelsLabChat(SchemaForms):
    PATH = "/chat/completions"

    def _ready(self, api_key: str | None) -> None:
        self._key = api_key or ""  # the key rides in the body, not in a header
        self._params = generation_params(self._spec)

    def body(
        self,
        payload: str,
        extra: str | None = None,
        followup: list[dict[str, str]] | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> bytes:
        messages = chat_messages(self._spec, payload, followup, attachments)  # images as OpenAI's parts
        return orjson.dumps(
            {"key": self._key, "model_id": self._spec.model, "messages": messages, **self._params, **row_params(extra)}
        )

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        data: Any
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            if status != 200:
                raise http_error(status, body[:200].decode("utf-8", "replace"), wait=retry_after(headers)) from None
            data = decode(body)  # raises MalformedReply
        if isinstance(data, dict) and (data.get("status") == "error" or (status != 200 and "message" in data)):
            message = str(data.get("message") or data.get("messege") or data.get("error") or "unknown error")
            if refuses_json_schema(status, message):
                raise SchemaFormatRefused(f"ModelsLab error (HTTP {status}): {clip(message)}", kind="error_reply")
            raise classify_message(message, status, retry_after(headers, data.get("retry_after")))
        if status != 200:
            raise http_error(status, clip(data), wait=retry_after(headers))
        return parse_choices(data, self._spec)
