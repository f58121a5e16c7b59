"""The asynchronous core: admit rows in order, send them through the limits, retry,
record every answer in the checkpoint, and hand finished batches to the sink in order.

Tasks alive at once: one producer, `concurrency` workers (the most that may
ever be in flight), one writer, whatever the table size. Each request first
asks the governor, which paces it and gates how many are in flight (a limit it
learns, up to `concurrency`). A retry waits on a timer, not in a worker, so a
row backing off never holds a slot. Memory is bounded by
`window_rows`: the producer admits no more rows while that many are
unfinished or unwritten.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import polars as pl

from pipeline import errors, outcomes
from pipeline.engines.prepared import Lane, Prepared
from pipeline.limits.governor import Governor
from pipeline.limits.learn import Ticket
from pipeline.limits.retry import RetryPolicy
from pipeline.limits.room import Room, hold_mmap_threshold
from pipeline.limits.spend import NOT_SENT as NOT_SENT_CEILING
from pipeline.limits.spend import Pricing
from pipeline.observe.stats import RunStats
from pipeline.providers import Completion, Provider, SchemaFormatRefused, read_reply
from pipeline.providers.base import clip
from pipeline.providers.transport import Transport
from pipeline.requests.media import MediaColumns, Unreadable
from pipeline.requests.prompts import estimate_tokens
from pipeline.requests.structured import Structured, check_reply, correction
from pipeline.requests.tools import arguments_text
from pipeline.tables.cache import Answers
from pipeline.tables.checkpoint import Checkpoint, Result
from pipeline.tables.columns import Layout
from pipeline.tables.responses import ResponseLog
from pipeline.tables.sink import Sink, result_frame

ANSWER_MEMORY = 10_000  # recent answers kept for duplicates: ~10 MB, whatever the table size (50,000 cost 38 MB in make bench)
CACHE_FLUSH_EVERY = 1.0  # seconds between writes of new answers to the answer cache
MEDIA_ROOM = 64 << 20  # bytes of images read for requests being built or in flight: ~4x that as bodies at most


@dataclass(eq=False)
class Batch:
    frame: pl.DataFrame  # the input columns, as read
    results: list[Result | None]
    pending: int
    done: asyncio.Future[None]

    def settle(self, row: int, result: Result) -> None:
        self.results[row] = result
        self.pending -= 1
        if self.pending == 0:
            self.done.set_result(None)


@dataclass(eq=False, slots=True)
class Work:
    key: str
    prompt: str  # the row's prompt, or its conversation as JSON
    extra: str | None  # per-row parameters as a JSON object
    tokens: int
    waiters: list[tuple[Batch, int]] = field(default_factory=list)
    attempts: int = 0
    followup: list[dict[str, str]] | None = None  # set after an invalid structured reply
    reply: tuple[int, str | None, bytes] | None = None  # the last HTTP answer (status, request id, body), when kept
    media: str | None = None  # the row's images and documents (a descriptor; their bytes are read to send)
    media_bytes: int = 0  # what reading them takes
    media_most: int = 0  # the most tokens they may cost, for the spend ceiling
    billed_in: int = 0  # tokens its attempts were billed (or, under a ceiling, counted against it), for its cost
    billed_out: int = 0
    lane: int = 0  # the model it asks, with several: row % models


error_result = Result.failed


class Engine:
    def __init__(
        self,
        *,
        provider: Provider,
        transport: Transport,
        governor: Governor,
        policy: RetryPolicy,
        concurrency: int,
        checkpoint: Checkpoint,
        sink: Sink,
        stats: RunStats,
        system_prompt: str | None = None,
        structured: Structured | None = None,
        window_rows: int | None = None,
        cache: Answers | None = None,
        answered: OrderedDict[str, Result] | None = None,
        media: MediaColumns | None = None,
        pricing: Pricing | None = None,
        layout: Layout | None = None,
        lanes: Sequence[Lane] = (),
    ) -> None:
        # One lane a model: a run of one model sends on the lane these arguments make; with several,
        # `lanes` (the first one's governor, provider and client are then also these arguments).
        self._lanes = list(lanes) or [Lane(provider, transport, governor, concurrency, pricing, cache)]
        self._models = len(self._lanes)
        self._media = media  # reads a row's images again to build its request
        self._media_room = Room(MEDIA_ROOM)
        if media is not None:
            hold_mmap_threshold()  # large buffers given back as they are freed: memory flat in rows
        self.governor = governor
        self._policy = policy
        self._checkpoint = checkpoint
        self._caches = [c for c in dict.fromkeys(lane.cache for lane in self._lanes) if c is not None]
        # Responses as received, kept for an output that hands them back (batch-output lines); None: not kept.
        self.responses: ResponseLog | None = None
        # Attempts a row has had elsewhere (batch submissions, in batch mode's online fallback): `attempts` counts them.
        self.attempts_before: Mapping[str, int] = {}
        self._sink = sink
        self._stats = stats
        self._system = system_prompt or ""
        self._structured = structured
        self._layout = layout or Layout(structured=structured)  # the result columns the output gets
        self._validator = structured.validator() if structured else None
        self._dtype = structured.dtype if structured else None
        self._window = window_rows or max(20_000, 64 * sum(lane.concurrency for lane in self._lanes))
        self._queues: list[asyncio.Queue[Work | None]] = [asyncio.Queue() for _ in self._lanes]
        self._order: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._inflight: dict[str, Work] = {}
        # Answers of this run, newest last, bounded: a duplicate of a recent row is not sent again.
        # (Given: the Ray engine's engines of one actor share it across blocks.)
        self._answered: OrderedDict[str, Result] = OrderedDict() if answered is None else answered
        # Each row's cost_usd: its requests' billed tokens at its lane's prices, on the first row that uses the answer.
        self._costed: OrderedDict[str, None] = OrderedDict()  # keys whose checkpoint answer a row of this run carries
        self._outstanding = 0
        self._room = asyncio.Condition()
        self._any_success = False
        self._told_json_object = False
        self._fatal: errors.FatalError | None = None
        self._stopping = asyncio.Event()
        self._spend = governor.spend
        self._ceiling_reached = False
        # After a fatal answer, mark the rows left "not sent" and write the output even if this run had no
        # answer (there are earlier ones to deliver, or the caller holds the table in memory).
        self.deliver_partial = False
        self._halted: str | None = None  # after a stop has drained: why the rows left are not sent
        self._halt_kind = ""  # ...and the outcome it counts under in the errors by kind

    @property
    def unsettled(self) -> int:
        """Requests of rows admitted that have no final answer yet: queued, in flight or waiting to retry."""
        return len(self._inflight)

    async def run(self, batches: Iterator[pl.DataFrame], prep: Callable[[pl.DataFrame], Prepared]) -> None:
        """Send every row; returns when every batch is written.

        A fatal answer stops the sending: the requests in flight come back and are saved. Then, when
        there is something to deliver (an answer of this run, or `deliver_partial`), every row left
        gets a "not sent" result, every batch is written, and the FatalError is raised, so the caller
        can still commit a whole output; else the FatalError ends the run at once (in an
        ExceptionGroup, as any task's error)."""
        async with asyncio.TaskGroup() as group:
            # Each model's workers take only its requests: one model held back by its server's limits
            # leaves the others' workers free.
            for queue, lane in zip(self._queues, self._lanes, strict=True):
                for _ in range(lane.concurrency):
                    group.create_task(self._worker(queue))
            writer = group.create_task(self._writer())
            stopper = group.create_task(self._stop_when_drained())
            lags = [group.create_task(lane.governor.watch_loop()) for lane in self._lanes]
            flusher = group.create_task(self._flush_cache()) if self._caches else None
            await self._produce(batches, prep)
            self._order.put_nowait(None)
            await writer
            stopper.cancel()
            for lag in lags:
                lag.cancel()
            if flusher is not None:
                flusher.cancel()
            for q, lane in zip(self._queues, self._lanes, strict=True):
                for _ in range(lane.concurrency):
                    q.put_nowait(None)
        for cache in self._caches:
            await asyncio.to_thread(cache.flush)  # the rest; closing the cache flushes after a stop too
        if self._fatal is not None:
            raise self._fatal

    async def _flush_cache(self) -> None:
        """New answers to the answer cache about once a second, one transaction each, in a thread:
        never a write per row, never on the event loop (put() only appends to a list)."""
        while True:
            await asyncio.sleep(CACHE_FLUSH_EVERY)
            for cache in self._caches:
                if cache.pending:
                    await asyncio.to_thread(cache.flush)

    def stop(self, err: errors.FatalError) -> None:
        """Stop this run early from outside (another engine sharing its governor stopped)."""
        self._stop(err)

    def _stop(self, err: errors.FatalError) -> None:
        """Stop early: send nothing more, let the requests in flight come back (their answers
        are paid for and must be saved), then end the run with `err`."""
        if self._fatal is None:
            self._fatal = err
            self._stats.error_kinds[err.kind] += 1  # the answer that stopped the run, in the errors by kind
            for lane in self._lanes:  # a stop is the whole run's, whichever model's answer it was
                lane.governor.stop()
            self._stopping.set()

    async def wind_down(self, grace: float) -> None:
        """An interrupt: admit nothing more, and give the requests in flight up to `grace` seconds to come
        back. Their answers are paid for; saved in the checkpoint now, the next run does not send them
        again. Returns when they are all back or the time is up; the caller then cancels the run."""
        n = sum(lane.governor.in_flight for lane in self._lanes)
        for lane in self._lanes:
            lane.governor.stop()
        if not n:
            return
        self.governor.tell(
            f"pipeline: stopping: waiting up to {grace:.0f} s for the {n} request{'s' if n != 1 else ''} in flight to come "
            "back, so their answers are saved and not paid for again (Ctrl-C again to stop at once)"
        )
        try:
            await asyncio.wait_for(self._drained(), grace)
        except TimeoutError:
            left = sum(lane.governor.in_flight for lane in self._lanes)
            self.governor.tell(
                f"pipeline: {left} request{'s' if left != 1 else ''} did not come back in {grace:.0f} s; the next run sends "
                f"{'them' if left != 1 else 'it'} again"
            )

    async def _drained(self) -> None:
        for lane in self._lanes:
            await lane.governor.drained()

    async def _stop_when_drained(self) -> None:
        await self._stopping.wait()
        await self._drained()
        assert self._fatal is not None
        if not (self._any_success or self.deliver_partial):
            # Nothing to deliver (a bad key at the first request): no output of errors only, and no pass
            # over the rest of the input to mark it; the run ends here.
            raise self._fatal
        self._halt(self._fatal)

    def _halt(self, fatal: errors.FatalError) -> None:
        """Nothing is in flight any more: every request still waiting (queued, on a retry timer, at the
        gate) and every row not yet read becomes a "not sent" result, so the output stays whole."""
        outcome = outcomes.of_fatal(fatal)
        self._halted = outcomes.not_sent_note(outcome)
        self._halt_kind = outcome
        for work in list(self._inflight.values()):
            self._not_sent(work, self._halted, outcome)
        for lane in self._lanes:
            lane.governor.block(fatal)  # wakes the workers waiting to be admitted: they find their work finished

    async def _produce(self, batches: Iterator[pl.DataFrame], prep: Callable[[pl.DataFrame], Prepared]) -> None:
        def next_prepared() -> Prepared | None:
            frame = next(batches, None)
            return None if frame is None else prep(frame)

        while (p := await asyncio.to_thread(next_prepared)) is not None:
            n = p.frame.height
            async with self._room:
                await self._room.wait_for(lambda: self._outstanding < self._window)
                self._outstanding += n
            batch = Batch(frame=p.frame, results=[None] * n, pending=n, done=asyncio.get_running_loop().create_future())
            self._order.put_nowait(batch)
            models = self._models
            for row in range(n):
                reason, key = p.skip[row], p.keys[row]
                if reason is not None or key is None:
                    kind = (p.skip_kinds[row] if p.skip_kinds is not None else None) or "not_sent"
                    self._finish_row(batch, row, error_result(reason or "not sent: empty prompt", 0, None), kind)
                elif (hit := p.cached.get(row)) is not None:
                    if row in p.from_cache:  # kept in this output's checkpoint too: its resume needs no cache
                        self._stats.from_cache += 1
                        self._checkpoint.append(hit)
                    else:
                        self._stats.from_checkpoint += 1
                        hit = self._earlier_cost(hit, self._lanes[row % models].pricing)
                    self._finish_row(batch, row, hit)
                elif (answer := self._answered.get(key)) is not None:
                    self._stats.shared += 1
                    self._finish_row(batch, row, _free(answer))
                elif (work := self._inflight.get(key)) is not None:
                    self._stats.shared += 1
                    work.waiters.append((batch, row))  # same request already on its way: share the answer
                elif self._halted is not None:
                    self._stats.error_kinds[self._halt_kind] += 1
                    self._finish_row(batch, row, error_result(self._halted, 0, key))
                elif self._ceiling_reached:
                    self._stats.error_kinds["spend_ceiling"] += 1
                    self._finish_row(batch, row, error_result(NOT_SENT_CEILING, 0, key))
                else:
                    prompt = p.prompts[row]
                    assert prompt is not None
                    lane = row % models
                    work = Work(key=key, prompt=prompt, extra=p.extra[row], tokens=p.tokens[row], waiters=[(batch, row)],
                                attempts=self.attempts_before.get(key, 0), lane=lane)  # fmt: skip
                    if p.media is not None and p.media_bytes is not None and p.media_most is not None:
                        work.media, work.media_bytes, work.media_most = p.media[row], p.media_bytes[row], p.media_most[row]
                    self._inflight[key] = work
                    self._queues[lane].put_nowait(work)

    async def _writer(self) -> None:
        while (batch := await self._order.get()) is not None:
            await batch.done
            await asyncio.to_thread(self._write_batch, batch)
            async with self._room:
                self._outstanding -= batch.frame.height
                self._room.notify_all()

    def _earlier_cost(self, hit: Result, pricing: Pricing | None) -> Result:
        """A checkpoint answer's cost, as a row of this output carries it: what it cost when it was bought
        (tokens at this run's prices for one kept by a run without prices), on the first row of this run
        that uses it; the rows after it that share it carry 0, as rows sharing a request do."""
        if pricing is None:
            return hit
        key = hit.request_key
        assert key is not None
        if key in self._costed:
            self._costed.move_to_end(key)
            return hit._replace(cost_usd=0.0)
        self._costed[key] = None
        if len(self._costed) > ANSWER_MEMORY:
            self._costed.popitem(last=False)
        if hit.cost_usd is None:
            return hit._replace(cost_usd=pricing.of(hit.prompt_tokens or 0, hit.completion_tokens or 0))
        return hit

    def _write_batch(self, batch: Batch) -> None:
        # Apart from the input's columns: an input may have its own 'status' (written with --result-prefix).
        self._sink.write(*self._layout.shape(batch.frame, result_frame(batch.results)))  # type: ignore[arg-type]  # all settled

    async def _worker(self, queue: asyncio.Queue[Work | None]) -> None:
        while (work := await queue.get()) is not None:
            await self._attempt(work)

    async def _attempt(self, work: Work) -> None:
        if self._inflight.get(work.key) is not work:  # finished while it waited (a stop marked it not sent)
            return
        if work.media is None:
            await self._send(work, None, self._lanes[work.lane].provider.json_mode)
            return
        # A row with images: its bytes are read again now, within the room for them, and dropped with its answer.
        taken = await self._media_room.take(work.media_bytes)
        try:
            form = self._lanes[work.lane].provider.json_mode
            try:
                body = await asyncio.to_thread(self._body_with_media, work)
            except Unreadable as err:  # gone or changed since its batch was read: not sent, and said why
                if self._inflight.get(work.key) is work:
                    self._not_sent(work, f"not sent: {err.message}", err.kind)
                return
            if self._inflight.get(work.key) is work:
                await self._send(work, body, form)
        finally:
            self._media_room.give(taken)

    def _body_with_media(self, work: Work) -> bytes:
        """The request with the row's images read again and checked against its key (in a thread: the
        reads wait on disks and servers, and a large image's base64 would hold the event loop)."""
        assert self._media is not None and work.media is not None
        batch, row = work.waiters[0]  # a binary cell is read from its batch, held until this row is written
        attachments = self._media.load(work.media, batch.frame, row)
        return self._lanes[work.lane].provider.body(work.prompt, work.extra, work.followup, attachments)

    async def _send(self, work: Work, prebuilt: bytes | None, form: str | None) -> None:
        """One attempt: the spend reservation, the governor's admission, the request, its answer. `prebuilt`
        is the body when it was built already (a row with images), in JSON form `form`."""
        lane = self._lanes[work.lane]
        governor, provider = lane.governor, lane.provider
        held = None
        if self._spend is not None:
            held = self._spend.worst(self._request_bytes(work, lane) + work.media_most)
            try:
                reserved = await governor.reserve(held)
            except errors.FatalError as blocked:  # the run stopped while this one waited for room
                self._stop(blocked)
                return
            if not reserved:
                self._ceiling_reached = True
                self._not_sent(work, NOT_SENT_CEILING, "spend_ceiling")
                return
        try:
            ticket = await governor.admit(work.tokens)
        except errors.FatalError as blocked:  # nothing more may be sent (a daily limit used up)
            if held is not None:
                governor.settle(held, 0, 0)
            self._stop(blocked)
            return
        work.attempts += 1
        self._stats.requests_sent += 1
        if lane.stats is not None:
            lane.stats.requests_sent += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        # `form`: what this request asks in, whatever the others switch to meanwhile.
        completion: Completion | None = None
        try:
            work.reply = None
            try:
                body = prebuilt if prebuilt is not None else provider.body(work.prompt, work.extra, work.followup)
                status, headers, reply = await lane.transport.post(provider.url, provider.headers, body)
            finally:
                governor.release()
            if self.responses is not None:
                work.reply = (status, headers.get("x-request-id"), reply)
            governor.answered(headers)
            completion = read_reply(provider, status, headers, reply)
            self._bill(work, held, completion)  # billed, whatever the checks below make of the answer
            latency = loop.time() - started
            governor.succeeded(ticket, latency, completion.completion_tokens)
            if self._validator is not None:
                answer = completion.text
                if self._structured is not None and self._structured.tool is not None:  # --tool-columns
                    answer = arguments_text(completion.tool_calls, self._structured.tool, completion.text)
                completion = replace(completion, text=check_reply(answer, self._validator, self._dtype))
        except SchemaFormatRefused as err:
            self._bill(work, held, None, err)
            if form == "json_schema" and provider.use_json_object():
                self._resend_as_json_object(work, err)
            else:  # refused in json_object form too: the row fails like any other refusal
                self._failed(work, err, ticket)
        except errors.RequestError as err:
            if completion is None:  # an answer that failed the checks was billed above
                self._bill(work, held, None, err)
            self._failed(work, err, ticket)
        else:
            self._any_success = True
            self._stats.record_latency(latency * 1000)
            if lane.stats is not None:
                lane.stats.record_latency(latency * 1000)
            self._finish(work, self._ok_result(work, completion, latency * 1000))

    def _request_bytes(self, work: Work, lane: Lane) -> int:
        """Bytes of the request around the prompt plus the prompt's (and a correction's): what the
        spend ceiling bounds its prompt tokens by. The JSON form may switch mid-run, so by form."""
        provider = lane.provider
        form = provider.json_mode
        base = lane.base_bytes.get(form)
        if base is None:
            try:
                base = len(provider.body("", None))
            except orjson.JSONDecodeError:  # a conversation column: the payload is a JSON list
                base = len(provider.body("[]", None))
            lane.base_bytes[form] = base
        size = base + len(work.prompt.encode())
        if work.followup:
            size += len(orjson.dumps(work.followup))
        return size

    def _bill(
        self, work: Work, held: tuple[int, int] | None, completion: Completion | None, err: errors.RequestError | None = None
    ) -> None:
        """Count what one attempt was billed: against the spend ceiling (settling its reservation), in this
        run's spend, and in the request's own tally, which becomes its row's cost_usd. An answer's usage (one
        that fails the checks was billed too), estimated where the server sent none; nothing for an error
        status, which carries no usage and bills nothing. Under a ceiling, an attempt that may have been
        billed without saying so (no usage, a timeout or a broken connection after sending, a garbled 200)
        counts at its worst case, so that the ceiling holds; without one it counts nothing, as nothing is known."""
        lane = self._lanes[work.lane]
        if held is not None:
            if completion is not None:
                pt, ct = completion.prompt_tokens, completion.completion_tokens
                billed = (held[0] if pt is None else pt, held[1] if ct is None else ct)
            elif isinstance(err, errors.RequestTimeout | errors.MalformedReply) or (
                isinstance(err, errors.TransportError) and err.kind != "connect"
            ):
                billed = held
            else:
                billed = (0, 0)
            lane.governor.settle(held, *billed)  # the governor keeps the run's spent tokens under a ceiling
        elif completion is not None:
            billed = self._tokens(work, completion)[:2]
            self._stats.spent_tokens_in += billed[0]
            self._stats.spent_tokens_out += billed[1]
        else:
            return
        work.billed_in += billed[0]
        work.billed_out += billed[1]
        if lane.stats is not None:
            lane.stats.spent_tokens_in += billed[0]
            lane.stats.spent_tokens_out += billed[1]
        if lane.pricing is not None:
            cost = lane.pricing.of(*billed)
            self._stats.spent_usd += cost
            if lane.stats is not None:
                lane.stats.spent_usd += cost

    def _tokens(self, work: Work, c: Completion) -> tuple[int, int, bool]:
        """An answer's prompt and completion tokens, estimated where the server sent no usage (and whether they were)."""
        pt, ct = c.prompt_tokens, c.completion_tokens
        estimated = pt is None or ct is None
        if pt is None:
            pt = estimate_tokens(self._system + work.prompt) + work.media_most
        if ct is None:
            ct = sum(estimate_tokens(text) for text, _ in c.choices) if c.choices else estimate_tokens(c.text)
        return pt, ct, estimated

    def _cost(self, work: Work) -> float | None:
        pricing = self._lanes[work.lane].pricing
        return None if pricing is None else pricing.of(work.billed_in, work.billed_out)

    def _not_sent(self, work: Work, message: str, kind: str) -> None:
        """The row (and every identical row sharing its request) is not sent: the ceiling is reached, or
        the run stopped. Nothing goes to the checkpoint: there is no answer, and the next run sends it."""
        del self._inflight[work.key]
        if work.attempts:
            message += f" (after {work.attempts} failed attempt{'s' if work.attempts > 1 else ''})"
        result = error_result(message, work.attempts, work.key, self._cost(work))
        self._stats.error_kinds[kind] += len(work.waiters)
        for i, (batch, row) in enumerate(work.waiters):
            self._finish_row(batch, row, result if i == 0 else _free(result))

    def _resend_as_json_object(self, work: Work, err: SchemaFormatRefused) -> None:
        """The server refused the json_schema form (llama-cpp-python, TGI): the run asks for json_object
        with the schema from now on. The rows refused were never really asked, so they go again, uncharged,
        and the refusal is kept from the governor: it is the form's fault, not the server's or the row's."""
        if not self._told_json_object:
            self._told_json_object = True
            self._lanes[work.lane].governor.tell(
                f"pipeline: the server refuses response_format json_schema ({clip(err.message, 160)}); asking for "
                "json_object with the schema instead, as llama.cpp takes it, for the rest of this run"
            )
        work.attempts -= 1
        self._stats.retries += 1  # sent again: counted, so that requests = rows + retries in the summary
        self._queues[work.lane].put_nowait(work)

    def _ok_result(self, work: Work, c: Completion, latency: float) -> Result:
        pt, ct, estimated = self._tokens(work, c)
        self._stats.prompt_tokens += pt
        self._stats.completion_tokens += ct
        self._stats.estimated_rows += estimated
        if (own := self._lanes[work.lane].stats) is not None:
            own.prompt_tokens += pt
            own.completion_tokens += ct
        return Result(
            completion=c.text,
            prompt_tokens=pt,
            completion_tokens=ct,
            total_tokens=pt + ct,
            finish_reason=c.finish_reason,
            model=c.model,
            status="ok",
            error=None,
            attempts=work.attempts,
            latency_ms=round(latency, 2),
            request_key=work.key,
            tokens_estimated=estimated,
            cost_usd=self._cost(work),
            **answer_fields(c),
        )

    def _failed(self, work: Work, err: errors.RequestError, ticket: Ticket) -> None:
        try:
            if err.fatal:
                raise err
            if not self._lanes[work.lane].governor.failed(ticket, err):
                # The server is down, not this row: the attempt is not charged; the row waits at the hold.
                work.attempts -= 1
                self._stats.retries += 1
                self._queues[work.lane].put_nowait(work)
                return
            delay = self._policy.delay(work.attempts, err)
            if delay is None and not self._any_success and err.kind in ("connect", "http_404"):
                raise self._nothing_works(work, err)
        except errors.FatalError as fatal:
            self._stop(fatal)
            return
        if isinstance(err, errors.InvalidOutput):
            work.followup = correction(err, self._structured.tool if self._structured else None)  # say what was wrong
        if delay is not None:
            self._stats.retries += 1
            asyncio.get_running_loop().call_later(delay, self._queues[work.lane].put_nowait, work)
            return
        self._stats.error_kinds[err.kind] += len(work.waiters)  # rows, as the errors beside it: a shared request fails each
        if err.transient:  # failed for a reason that may pass: a re-run may answer it
            self._stats.retryable_errors += len(work.waiters)
        message = f"{err.message} (after {work.attempts} attempt{'s' if work.attempts > 1 else ''})"
        result = error_result(message, work.attempts, work.key, self._cost(work))
        if isinstance(err, errors.InvalidOutput):
            result = result._replace(completion=err.raw)  # keep what the model said, for a look
        self._finish(work, result)

    def _nothing_works(self, work: Work, err: errors.RequestError) -> errors.FatalError:
        """Nothing has worked yet and every row would fail alike: a wrong address, path or model."""
        if err.kind == "connect":
            hint = f"Cannot reach the server ({err.message}) after {work.attempts} attempts. Check --base-url and that the server is running"
        else:
            hint = (
                f"The server answered {err.message} to the first request. Check --base-url (OpenAI-compatible "
                "servers usually end in /v1; Anthropic's base is the part before /v1/messages) and --model"
            )
        return errors.FatalError(f"{hint}; nothing was answered yet", kind=err.kind)

    def _finish(self, work: Work, result: Result) -> None:
        if self.responses is not None and work.reply is not None:
            self.responses.response(work.key, *work.reply)
        del self._inflight[work.key]
        self._stats.rows_sent += 1
        self._checkpoint.append(result)
        if result.status == "ok":
            if (cache := self._lanes[work.lane].cache) is not None:
                cache.put(work.key, result)
            self._answered[work.key] = result
            if len(self._answered) > ANSWER_MEMORY:
                self._answered.popitem(last=False)
        for i, (batch, row) in enumerate(work.waiters):
            self._finish_row(batch, row, result if i == 0 else _free(result))

    def _finish_row(self, batch: Batch, row: int, result: Result, kind: str = "not_sent") -> None:
        """`kind`: what a row held back before any request (no key) counts under."""
        stats = self._stats
        stats.rows_done += 1
        own = self._lanes[row % self._models].stats if self._models > 1 else None
        if own is not None:
            own.rows_done += 1
        if result.status == "ok":
            stats.ok += 1
            if own is not None:
                own.ok += 1
        else:
            stats.errors += 1
            if own is not None:
                own.errors += 1
            if result.request_key is None:
                stats.error_kinds[kind] += 1
        batch.settle(row, result)


def answer_fields(c: Completion) -> dict[str, Any]:
    """What an answer adds to its result besides text and tokens: its tool calls, every choice."""
    return {
        "tool_calls": None if c.tool_calls is None else orjson.dumps(list(c.tool_calls)).decode(),
        "completions": None if c.choices is None else [text for text, _ in c.choices],
        "finish_reasons": None if c.choices is None else [reason for _, reason in c.choices],
    }


def _free(result: Result) -> Result:
    """A result as a row that shares another row's request carries it: the request's cost is on that row."""
    return result if not result.cost_usd else result._replace(cost_usd=0.0)
