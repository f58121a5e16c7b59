"""Batch mode (`--mode batch`): the rows still to answer go through the provider's batch API at half
the price, answered within 24 hours; one unchanged command submits one night and collects the next.

One invocation, holding the checkpoint's lock throughout:
  1. replay the ledger, and settle a submit that a kill cut short (adopt the batch it created);
  2. poll each open batch once; fold each finished one into the checkpoint (its answers become
     checkpoint answers, exactly as online ones);
  3. write the rows still to answer into request files within the provider's limits, and submit each;
  4. with --wait, poll until nothing is open (the first poll after 2 s, then 1.5x longer each time, up to 5 min);
  5. nothing open: the output is written from the checkpoint as usual; else exit 3.

Never paying twice rests on the ledger (`<checkpoint>/batches/ledger.jsonl`, append-only, one fsync
per line; a torn last line is ignored): the request file is written and `prepared` recorded before
any network call, `created` as soon as the provider answers. A run killed in between finds
`prepared` without `created` and lists the provider's batches for the one whose metadata names it:
it adopts that batch instead of creating another. A key in an open batch is never submitted again;
an answered key never again. No key is in any file here: the API key travels in a header.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson

from pipeline import errors
from pipeline.providers import Provider, read_reply
from pipeline.providers.base import clip, decode, endpoint, http_error, retry_after
from pipeline.requests.prompts import estimate_tokens
from pipeline.tables.checkpoint import Checkpoint, Result
from pipeline.tables.responses import ResponseLog

BATCHES, LEDGER = "batches", "ledger.jsonl"
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
FIRST_POLL, POLL_FACTOR, POLL_MAX = 2.0, 1.5, 300.0  # --wait: seconds before the first poll, growth, cap
# OpenAI's limits per batch file (50,000 lines, 200 MB); files are cut at 95% of the bytes.
MAX_LINES, MAX_BYTES = 50_000, 200 * 1024 * 1024
CALL_BACKOFF_MAX = 30.0  # seconds: a call answered 429/5xx/no connection is tried again, waits doubling up to this


# ---- the ledger ---------------------------------------------------------------------------------


@dataclass
class Entry:
    """One batch file, from `prepared` to `folded`."""

    local: str
    n: int = 0
    ts: float = 0.0
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    folded: bool = False
    lost: bool = False

    @property
    def open(self) -> bool:
        """Not yet folded: its keys must not be sent again."""
        return not self.folded and not self.lost


class Ledger:
    """What was submitted and what became of it, in the checkpoint folder."""

    def __init__(self, checkpoint: Path) -> None:
        self.folder = checkpoint / BATCHES
        self.path = self.folder / LEDGER

    def append(self, event: str, **fields: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps({"event": event, "ts": time.time(), **fields}) + b"\n"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a line torn by a kill: end it, so this event stands on a line of its own
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        for raw in self.path.read_bytes().splitlines():
            try:
                yield orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a torn last line: the event it began did not happen as far as anyone knows

    def entries(self) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for e in self.events():
            local = e.get("local")
            if local is None:
                continue
            entry = found.setdefault(local, Entry(local))
            kind = e["event"]
            if kind == "prepared":
                entry.n, entry.ts = e["n"], e["ts"]
            elif kind == "uploaded":
                entry.file_id = e["file_id"]
            elif kind == "created":
                entry.batch_id, entry.status = e["batch_id"], e.get("status")
            elif kind == "status":
                entry.status, entry.counts = e["status"], e.get("counts") or {}
            elif kind == "folded":
                entry.folded = True
            elif kind == "lost":
                entry.lost = True
        return found

    def failed(self) -> dict[str, str]:
        """Keys whose answer was a permanent refusal: recorded as errors, never sent again."""
        out: dict[str, str] = {}
        for e in self.events():
            if e["event"] == "folded":
                out.update(e.get("failed") or {})
        return out

    def requests_file(self, local: str) -> Path:
        return self.folder / f"{local}.requests.jsonl"

    def keys_of(self, local: str) -> list[str]:
        path = self.requests_file(local)
        if not path.exists():
            return []
        return [orjson.loads(raw)["custom_id"] for raw in path.read_bytes().splitlines() if raw.strip()]

    def submissions(self, entries: Mapping[str, Entry]) -> Counter[str]:
        """How many created batches held each key: its attempts so far."""
        counts: Counter[str] = Counter()
        for entry in entries.values():
            if entry.batch_id is not None:
                counts.update(self.keys_of(entry.local))
        return counts

    def forget_orphans(self, entries: Mapping[str, Entry]) -> None:
        """Request files written by a run killed before it recorded `prepared`: never submitted."""
        if not self.folder.exists():
            return
        for path in self.folder.glob("*.requests.jsonl"):
            if path.name.removesuffix(".requests.jsonl") not in entries:
                path.unlink(missing_ok=True)


# ---- the provider's batch endpoints -------------------------------------------------------------


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


# ---- one invocation ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the batch step leaves for the run: answers folded, refusals, what is still open."""

    folded: list[Result] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> why (permanent): errors in the output
    open_batches: int = 0
    open_rows: int = 0
    submitted_batches: int = 0
    submitted_rows: int = 0
    fatal: errors.FatalError | None = None


