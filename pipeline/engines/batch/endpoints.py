"""The provider's batch endpoints over our transport: OpenAI's files and batches (and every server that
copies them), Anthropic's Message Batches translated to the same shape. A hiccup of the API (429, 5xx,
no connection) is retried for up to --max-wait; other refusals raise at once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import orjson

from pipeline import errors
from pipeline.engines.batch.ledger import Ledger
from pipeline.providers.base import clip, decode, endpoint, http_error, retry_after

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")  # a batch in one of these states is over
CALL_BACKOFF_MAX = 30.0  # seconds: a call answered 429/5xx/no connection is tried again, waits doubling up to this


class OpenAIBatches:
    """OpenAI's files and batches endpoints (and every server that copies them), over our transport."""

    def __init__(
        self, transport: Any, base_url: str, headers: Mapping[str, str], secrets: tuple[str, ...], *, max_wait: float = 900.0
    ) -> None:
        self._transport, self._base, self._headers, self._secrets = transport, base_url, dict(headers), secrets
        self._max_wait = max_wait

    async def _call(
        self, method: str, path: str, body: Any = None, *, upload: tuple[str, bytes] | None = None, raw: bool = False
    ) -> Any:
        """One call of the batch API. A 429, a 5xx or no connection is a hiccup of the API, not of the
        batches: the call is tried again (after Retry-After, else waits doubling to CALL_BACKOFF_MAX)
        for up to --max-wait, and only then raises WaitTooLong. Other refusals raise at once."""
        url = endpoint(self._base, path)
        data = orjson.dumps(body) if body is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        attempt = 0
        while True:
            attempt += 1
            try:
                status, headers, reply = await self._transport.request(method, url, self._headers, data, upload=upload)
            except errors.TransientError as exc:
                err: errors.RequestError = exc
            else:
                for secret in self._secrets:
                    if len(secret) >= 8:
                        reply = reply.replace(secret.encode(), b"***")
                if 200 <= status < 300:
                    return reply if raw else decode(reply)
                err = _error_of(status, headers, reply)
                if not isinstance(err, errors.TransientError):
                    raise err
            left = deadline - loop.time()
            if left <= 0:
                raise errors.WaitTooLong(
                    f"the batch API has not answered {method} {path} well for {self._max_wait:.0f} s (--max-wait; last: "
                    f"{err.message})",
                    kind="outage",
                ) from None
            wait = err.retry_after if err.retry_after is not None else min(CALL_BACKOFF_MAX, 0.5 * 2**attempt)
            await asyncio.sleep(min(left, wait * random.uniform(0.8, 1.2)))

    async def upload(self, name: str, data: bytes) -> str:
        return str((await self._call("POST", "/files", upload=(name, data)))["id"])

    async def create(self, file_id: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h", "metadata": metadata}
        return dict(await self._call("POST", "/batches", body))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return dict(await self._call("POST", f"/batches/{batch_id}/cancel"))

    async def content(self, file_id: str) -> bytes:
        return bytes(await self._call("GET", f"/files/{file_id}/content", raw=True))

    async def find(self, local: str, since: float, known: set[str] | None = None) -> dict[str, Any] | None:
        """The batch whose metadata names `local`, created after `since` (newest first, page by page)."""
        after: str | None = None
        while True:
            page = await self._call("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            data = page.get("data") or []
            for batch in data:
                if (batch.get("metadata") or {}).get("pipeline_local") == local:
                    return dict(batch)
            if not page.get("has_more") or not data or min(int(b.get("created_at") or 0) for b in data) < since - 600:
                return None
            after = data[-1]["id"]


class AnthropicBatches(OpenAIBatches):
    """Anthropic's Message Batches, behind the same calls: the requests go inline with the create (no file
    upload), results come as one stream, and a batch carries no metadata, so a batch a killed run created
    is found by its size and time. Their shapes are translated here into OpenAI's, so the rest is shared."""

    STATES: ClassVar[dict[str, str]] = {"in_progress": "in_progress", "canceling": "cancelling", "ended": "completed"}
    ERROR_STATUS: ClassVar[dict[str, int]] = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                    "overloaded_error": 529}  # fmt: skip

    def __init__(
        self,
        transport: Any,
        base_url: str,
        headers: Mapping[str, str],
        secrets: tuple[str, ...],
        read: Callable[[str], bytes],
        *,
        max_wait: float = 900.0,
    ) -> None:
        super().__init__(transport, base_url, headers, secrets, max_wait=max_wait)
        self._read = read  # the request file of a local batch, by its name

    async def upload(self, name: str, data: bytes) -> str:
        return "inline:" + name.removesuffix(".jsonl")  # nothing to upload: create sends the requests

    async def create(self, file_id: str, metadata: dict[str, str]) -> dict[str, Any]:
        lines = [orjson.loads(raw) for raw in self._read(file_id.removeprefix("inline:")).splitlines() if raw.strip()]
        requests = [{"custom_id": x["custom_id"], "params": x["body"]} for x in lines]
        return self._shape(await self._call("POST", "/v1/messages/batches", {"requests": requests}))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._shape(await self._call("GET", f"/v1/messages/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._shape(await self._call("POST", f"/v1/messages/batches/{batch_id}/cancel"))

    async def content(self, file_id: str) -> bytes:
        """The results stream, as OpenAI batch-output lines."""
        raw = bytes(await self._call("GET", f"/v1/messages/batches/{file_id.removeprefix('results:')}/results", raw=True))
        out = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = orjson.loads(line)
            result = item.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded":
                response: dict[str, Any] | None = {"status_code": 200, "body": result.get("message")}
                error = None
            elif kind == "errored":
                err = (result.get("error") or {}).get("error") or result.get("error") or {}
                status = self.ERROR_STATUS.get(str(err.get("type")), 400)
                response, error = {"status_code": status, "body": {"type": "error", "error": err}}, None
            else:  # canceled, expired: not answered, worth sending again
                response, error = None, {"code": f"batch_{kind}", "message": f"request {kind}"}
            out.append(orjson.dumps({"custom_id": item.get("custom_id"), "response": response, "error": error}))
        return b"\n".join(out)

    async def find(self, local: str, since: float, known: set[str] | None = None) -> dict[str, Any] | None:
        """No metadata to match: the one batch created since `since` with as many requests as `local`'s file,
        among those the ledger does not already hold (`known`): another file of the same size is not it.
        None when there is none (it was never created: safe to create); an error when several match."""
        n = sum(1 for raw in self._read(local).splitlines() if raw.strip())
        page = await self._call("GET", "/v1/messages/batches?limit=100")
        matches = []
        for batch in page.get("data") or []:
            if batch.get("id") in (known or set()):
                continue
            created = _epoch(batch.get("created_at"))
            if created is not None and created >= since - 60 and sum((batch.get("request_counts") or {}).values()) == n:
                matches.append(batch)
        if len(matches) > 1:
            ids = ", ".join(str(b.get("id")) for b in matches)
            raise errors.ConfigError(
                f"A run was stopped while creating a batch, and {len(matches)} batches could be it ({ids}). "
                "Cancel the extra ones in the console, then run again."
            )
        return self._shape(matches[0]) if matches else None

    def _shape(self, batch: Any) -> dict[str, Any]:
        state = self.STATES.get(str(batch.get("processing_status")), str(batch.get("processing_status")))
        counts = dict(batch.get("request_counts") or {})
        if state == "completed" and counts.get("canceled") and not counts.get("processing"):
            state = "cancelled" if batch.get("cancel_initiated_at") else state
        ended = state in TERMINAL
        counts["completed"] = counts.get("succeeded", 0)  # OpenAI's names, for the status line
        counts["failed"] = sum(counts.get(k, 0) for k in ("errored", "canceled", "expired"))
        return {"id": batch.get("id"), "status": state, "request_counts": counts, "errors": None,
                "output_file_id": f"results:{batch.get('id')}" if ended else None, "error_file_id": None}  # fmt: skip


def _epoch(value: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _error_of(status: int, headers: Mapping[str, str], reply: bytes) -> errors.RequestError:
    data = decode(reply) if reply else None
    message = ""
    if isinstance(data, dict):
        err = data.get("error")
        message = str(err.get("message") if isinstance(err, dict) else err or "")
    return http_error(status, f"HTTP {status}: {clip(message or reply[:200])}", wait=retry_after(headers))


def batch_api(
    provider_name: str,
    transport: Any,
    base_url: str,
    headers: Mapping[str, str],
    secrets: tuple[str, ...],
    ledger: Ledger,
    *,
    max_wait: float = 900.0,
) -> OpenAIBatches:
    """The batch endpoints of the job's provider."""
    if provider_name == "anthropic":
        return AnthropicBatches(
            transport, base_url, headers, secrets, lambda local: ledger.requests_file(local).read_bytes(), max_wait=max_wait
        )
    return OpenAIBatches(transport, base_url, headers, secrets, max_wait=max_wait)
