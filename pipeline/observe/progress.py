"""The only module that touches tqdm: a live bar while running and the closing summary.

The bar is refreshed from the counters on a timer, not per row, so a million
rows cost a few thousand bar updates, not a million. Without a terminal (cron,
CI, `make` in a pipe) there is no bar; a status line every minute shows in the
job's log that it is alive and how far it got.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from typing import Never, TextIO

from tqdm import tqdm
from tqdm.auto import tqdm as tqdm_auto

from pipeline.limits.spend import summary_line as spend_line
from pipeline.observe.stats import RunStats

REFRESH = 0.5
LOG_EVERY = 60.0  # seconds between status lines when there is no terminal


class Progress:
    def __init__(
        self,
        stats: RunStats,
        *,
        enabled: bool,
        stream: TextIO = sys.stderr,
        log_every: float = LOG_EVERY,
        notebook: bool = False,
    ) -> None:
        """`notebook`: draw tqdm's notebook widget (the Python API inside Jupyter, whose stderr is no terminal)."""
        self._stats = stats
        self._enabled = enabled
        self._notebook = notebook
        self._tty = notebook or stream.isatty()
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
            # tqdm's own rate and ETA would count rows answered from the checkpoint, which take no time:
            # the bar shows ours (rows this run's requests finished), in the postfix.
            bar = tqdm_auto if self._notebook else tqdm  # auto: the widget where ipywidgets is installed
            self._bar = bar(
                total=self._stats.total_rows or None,
                unit="row",
                file=self._stream,
                dynamic_ncols=True,
                bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(REFRESH if self._tty else self._log_every)
            if self._bar is not None:
                self.refresh()
            else:
                self.notice(self.status_line())

    def _rate_and_left(self) -> tuple[float, str]:
        """Rows a second this run's requests finish, and the time left at that pace ("" when unknown)."""
        s = self._stats
        elapsed = time.monotonic() - self._started
        worked = s.rows_done - s.from_checkpoint - s.from_cache  # rows not sent take no time: they would flatter the pace
        rate = worked / elapsed if elapsed > 0 else 0.0
        left = s.total_rows - s.rows_done
        return rate, (duration(left / rate) + " left" if rate > 0 and left > 0 else "")

    def status_line(self) -> str:
        s = self._stats
        elapsed = time.monotonic() - self._started
        rate, left = self._rate_and_left()
        done = (
            f"{s.rows_done:,} of {plural(s.total_rows, 'row')} ({s.rows_done / s.total_rows:.0%})"
            if s.total_rows
            else plural(s.rows_done, "row")
        )
        resumed = f" ({s.from_checkpoint:,} from the checkpoint)" if s.from_checkpoint else ""
        failing = failing_text(s)
        return (
            f"pipeline: {done} done{resumed} after {elapsed / 60:.1f} min, {rate:.1f} rows/s, "
            f"{plural(s.errors, 'error')}, {plural(s.retries, 'retry', 'retries')}{', ' + left if left else ''}; "
            + (f"{failing}; " if failing else "")
            + limits_text(s)
        )

    def refresh(self) -> None:
        if self._bar is None:
            return
        s = self._stats
        rate, left = self._rate_and_left()
        parts = [failing_text(s) or f"{rate:.1f} rows/s", left, f"err {s.errors:,}" if s.errors else ""]
        # The details only where the terminal has room: at 80 columns the bar itself comes first.
        if shutil.get_terminal_size().columns >= 120:
            limited = f"429s {s.limited_rate}r/{s.limited_concurrency}c" if s.limited_rate or s.limited_concurrency else ""
            parts += [
                f"tok {s.prompt_tokens + s.completion_tokens:,}",
                f"retries {s.retries:,}" if s.retries else "",
                f"rpm {s.pace_rpm:,.0f}" if s.pace_rpm else "",
                f"in flight {s.concurrency}/{s.concurrency_ceiling}",
                limited,
            ]
        self._bar.set_postfix_str(", ".join(p for p in parts if p), refresh=False)
        self._bar.update(s.rows_done - self._shown)  # redraws, with the postfix just set
        self._shown = s.rows_done

    def notice(self, message: str) -> None:
        """A line for the user that must not tear the bar (rare events only, never per row)."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self, *, interrupted: bool = False) -> None:
        """Stop updating. After an interrupt the bar is cleared, not left: the terminal has echoed ^C
        on its line, and the message that follows says how far the run got."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._bar is not None:
            if interrupted:
                self._bar.leave = False
            else:
                self.refresh()
            self._bar.close()
            self._bar = None


def failing_text(s: RunStats) -> str:
    """While the server fails every request: how many in a row, and when the next probe goes ("" when it does not)."""
    if s.failing_streak < 5:  # a few in a row happen to any busy server
        return ""
    kind = s.failing_kind.replace("http_", "HTTP ")
    text = f"server failing: {s.failing_streak:,} {kind} in a row"
    if s.next_probe_at is not None:
        text += f", next probe in {max(0.0, s.next_probe_at - time.monotonic()):.0f} s"
    return text


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


def model_text(s: RunStats) -> str:
    """One model's figures of a run with several, as one clause."""
    p50, p95 = s.latency_quantile(0.5), s.latency_quantile(0.95)
    text = f"{s.ok:,} ok, {plural(s.errors, 'error')}; {plural(s.requests_sent, 'request')}"
    if p50 is not None and p95 is not None:
        text += f", latency p50 {p50:.0f} ms, p95 {p95:.0f} ms"
    text += f"; tokens {s.prompt_tokens:,} in, {s.completion_tokens:,} out"
    if s.spent_usd:
        text += f"; ${s.spent_usd:.5f}"
    if s.limited_rate or s.limited_concurrency:
        text += f"; 429s: {s.limited_rate} rate, {s.limited_concurrency} in-flight"
    return text


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def duration(seconds: float) -> str:
    """A time left, as a person would say it."""
    if seconds < 60:
        return "under a minute"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def summary(stats: RunStats, wall: float, output: str | None, checkpoint: str) -> str:
    s = stats
    s.roll_up()  # several models: their 429s and limits as of now, not of the last sample
    sent = s.rows_sent
    reused = [f"{s.from_checkpoint:,} ok from the checkpoint" if s.from_checkpoint else "",
              f"{s.from_cache:,} from the answer cache" if s.from_cache else ""]  # fmt: skip
    resumed = f" ({', '.join(r for r in reused if r)}, not sent again)" if any(reused) else ""
    lines = [
        f"pipeline: {plural(s.rows_done, 'row')} in {wall:.1f} s: {s.ok:,} ok, {plural(s.errors, 'error')}{resumed}",
        f"  requests: {s.requests_sent:,} sent for {plural(sent, 'row')} ({plural(s.retries, 'retry', 'retries')}), "
        f"{sent / wall if wall > 0 else 0:.1f} rows/s"
        + (f"; {plural(s.shared, 'row')} shared the answer of an identical request" if s.shared else ""),
        f"  tokens this run: {s.prompt_tokens:,} in, {s.completion_tokens:,} out"
        + (f" ({s.estimated_rows} rows estimated: the server sent no usage)" if s.estimated_rows else ""),
    ]
    p50, p95 = s.latency_quantile(0.5), s.latency_quantile(0.95)
    if p50 is not None and p95 is not None:
        lines.append(f"  latency: p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    if (spent := spend_line(s)) is not None:
        lines.append(spent)
    lines.append(f"  limits: {limits_text(s)}" + (f"; outage holds: {s.breaker_opened}" if s.breaker_opened else ""))
    if s.error_kinds:
        kinds = ", ".join(f"{k} x{n}" for k, n in s.error_kinds.most_common())
        lines.append(f"  errors by kind (rows): {kinds}")
    for name, own in s.models.items():  # several models: one line each, to compare them at a glance
        lines.append(f"  model {name}: {model_text(own)}")
    if output:
        lines.append(f"  output: {output}")
    lines.append(f"  checkpoint: {checkpoint}")
    return "\n".join(lines)