class BatchStep:
    """Steps 1-4 of an invocation for one job; the caller writes the output (or exits 3)."""

    def __init__(
        self,
        api: OpenAIBatches,
        provider: Provider,
        ledger: Ledger,
        checkpoint: Checkpoint,
        *,
        max_lines: int,
        max_attempts: int,
        resubmit: bool = True,
        system: str | None,
        say: Callable[[str], None],
        sleep: Callable[[float], Any] = asyncio.sleep,
        cache: Any = None,
        responses: ResponseLog | None = None,
    ) -> None:
        self.api, self.provider, self.ledger, self.checkpoint = api, provider, ledger, checkpoint
        self.max_lines, self.max_attempts, self.system, self.say, self.sleep = max_lines, max_attempts, system or "", say, sleep
        self.resubmit = resubmit  # False (--fallback online): a line that failed in a batch is sent online instead
        self.cache = cache  # the answer cache (--cache): folded answers are kept there too
        self.responses = responses  # the lines' responses as received, for a batch-output output
        self.outcome = Outcome()

    async def run(
        self, pending: Callable[[set[str], dict[str, str]], Iterator[tuple[str, str, str | None]]], wait: bool
    ) -> Outcome:
        """`pending(exclude, failed)` yields (key, payload, extra) for each row the checkpoint has not answered;
        those in `exclude` (in an open batch, or answered by a batch folded now) and `failed` are skipped."""
        entries = self.ledger.entries()
        self.ledger.forget_orphans(entries)
        await self._recover(entries)
        delay = FIRST_POLL
        while True:
            await self._poll_all(entries)
            if self.outcome.fatal is not None:
                break
            attempts = self.ledger.submissions(entries)
            exclude = {k for e in entries.values() if e.open for k in self.ledger.keys_of(e.local)}
            exclude.update(r.request_key for r in self.outcome.folded if r.request_key)
            failed = {**self.ledger.failed(), **self.outcome.failed}
            await self._submit(pending(exclude, failed), attempts, entries)
            if not wait or not any(e.open for e in entries.values()):
                break
            await self.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(POLL_MAX, delay * POLL_FACTOR)
        open_entries = [e for e in entries.values() if e.open]
        self.outcome.open_batches = len(open_entries)
        self.outcome.open_rows = sum(e.n for e in open_entries)
        return self.outcome

    async def status(self) -> list[tuple[Entry, dict[str, Any] | None]]:
        """Every batch of the ledger, with what the provider says of the open ones now (changes nothing)."""
        shown: list[tuple[Entry, dict[str, Any] | None]] = []
        for entry in self.ledger.entries().values():
            live = await self.api.retrieve(entry.batch_id) if entry.open and entry.batch_id else None
            shown.append((entry, live))
        return shown

    async def cancel(self) -> Outcome:
        """Cancel every open batch, wait until the provider says cancelled, and fold what they finished;
        their other rows are pending again (sent by the next `run`)."""
        entries = self.ledger.entries()
        for entry in entries.values():
            if entry.open and entry.batch_id is None:  # never created as far as we know: adopt, never create now
                known = {e.batch_id for e in entries.values() if e.batch_id}
                found = await self.api.find(entry.local, entry.ts, known)
                if found is None:
                    self.ledger.append("lost", local=entry.local, why="cancelled before it was created")
                    entry.lost = True
                else:
                    self.ledger.append("created", local=entry.local, batch_id=found["id"], status=found.get("status"))
                    entry.batch_id = found["id"]
        await self._poll_all(entries)  # those already finished are folded, not cancelled
        for entry in entries.values():
            if entry.open and entry.batch_id is not None:
                await self.api.cancel(entry.batch_id)
                self.ledger.append("cancel_requested", local=entry.local, batch_id=entry.batch_id)
        delay = FIRST_POLL / 4
        while True:
            await self._poll_all(entries)
            if not any(e.open for e in entries.values()):
                return self.outcome
            await self.sleep(delay)
            delay = min(POLL_MAX, delay * POLL_FACTOR)

    async def _recover(self, entries: dict[str, Entry]) -> None:
        """`prepared` without `created`: adopt the batch that run created, or submit its file now."""
        for entry in entries.values():
            if entry.batch_id is not None or not entry.open:
                continue
            known = {e.batch_id for e in entries.values() if e.batch_id}
            found = await self.api.find(entry.local, entry.ts, known)
            if found is not None:
                self.ledger.append("created", local=entry.local, batch_id=found["id"], status=found.get("status"), adopted=True)
                entry.batch_id, entry.status = found["id"], found.get("status")
                self.say(f"pipeline: adopted batch {found['id']}, created by a run that stopped before recording it")
                continue
            try:
                await self._create(entry)
            except errors.PermanentError as exc:  # refused for good (not a bad key): its rows are pending again
                if isinstance(exc, errors.FatalError):
                    raise
                self.ledger.append("lost", local=entry.local, why=exc.message)
                entry.lost = True
                self.say(
                    f"pipeline: a batch file prepared by an earlier run was refused ({exc.message}); its rows are sent again"
                )

    async def _create(self, entry: Entry) -> None:
        if entry.file_id is None:
            data = self.ledger.requests_file(entry.local).read_bytes()
            entry.file_id = await self.api.upload(f"{entry.local}.jsonl", data)
            self.ledger.append("uploaded", local=entry.local, file_id=entry.file_id)
        batch = await self.api.create(entry.file_id, {"pipeline_local": entry.local})
        self.ledger.append("created", local=entry.local, batch_id=batch["id"], status=batch.get("status"))
        entry.batch_id, entry.status = batch["id"], batch.get("status")

    async def _poll_all(self, entries: dict[str, Entry]) -> None:
        for entry in entries.values():
            if entry.open and entry.batch_id is not None:
                await self._poll(entry)

    async def _poll(self, entry: Entry) -> None:
        assert entry.batch_id is not None
        try:
            batch = await self.api.retrieve(entry.batch_id)
        except errors.PermanentError as exc:
            if exc.kind == "http_404":  # deleted, or another project's: its rows are pending again
                self.ledger.append("lost", local=entry.local, batch_id=entry.batch_id, why=str(exc))
                entry.lost = True
                return
            raise
        status, counts = str(batch.get("status")), dict(batch.get("request_counts") or {})
        if status != entry.status or counts != entry.counts:
            self.ledger.append("status", local=entry.local, batch_id=entry.batch_id, status=status, counts=counts)
            entry.status, entry.counts = status, counts
        if status not in TERMINAL:
            return
        if status == "completed" and batch.get("output_file_id") is None and counts.get("completed", 0) > 0:
            return  # the output file is announced a poll late: not finished yet
        await self._fold(entry, batch)

    async def _fold(self, entry: Entry, batch: dict[str, Any]) -> None:
        """Every line of a finished batch into the checkpoint (answers) or the ledger (refusals); the
        rest is pending again. Folding twice (a kill before `folded`) only repeats the same answers."""
        keys = self.ledger.keys_of(entry.local)
        attempts = self.ledger.submissions(self.ledger.entries())  # this batch's included
        lines: list[dict[str, Any]] = []
        for file_key in ("output_file_id", "error_file_id"):
            if fid := batch.get(file_key):
                try:
                    content = await self.api.content(str(fid))
                except errors.PermanentError as exc:
                    if exc.kind != "http_404":
                        raise
                    # Announced but not downloadable yet (seen on OpenAI's files endpoint for a while after
                    # completion): the batch stays open and a later poll folds it.
                    self.say(f"pipeline: batch {entry.batch_id} finished but its results file is not ready yet; kept open")
                    return
                lines += [orjson.loads(raw) for raw in content.splitlines() if raw.strip()]
        seen: set[str] = set()
        ok, retry, failed = 0, 0, {}
        for line in lines:
            key = line.get("custom_id")
            if not isinstance(key, str) or key in seen:
                continue
            seen.add(key)
            if self.responses is not None:
                self._keep_response(key, line)
            result, why = self._read_line(line, attempts[key])
            if result is not None:
                self.checkpoint.append(result)
                self.outcome.folded.append(result)
                if self.cache is not None:
                    self.cache.put(key, result)
                ok += 1
            elif isinstance(why, errors.FatalError):
                self.outcome.fatal = self.outcome.fatal or why
                retry += 1
            elif isinstance(why, errors.PermanentError):
                failed[key] = f"{why.message} (batch {entry.batch_id})"
            else:
                retry += 1
        if batch.get("status") == "failed":  # validation: nothing ran; the lines it names are refused
            for problem in (batch.get("errors") or {}).get("data") or []:
                line_no = problem.get("line")
                if isinstance(line_no, int) and 1 <= line_no <= len(keys):
                    failed[keys[line_no - 1]] = f"refused by the batch's validation: {problem.get('message')}"
        retry += sum(1 for k in keys if k not in seen and k not in failed)
        self.outcome.failed.update(failed)
        self.checkpoint.sync()  # the answers are durable before the ledger says they are kept
        if self.cache is not None:
            self.cache.flush()
        self.ledger.append("folded", local=entry.local, batch_id=entry.batch_id, status=batch.get("status"), ok=ok,
                           retry=retry, failed=failed)  # fmt: skip
        entry.folded = True
        self.say(
            f"pipeline: batch {entry.batch_id} {batch.get('status')}: {ok:,} answered, {len(failed):,} refused, "
            f"{retry:,} to send again"
        )

    def _keep_response(self, key: str, line: dict[str, Any]) -> None:
        assert self.responses is not None
        response, line_id = line.get("response"), line.get("id") if isinstance(line.get("id"), str) else None
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            body = orjson.dumps(response.get("body"))
            self.responses.response(key, response["status_code"], response.get("request_id"), body, line_id)
        elif isinstance(line.get("error"), dict):
            self.responses.error(key, line["error"], line_id)

    def _read_line(self, line: dict[str, Any], attempts: int) -> tuple[Result | None, errors.RequestError | None]:
        response = line.get("response")
        if not isinstance(response, dict) or not response.get("status_code"):
            error = line.get("error") or {}
            code = error.get("code") if isinstance(error, dict) else None
            return None, errors.ServerError(f"batch line not answered ({code or 'no response'})", kind=str(code or "batch_error"))
        status = int(response["status_code"])
        try:
            c = read_reply(self.provider, status, {}, orjson.dumps(response.get("body")))
        except errors.RequestError as exc:
            return None, exc
        estimated = c.prompt_tokens is None or c.completion_tokens is None
        pt = c.prompt_tokens if c.prompt_tokens is not None else estimate_tokens(self.system)
        ct = c.completion_tokens if c.completion_tokens is not None else estimate_tokens(c.text)
        key = str(line["custom_id"])
        return Result(c.text, pt, ct, pt + ct, c.finish_reason, c.model, "ok", None, attempts, None, key, estimated), None

    async def _submit(
        self, rows: Iterator[tuple[str, str, str | None]], attempts: Counter[str], entries: dict[str, Entry]
    ) -> None:
        """Write the rows still to answer into request files within the limits, one model per file (OpenAI
        refuses a file that mixes models, as an input of batch requests may), and submit each."""
        files: dict[str, tuple[Any, Entry, int]] = {}  # model -> (open file, entry, bytes written)
        seen: set[str] = set()
        for key, payload, extra in rows:
            if key in seen:
                continue  # identical rows share one line
            seen.add(key)
            if attempts[key] and not self.resubmit:
                continue  # left for the online engine
            if attempts[key] >= self.max_attempts:
                self.outcome.failed[key] = f"not answered after {attempts[key]} batch submissions"
                continue
            body = orjson.loads(self.provider.body(payload, extra))
            line = orjson.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}) + b"\n"
            model = str(body.get("model"))
            current = files.get(model)
            if current is not None and (current[1].n >= self.max_lines or current[2] + len(line) > MAX_BYTES * 0.95):
                await self._seal(current[0], current[1], entries)
                current = None
            if current is None:
                entry = Entry(local=f"b{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
                self.ledger.folder.mkdir(parents=True, exist_ok=True)
                current = (self.ledger.requests_file(entry.local).open("wb"), entry, 0)
            out, entry, size = current
            out.write(line)
            entry.n += 1
            files[model] = (out, entry, size + len(line))
        for out, entry, _ in files.values():
            await self._seal(out, entry, entries)

    async def _seal(self, out: Any, entry: Entry, entries: dict[str, Entry]) -> None:
        """A full request file: durable, recorded as `prepared`, then uploaded and created."""
        out.flush()
        os.fsync(out.fileno())
        out.close()
        self.ledger.append("prepared", local=entry.local, n=entry.n, endpoint=ENDPOINT)
        entry.ts = time.time()
        entries[entry.local] = entry
        await self._create(entry)
        self.outcome.submitted_batches += 1
        self.outcome.submitted_rows += entry.n
        self.say(f"pipeline: submitted batch {entry.batch_id} ({entry.n:,} requests)")


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
