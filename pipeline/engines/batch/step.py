"""One invocation of batch mode for one job: recover, poll, fold, submit (steps 1 to 4 of the package's
docstring); the caller writes the output, or exits 3."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from pipeline import errors
from pipeline.engines.batch.endpoints import ENDPOINT, TERMINAL, OpenAIBatches
from pipeline.engines.batch.ledger import Entry, Ledger
from pipeline.engines.online import answer_fields
from pipeline.limits.spend import Pricing
from pipeline.providers import Provider, read_reply
from pipeline.requests.media import Attachment, Unreadable
from pipeline.requests.prompts import estimate_tokens
from pipeline.requests.tools import arguments_text
from pipeline.tables.checkpoint import Checkpoint, Result
from pipeline.tables.responses import ResponseLog

FIRST_POLL, POLL_FACTOR, POLL_MAX = 2.0, 1.5, 300.0  # --wait: seconds before the first poll, growth, cap
# OpenAI's limits per batch file (50,000 lines, 200 MB); files are cut at 95% of the bytes.
MAX_LINES, MAX_BYTES = 50_000, 200 * 1024 * 1024
# A row still to answer: its key, payload, per-row parameters, and what reads its images (None: it has none).
Pending = tuple[str, str, str | None, Callable[[], Sequence[Attachment]] | None]


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
        pricing: Pricing | None = None,
        forced_tool: str | None = None,
    ) -> None:
        self.api, self.provider, self.ledger, self.checkpoint = api, provider, ledger, checkpoint
        self.max_lines, self.max_attempts, self.system, self.say, self.sleep = max_lines, max_attempts, system or "", say, sleep
        self.resubmit = resubmit  # False (--fallback online): a line that failed in a batch is sent online instead
        self.cache = cache  # the answer cache (--cache): folded answers are kept there too
        self.responses = responses  # the lines' responses as received, for a batch-output output
        self.pricing = pricing  # at the batch discount: each answer's cost_usd
        self.forced_tool = forced_tool  # --tool-columns: the answer is this tool's call's arguments
        self.outcome = Outcome()

    async def run(self, pending: Callable[[set[str], dict[str, str]], Iterator[Pending]], wait: bool) -> Outcome:
        """`pending(exclude, failed)` yields (key, payload, extra, images) for each row the checkpoint has not answered;
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
            if self.forced_tool is not None:  # no call to it: sent again in the next batch, as an invalid answer is online
                c = replace(c, text=arguments_text(c.tool_calls, self.forced_tool, c.text))
        except errors.RequestError as exc:
            return None, exc
        estimated = c.prompt_tokens is None or c.completion_tokens is None
        pt = c.prompt_tokens if c.prompt_tokens is not None else estimate_tokens(self.system)
        if c.completion_tokens is not None:
            ct = c.completion_tokens
        else:
            ct = sum(estimate_tokens(t) for t, _ in c.choices) if c.choices else estimate_tokens(c.text)
        key = str(line["custom_id"])
        cost = self.pricing.of(pt, ct) if self.pricing is not None else None
        return Result(c.text, pt, ct, pt + ct, c.finish_reason, c.model, "ok", None, attempts, None, key, estimated, cost,
                      **answer_fields(c)), None  # fmt: skip

    async def _submit(self, rows: Iterator[Pending], attempts: Counter[str], entries: dict[str, Entry]) -> None:
        """Write the rows still to answer into request files within the limits, one model per file (OpenAI
        refuses a file that mixes models, as an input of batch requests may), and submit each. A row's
        images go into its line as base64 (read now, one row at a time: memory holds one line)."""
        files: dict[str, tuple[Any, Entry, int]] = {}  # model -> (open file, entry, bytes written)
        seen: set[str] = set()
        for key, payload, extra, images in rows:
            if key in seen:
                continue  # identical rows share one line
            seen.add(key)
            if attempts[key] and not self.resubmit:
                continue  # left for the online engine
            if attempts[key] >= self.max_attempts:
                self.outcome.failed[key] = f"not answered after {attempts[key]} batch submissions"
                continue
            try:
                attachments = images() if images is not None else ()
            except Unreadable as err:  # gone or changed since it was read: not in this batch, and said why
                self.outcome.failed[key] = f"not sent: {err.message}"
                continue
            body = orjson.loads(self.provider.body(payload, extra, None, attachments))
            line = orjson.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}) + b"\n"
            if len(line) > MAX_BYTES * 0.95:
                self.outcome.failed[key] = f"not sent: its request is {len(line) / 1e6:,.0f} MB, over a batch file's 200 MB"
                continue
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
