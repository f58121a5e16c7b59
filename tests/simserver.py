"""A provider in virtual time, and the real engine run against it under looptime.

`SimServer` plugs into the engine's transport seam (it is what the aiohttp
transport would return: status, headers, body), and models what matters for
limits: a per-second or sliding per-minute request window with or without
OpenAI-style headers, an in-flight limit (ModelsLab's 429), S FIFO slots with
a queue (vLLM, llama.cpp), a limit that changes over time, an outage. Time is
the event loop's, fast-forwarded by looptime: minutes of traffic in about a
second, deterministic, with exact assertions on what the server saw.

Everything else is the product: config, renderer, provider adapter, governor,
engine, checkpoint and Parquet sink.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import looptime
import orjson
import polars as pl
from multidict import CIMultiDict

from pipeline import errors
from pipeline.engines.prepared import prepare
from pipeline.job import build_engine
from pipeline.observe.stats import RunStats
from pipeline.plan import preflight
from pipeline.providers import make_provider
from pipeline.settings import build_config
from pipeline.tables import source
from pipeline.tables.checkpoint import Checkpoint
from pipeline.tables.sink import ParquetSink


@dataclass
class SimServer:
    latency: float = 0.05
    rpm: float | None = None  # the request limit, per minute
    window: str = "second"  # "second": rpm/60 per wall-clock second; "minute": rpm in any sliding 60 s
    headers: bool = True  # announce the limit in OpenAI-style headers
    retry_after: float | None = None  # a fixed Retry-After on 429s (default: until the window frees)
    max_in_flight: int | None = None
    named: bool = True  # the in-flight 429 names its number
    slots: int | None = None  # FIFO service slots: latency grows with the queue, never a 429
    schedule: list[tuple[float, float]] = field(default_factory=list)  # (t, rpm) from the first request
    down: tuple[float, float] | None = None  # (from, to) seconds after the first request: connection refused
    status_always: int | None = None  # answer every request with this status
    modelslab: bool = False  # ModelsLab's body for the in-flight 429
    daily_limit: int | None = None  # requests per day, announced Cerebras-style; resets in 5 hours
    # What the server saw
    t0: float | None = None
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time after t0, status)
    refused_connections: int = 0
    in_flight: int = 0
    max_in_flight_seen: int = 0
    queue_waits: list[float] = field(default_factory=list)
    _window: deque[float] = field(default_factory=deque)
    _second: tuple[int, int] = (-1, 0)
    _day_used: int = 0
    _slots: asyncio.Semaphore | None = None

    # ---- transport seam ------------------------------------------------------------------
    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.t0 is None:
            self.t0 = now
        t = now - self.t0
        if self.down and self.down[0] <= t < self.down[1]:
            self.refused_connections += 1
            raise errors.TransportError("cannot connect to sim:80 (Connection refused)", kind="connect")
        for at, rpm in self.schedule:
            if t >= at:
                self.rpm = rpm
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        try:
            status, extra, payload = await self._answer(now, t, body)
        finally:
            self.in_flight -= 1
        self.answers.append((loop.time() - self.t0, status))
        return status, CIMultiDict(extra), payload  # case-insensitive, as aiohttp hands them over

    async def get(self, url: str) -> int:
        return 200

    async def close(self) -> None:
        pass

    # ---- the model ---------------------------------------------------------------------------
    async def _answer(self, now: float, t: float, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.status_always is not None:
            await asyncio.sleep(self.latency)
            return self.status_always, {}, orjson.dumps({"error": {"message": f"status {self.status_always}"}})
        if self.max_in_flight is not None and self.in_flight > self.max_in_flight:
            n = f" Maximum {self.max_in_flight} queued requests allowed." if self.named else " Please try again later."
            msg = "Rate limit exceeded." + n
            if self.modelslab:
                return 429, {}, orjson.dumps({"status": "error", "message": msg, "retry_after": 1})
            return 429, {"Retry-After": "1"}, orjson.dumps({"error": {"message": msg}})
        limit_headers: dict[str, str] = {}
        if self.daily_limit is not None:
            self._day_used += 1  # counted on admission, as providers do
            limit_headers = {
                "x-ratelimit-limit-requests-day": str(self.daily_limit),
                "x-ratelimit-remaining-requests-day": str(max(0, self.daily_limit - self._day_used)),
                "x-ratelimit-reset-requests-day": str(5 * 3600),
            }
            if self._day_used > self.daily_limit:
                msg = "Daily request limit reached"
                return 429, {**limit_headers, "Retry-After": str(5 * 3600)}, orjson.dumps({"error": {"message": msg}})
        if self.rpm is not None:
            admitted, wait, left = self._admit(now)
            if self.headers:
                limit_headers |= {
                    "x-ratelimit-limit-requests": str(int(self.rpm)),
                    "x-ratelimit-remaining-requests": str(left),
                    "x-ratelimit-reset-requests": f"{max(wait, 0.001) * 1000:.0f}ms",
                }
            if not admitted:
                ra = self.retry_after if self.retry_after is not None else max(1, math.ceil(wait))
                msg = "Rate limit reached for requests"
                return 429, {**limit_headers, "Retry-After": f"{ra:g}"}, orjson.dumps({"error": {"message": msg}})
        if self.slots is not None:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.slots)
            queued = asyncio.get_running_loop().time()
            async with self._slots:
                self.queue_waits.append(asyncio.get_running_loop().time() - queued)
                await asyncio.sleep(self.latency)
        else:
            await asyncio.sleep(self.latency)
        words = len(orjson.loads(body)["messages"][-1]["content"].split())
        reply = {
            "model": "sim",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": words, "completion_tokens": 1, "total_tokens": words + 1},
        }
        return 200, limit_headers, orjson.dumps(reply)

    def _admit(self, now: float) -> tuple[bool, float, int]:
        """(admitted, seconds until the window frees, requests left in it)."""
        assert self.rpm is not None
        if self.window == "second":
            cap = max(1, int(self.rpm / 60))
            sec, used = self._second
            if int(now) != sec:
                sec, used = int(now), 0
            wait = sec + 1 - now
            if used >= cap:
                self._second = (sec, used)
                return False, wait, 0
            self._second = (sec, used + 1)
            return True, wait, cap - used - 1
        cap = int(self.rpm)
        while self._window and self._window[0] <= now - 60:
            self._window.popleft()
        if len(self._window) >= cap:
            return False, self._window[0] + 60 - now, 0
        self._window.append(now)
        return True, self._window[0] + 60 - now, cap - len(self._window)

    # ---- what it saw -----------------------------------------------------------------------
    def per_second(self, status: int = 200) -> Counter[int]:
        return Counter(int(t) for t, s in self.answers if s == status)

    def count(self, status: int, since: float = 0.0, until: float = math.inf) -> int:
        return sum(1 for t, s in self.answers if s == status and since <= t < until)

    def ok_rate(self, since: float, until: float | None = None) -> float:
        """Successful answers per second over [since, until or the last ok answer]."""
        oks = [t for t, s in self.answers if s == 200 and t >= since]
        end = until if until is not None else max(oks)
        return sum(1 for t in oks if t < end) / (end - since)


@dataclass
class SimRun:
    stats: RunStats
    governor: Any
    server: SimServer
    wall: float  # virtual seconds
    output: pl.DataFrame
    error: BaseException | None = None


def run_sim(
    server: SimServer,
    tmp: Path,
    rows: int,
    *,
    seed: int = 0,
    provider: str = "openai",
    **settings: Any,
) -> SimRun:
    """Run the real engine over `rows` rows against `server` in virtual time."""
    random.seed(seed)  # the retry jitter
    inp = tmp / "in.parquet"
    pl.DataFrame({"id": range(rows), "text": [f"row {i} says hello" for i in range(rows)]}).write_parquet(inp)
    out = tmp / "out.parquet"
    base = "http://sim/api/v7/llm" if provider == "modelslab" else "http://sim/v1"
    values = {"input": str(inp), "output": str(out), "prompt": "Say: {text}", "model": "sim", "base_url": base}
    values["provider"] = provider
    cfg = build_config({}, {**values, **settings})
    plan = preflight(cfg)
    stats = RunStats(total_rows=rows)
    checkpoint = Checkpoint(cfg.checkpoint_path)
    checkpoint.open()
    done = checkpoint.load()
    checkpoint.start_journal()
    sink = ParquetSink(out)
    key = "k" * 20 if provider == "modelslab" else None
    prov = make_provider(cfg.provider, base, plan.renderer.spec, key)
    engine = build_engine(
        cfg, plan, provider=prov, transport=server, base_url=base, checkpoint=checkpoint, sink=sink, stats=stats
    )
    loop = looptime.new_event_loop(start=0.0)
    error: BaseException | None = None
    try:
        loop.run_until_complete(engine.run(source.batches(plan.table, cfg.batch_size), lambda f: prepare(f, plan.renderer, done)))
        sink.commit()
    except errors.FatalError as stop:  # the run stopped early, with every row's result written: the output is whole
        error = stop
        sink.commit()
    except BaseExceptionGroup as group:
        error = group.exceptions[0]
        sink.abort()
    finally:
        wall = loop.time()
        loop.close()
        checkpoint.close()
    output = pl.read_parquet(out) if out.exists() else pl.DataFrame()
    return SimRun(stats=stats, governor=engine.governor, server=server, wall=wall, output=output, error=error)
