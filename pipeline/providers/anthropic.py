"""Anthropic Messages (and compatible endpoints such as ModelsLab's /v1/messages).

As in Anthropic's SDK, the base URL is the part before `/v1/messages`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline import errors
from pipeline.providers.base import (
    Completion,
    Wire,
    clip,
    decode,
    http_error,
    maybe_json,
    retry_after,
    usage_of,
)
from pipeline.providers.modelslab import classify_message
from pipeline.providers.openai import row_params
from pipeline.requests.media import Attachment
from pipeline.requests.structured import TOOL_NAME
from pipeline.requests.tools import anthropic_calls, anthropic_choice, anthropic_tools

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024  # the API requires max_tokens; used when the user sets none


def content_blocks(attachments: Sequence[Attachment]) -> list[dict[str, Any]]:
    """Anthropic's `image` and `document` (PDF) blocks: base64 sources, or a URL source for the API to fetch."""
    blocks: list[dict[str, Any]] = []
    for a in attachments:
        source: dict[str, Any]
        if a.data is None:
            source = {"type": "url", "url": a.url}
        else:
            source = {"type": "base64", "media_type": a.mime, "data": base64.b64encode(a.data).decode("ascii")}
        blocks.append({"type": "document" if a.document else "image", "source": source})
    return blocks


class AnthropicMessages(Wire):
    json_mode = None  # the schema goes as a forced tool, which every Messages server takes

    PATH = "/v1/messages"

    def _own_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-api-key": api_key or "", "anthropic-version": API_VERSION}

    def _ready(self, api_key: str | None) -> None:
        spec = self._spec
        params: dict[str, Any] = {"max_tokens": spec.max_tokens or DEFAULT_MAX_TOKENS}
        if spec.temperature is not None:
            params["temperature"] = spec.temperature
        if spec.top_p is not None:
            params["top_p"] = spec.top_p
        if spec.system:
            params["system"] = spec.system
        if spec.schema is not None:
            # Anthropic's way to structured output: one tool whose input is the schema, and it must be used.
            params["tools"] = [
                {"name": TOOL_NAME, "description": "Record the fields extracted from the input.", "input_schema": spec.schema}
            ]
            params["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
        if spec.tools is not None:
            params["tools"] = anthropic_tools(spec.tools)
            if spec.tool_choice is not None:
                params["tool_choice"] = anthropic_choice(spec.tool_choice)
        params.update(spec.params)
        self._params = params

    def use_json_object(self) -> bool:
        return False

    def body(
        self,
        payload: str,
        extra: str | None = None,
        followup: list[dict[str, str]] | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> bytes:
        params = self._params
        if self._spec.conversation:
            turns = orjson.loads(payload)
            # Messages has no "system" role: such turns join the top-level system prompt.
            system = [t["content"] for t in turns if t.get("role") == "system"]
            messages = [t for t in turns if t.get("role") != "system"]
            if system:
                params = {**params, "system": "\n\n".join([*([params["system"]] if "system" in params else []), *system])}
        elif attachments:  # images first: Claude works best with images before the text about them
            messages = [{"role": "user", "content": [*content_blocks(attachments), {"type": "text", "text": payload}]}]
        else:
            messages = [{"role": "user", "content": payload}]
        if followup:
            messages = [*messages, *followup]
        return orjson.dumps({"model": self._spec.model, "messages": messages, **params, **row_params(extra)})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        if status != 200:
            data = maybe_json(body)
            err = data.get("error") if isinstance(data, dict) else None
            message = str(err.get("message", "")) if isinstance(err, dict) else body[:200].decode("utf-8", "replace")
            if status == 529:  # "overloaded": Anthropic's own transient status
                raise errors.ServerError(
                    f"HTTP 529: {clip(message)}", kind="http_529", retry_after=retry_after(headers), overloaded=True
                )
            raise http_error(status, message, wait=retry_after(headers))
        data = decode(body)
        if isinstance(data, dict) and data.get("status") == "error":
            # ModelsLab's Anthropic-compatible endpoint answers errors with HTTP 200, as its chat API does.
            message = str(data.get("message") or "unknown error")
            raise classify_message(message, status, retry_after(headers, data.get("retry_after")))
        if not isinstance(data, dict) or data.get("type") == "error":
            raise errors.ErrorReply(f"HTTP 200 with an error: {clip(orjson.dumps(data).decode(), 200)}", kind="error_reply")
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise errors.ErrorReply("reply has no content blocks", kind="no_content")
        tool_inputs = [b.get("input") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
        if self._spec.schema is not None and tool_inputs:
            text = orjson.dumps(tool_inputs[0]).decode()  # the structured answer is the tool call's input
        else:  # "" for an answer that only calls tools: an answer all the same
            text = "".join(b.get("text") or "" for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        prompt_tokens, completion_tokens = usage_of(data, "input_tokens", "output_tokens")
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=data.get("stop_reason") if isinstance(data.get("stop_reason"), str) else None,
            model=data.get("model") if isinstance(data.get("model"), str) else self._spec.model,
            tool_calls=anthropic_calls(blocks) if self._spec.tools is not None else None,
        )
