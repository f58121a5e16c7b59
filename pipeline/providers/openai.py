"""OpenAI-compatible chat completions: OpenAI, vLLM, llama.cpp, Ollama, the embedded model."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson

from pipeline import errors
from pipeline.providers.base import (
    Completion,
    SchemaFormatRefused,
    Wire,
    clip,
    decode,
    http_error,
    maybe_json,
    refuses_json_schema,
    retry_after,
    usage_of,
)
from pipeline.requests.media import Attachment
from pipeline.requests.prompts import RequestSpec
from pipeline.requests.structured import schema_instruction
from pipeline.requests.tools import openai_calls, openai_choice


def chat_messages(
    spec: RequestSpec, payload: str, followup: list[dict[str, str]] | None = None, attachments: Sequence[Attachment] = ()
) -> list[dict[str, Any]]:
    """System prompt (plus the schema, where the server is told it in words), then the row's turns;
    a row's images and documents go in its user turn, before its text."""
    system = spec.system or ""
    if spec.schema is not None and spec.json_mode == "json_object":
        system = (system + "\n\n" if system else "") + schema_instruction(spec.schema)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if spec.conversation:
        messages.extend(orjson.loads(payload))
    elif attachments:
        messages.append(
            {"role": "user", "content": [*content_parts(attachments, spec.image_detail), {"type": "text", "text": payload}]}
        )
    else:
        messages.append({"role": "user", "content": payload})
    if followup:
        messages.extend(followup)
    return messages


def content_parts(attachments: Sequence[Attachment], detail: str | None = None) -> list[dict[str, Any]]:
    """OpenAI's content parts: an image as `image_url` (a data: URL, or the URL for the server to fetch),
    a PDF as a `file` part (Chat Completions takes PDFs only as base64 file_data; ModelsLab takes a URL there too)."""
    parts: list[dict[str, Any]] = []
    for a in attachments:
        where = a.url if a.data is None else data_url(a)
        if a.document:
            parts.append({"type": "file", "file": {"filename": a.name, "file_data": where}})
        else:
            image: dict[str, Any] = {"url": where}
            if detail is not None:
                image["detail"] = detail
            parts.append({"type": "image_url", "image_url": image})
    return parts


def data_url(a: Attachment) -> str:
    assert a.data is not None
    return f"data:{a.mime};base64,{base64.b64encode(a.data).decode('ascii')}"


def row_params(extra: str | None) -> dict[str, Any]:
    """Per-row parameters from columns; a null cell means "use the run's value"."""
    if not extra:
        return {}
    return {k: v for k, v in orjson.loads(extra).items() if v is not None}


def generation_params(spec: RequestSpec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if spec.max_tokens is not None:
        params["max_tokens"] = spec.max_tokens
    if spec.temperature is not None:
        params["temperature"] = spec.temperature
    if spec.top_p is not None:
        params["top_p"] = spec.top_p
    if spec.schema is not None:
        if spec.json_mode == "json_object":
            # llama.cpp reads `schema` here and constrains decoding to it.
            params["response_format"] = {"type": "json_object", "schema": spec.schema}
        else:
            params["response_format"] = {"type": "json_schema", "json_schema": {"name": "fields", "schema": spec.schema}}
    if spec.tools is not None:
        params["tools"] = list(spec.tools)
        if spec.tool_choice is not None:
            params["tool_choice"] = openai_choice(spec.tool_choice)
    params.update(spec.params)
    return params


def parse_choices(data: Any, spec: RequestSpec) -> Completion:
    """Read an OpenAI-shaped success body; anything else is an error reply. An answer that calls tools and
    says nothing is an answer (its text ""); with n > 1, every choice is read, in the order of their index."""
    if not isinstance(data, dict):
        raise errors.ErrorReply(f"reply is not a JSON object: {clip(data, 120)}", kind="error_reply")
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise errors.ErrorReply(f"reply has no choices: {clip(orjson.dumps(data).decode(), 200)}", kind="no_choices")
    if spec.n > 1:
        choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    read = [_choice(c, spec) for c in choices]
    text, calls, reason = read[0]
    prompt_tokens, completion_tokens = usage_of(data, "prompt_tokens", "completion_tokens")
    return Completion(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=reason,
        model=_text_or_none(data.get("model")) or spec.model,
        tool_calls=calls,
        choices=tuple((t, r) for t, _, r in read) if spec.n > 1 else None,
    )


def _choice(choice: dict[str, Any], spec: RequestSpec) -> tuple[str, tuple[dict[str, Any], ...] | None, str | None]:
    """One choice's text, tool calls (None when the request offered no tools) and finish reason."""
    message = choice.get("message") or {}
    text = message.get("content") if isinstance(message, dict) else None
    calls = openai_calls(message) if spec.tools is not None else None
    if text is None:
        text = choice.get("text")  # some servers answer in the legacy completions shape
    if text is None and calls:
        text = ""  # the answer is its calls
    if not isinstance(text, str):
        raise errors.ErrorReply("reply's first choice has no text content", kind="no_content")
    return text, calls, _text_or_none(choice.get("finish_reason"))


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class SchemaForms(Wire):
    """The json_schema -> json_object switch, shared by the adapters that speak OpenAI's response_format."""

    _spec: RequestSpec
    _params: dict[str, Any]

    @property
    def json_mode(self) -> str | None:
        return self._spec.json_mode if self._spec.schema is not None else None

    def use_json_object(self) -> bool:
        if self._spec.schema is None:
            return False
        if self._spec.json_mode != "json_object":
            # Only the wire form changes: the request keys were made from the run's settings and stay,
            # so a resume finds the rows answered in either form.
            self._spec = replace(self._spec, json_mode="json_object")
            self._params = generation_params(self._spec)
        return True


class OpenAIChat(SchemaForms):
    PATH = "/chat/completions"

    def _own_headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _ready(self, api_key: str | None) -> None:
        self._params = generation_params(self._spec)

    def body(
        self,
        payload: str,
        extra: str | None = None,
        followup: list[dict[str, str]] | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> bytes:
        if self._spec.verbatim:  # a batch-request line's body: sent as the file gives it
            return payload.encode()
        messages = chat_messages(self._spec, payload, followup, attachments)
        return orjson.dumps({"model": self._spec.model, "messages": messages, **self._params, **row_params(extra)})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        if status != 200:
            data = maybe_json(body)
            err = data.get("error") if isinstance(data, dict) else None
            message = (
                err.get("message", "") if isinstance(err, dict) else (str(err) if err else body[:200].decode("utf-8", "replace"))
            )
            if refuses_json_schema(status, message):
                raise SchemaFormatRefused(f"HTTP {status}: {clip(message)}", kind=f"http_{status}")
            code = str(err.get("code") or err.get("type") or "") if isinstance(err, dict) else ""
            raise http_error(status, message, wait=retry_after(headers), quota=code == "insufficient_quota")
        data = decode(body)
        if isinstance(data, dict) and data.get("error"):
            raise errors.ErrorReply(f"HTTP 200 with an error: {clip(data['error'])}", kind="error_reply")
        return parse_choices(data, self._spec)
