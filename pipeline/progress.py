"""The only module that touches tqdm: a live bar while running and the closing summary.

The bar is refreshed from the counters on a timer, not per row, so a million
rows cost a few thousand bar updates, not a million. Without a terminal (cron,
CI, `make` in a pipe) there is no bar; a status line every minute shows in the
job's log that it is alive and how far it got.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Never, TextIO

from tqdm import tqdm

from pipeline.stats import RunStats

REFRESH = 0.5
LOG_EVERY = 60.0  # seconds between status lines when there is no terminal


class Progress:
    def __init__(self, stats: RunStats, *, enabled: bool, stream: TextIO = sys.stderr, log_every: float = LOG_EVERY) -> None:
        self._stats = stats
        self._enabled = enabled
        self._tty = stream.isatty()
        self._stream = stream
        self._log_every = log_every
        self._bar: tqdm[Never] | None = None
        self._shown = 0
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self._enabled:
            return
        self._started = time.monotonic()
        if self._tty:
            self._bar = tqdm(
                total=self._stats.total_rows or None, unit="row", file=self._stream, dynamic_ncols=True, smoothing=0.1
            )
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(REFRESH if self._tty else self._log_every)
            if self._bar is not None:
                self.refresh()
            else:
                self.notice(self.status_line())

    def status_line(self) -> str:
        s = self._stats
        elapsed = time.monotonic() - self._started
        rate = s.rows_done / elapsed if elapsed > 0 else 0.0
        total = f" of {s.total_rows:,} ({s.rows_done / s.total_rows:.0%})" if s.total_rows else ""
        left = s.total_rows - s.rows_done
        eta = f", about {left / rate / 60:.0f} min left" if rate > 0 and left > 0 else ""
        return (
            f"pipeline: {s.rows_done:,}{total} rows after {elapsed / 60:.1f} min, {rate:.1f} rows/s, {s.errors} errors, "
            f"{s.retries} retries{eta}; {limits_text(s)}"
        )

    def refresh(self) -> None:
        if self._bar is None:
            return
        s = self._stats
        pace = f" rpm={s.pace_rpm:,.0f}({s.pace_source})" if s.pace_rpm else ""
        limited = f" 429={s.limited_rate}r/{s.limited_concurrency}c" if s.limited_rate or s.limited_concurrency else ""
        self._bar.set_postfix_str(
            f"ok={s.ok} err={s.errors} tok={s.prompt_tokens + s.completion_tokens:,} retries={s.retries}"
            f"{pace} c={s.concurrency}/{s.concurrency_ceiling}{limited}",
            refresh=False,
        )
        self._bar.update(s.rows_done - self._shown)  # redraws, with the postfix just set
        self._shown = s.rows_done

    def notice(self, message: str) -> None:
        """A line for the user that must not tear the bar (rare events only, never per row)."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._bar is not None:
            self.refresh()
            self._bar.close()
            self._bar = None


_SOURCES = {"user": "your --rpm", "header": "the server's headers", "adaptive": "learned from 429s"}


def limits_text(s: RunStats) -> str:
    """The limits in force and where they come from, as one clause."""
    if s.pace_rpm:
        detail = f", {s.pace_detail}" if s.pace_source == "header" and s.pace_detail else ""
        pace = f"pace {s.pace_rpm:,.0f} requests/min ({_SOURCES.get(s.pace_source or '', s.pace_source)}{detail})"
    else:
        pace = "no request pace (none given, announced or needed)"
    if s.pace_tpm:
        source = "your --tpm" if s.pace_tpm_source == "user" else "the server's headers"
        pace += f", {s.pace_tpm:,.0f} tokens/min ({source})"
    if s.concurrency_named:
        conc = f"{s.concurrency} in flight (the server's limit: {s.concurrency_named})"
    elif s.concurrency == s.concurrency_ceiling:
        conc = f"{s.concurrency} in flight"
    else:
        conc = f"{s.concurrency} in flight (learned, at most {s.concurrency_ceiling})"
    limited = ""
    if s.limited_rate or s.limited_concurrency:
        limited = f"; 429s: {s.limited_rate} rate, {s.limited_concurrency} in-flight"
    return f"{pace}; {conc}{limited}"


def summary(stats: RunStats, wall: float, output: str | None, checkpoint: str) -> str:
    s = stats
    sent = s.rows_sent
    lines = [
        f"pipeline: {s.rows_done} rows in {wall:.1f} s: {s.ok} ok, {s.errors} error"
        f" ({s.from_checkpoint} ok from the checkpoint, not sent again)",
        f"  requests: {s.requests_sent} sent for {sent} rows ({s.retries} retries), {sent / wall if wall > 0 else 0:.1f} rows/s"
        + (f"; {s.shared} rows shared the answer of an identical request" if s.shared else ""),
        f"  tokens this run: {s.prompt_tokens:,} in, {s.completion_tokens:,} out"
        + (f" ({s.estimated_rows} rows estimated: the server sent no usage)" if s.estimated_rows else ""),
    ]
    p50, p95 = s.latency_quantile(0.5), s.latency_quantile(0.95)
    if p50 is not None and p95 is not None:
        lines.append(f"  latency: p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    lines.append(f"  limits: {limits_text(s)}" + (f"; outage holds: {s.breaker_opened}" if s.breaker_opened else ""))
    if s.error_kinds:
        kinds = ", ".join(f"{k} x{n}" for k, n in s.error_kinds.most_common())
        lines.append(f"  errors by kind: {kinds}")
    if output:
        lines.append(f"  output: {output}")
    lines.append(f"  checkpoint: {checkpoint}")
    return "\n".join(lines)
