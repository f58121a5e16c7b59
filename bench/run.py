"""`make bench`: throughput, rate-limit adherence, memory, resume and fault cost of `pipeline run`.

Every scenario runs `pipeline run` as a child process against tests/fakeserver.py (its own
process, pinned to one core) and, in the same run, bench/baseline.py, the least any client
must do.  Clients are pinned to another core so their CPU is measured apart from the server's;
wall is from spawn to exit, CPU from wait4() on the child, peak RSS from GNU time.

    python bench/run.py [--quick] [--only overhead|ratelimit|memory|resume|faults|spend|report|api|s3|adapt|ray|s3state|reader|images]

Prints a table, then a PASS/MISS line per target of issue 8 (rate control) computed from the
figures, and writes every figure plus machine info to bench/results/latest.json.  The table
reports; it never judges: a missed target is a MISS line, not a failed scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Summarise: {text}"
CORES = sorted(os.sched_getaffinity(0))
TASKSET = shutil.which("taskset") if len(CORES) >= 2 else None
CLIENT_CORE, SERVER_CORE = CORES[0], CORES[-1]
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
SCENARIOS = (
    "overhead", "ratelimit", "memory", "resume", "faults", "spend", "report", "api", "s3", "adapt", "ray", "s3state", "reader",
    "images",
)  # fmt: skip
LIVE: set[subprocess.Popen[Any]] = set()  # children still running, so every exit path can end them
Row = tuple[str, str, float | None, float | None, float | None]


class BenchError(Exception):
    """A scenario could not produce a trustworthy figure (wrong exit code, lost rows...)."""


def pinned(core: int, cmd: list[str]) -> list[str]:
    return [TASKSET, "-c", str(core), *cmd] if TASKSET else cmd


@dataclass
class Run:
    rc: int
    wall: float  # spawn to exit
    cpu: float  # user + system of the child and of anything it waited for
    rss_mb: float
    stderr: str
    stdout: str

    def summary(self) -> dict[str, Any]:
        """Figures from `pipeline run`'s closing summary on stderr (its wall excludes start-up)."""
        out: dict[str, Any] = {}
        # "N rows in W s: A ok, B errors (C ok from the checkpoint, ...)", counts with thousands separators,
        # singular for one, the checkpoint clause only when there is one.
        n = r"([\d,]+)"
        if m := re.search(rf"{n} rows? in ([\d.]+) s: {n} ok, {n} errors?(?: \({n} ok from the checkpoint)?", self.stderr):
            rows, ok, errors, cached = (int((g or "0").replace(",", "")) for g in (m[1], m[3], m[4], m[5]))
            out.update(rows=rows, wall=float(m[2]), ok=ok, errors=errors, from_checkpoint=cached)
        if m := re.search(rf"requests: {n} sent for {n} rows? \({n} retr(?:y|ies)\), ([\d.,]+) rows/s", self.stderr):
            requests, retries, rate = (g.replace(",", "") for g in (m[1], m[3], m[4]))
            out.update(requests=int(requests), retries=int(retries), rows_per_s=float(rate))
        # "  limits: pace N requests/min (...); C in flight (...); 429s: a rate, b in-flight"
        if m := re.search(r"^  limits: (.*)$", self.stderr, re.MULTILINE):
            out["limits"] = m[1]  # as printed, for the figures
            if p := re.match(r"pace ([\d,]+) requests/min", m[1]):
                out["pace_rpm"] = int(p[1].replace(",", ""))
            if c := re.search(r"; (\d+) in flight", m[1]):
                out["concurrency"] = int(c[1])
            if q := re.search(r"429s: (\d+) rate, (\d+) in-flight", m[1]):
                out.update(limited_rate=int(q[1]), limited_concurrency=int(q[2]))
        return out


def run_child(
    cmd: list[str],
    *,
    timeout: float,
    tick: Callable[[subprocess.Popen[bytes]], None] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> Run:
    """Run `cmd` on the client core, in `cwd`; `tick(proc)` is called about every 10 ms while it runs.

    `env` is added to this process's environment for the child (which otherwise inherits it)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as tv:
        full = pinned(CLIENT_CORE, cmd)
        if GNU_TIME:
            # Not wait4's ru_maxrss: a child spawned from here inherits this harness's own peak RSS as
            # its starting maxrss; GNU time forks the command from its own tiny image.
            full = [GNU_TIME, "-f", "%M", "-o", tv.name, *full]
        started = time.monotonic()
        # Own process group: killpg() then ends GNU time and the command together.
        child_env = {**os.environ, **env} if env else None
        proc = subprocess.Popen(full, stdout=out, stderr=err, cwd=cwd, start_new_session=True, env=child_env)
        LIVE.add(proc)
        fd = os.pidfd_open(proc.pid)  # readable the moment the child exits: wall is not rounded to a poll
        try:
            while not select.select([fd], [], [], 0.01 if tick else 1.0)[0]:
                if time.monotonic() - started > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)  # a stuck child must not load the next scenarios
                    proc.wait()
                    LIVE.discard(proc)
                    raise BenchError(f"{' '.join(cmd[:2])}... still running after {timeout:.0f} s")
                if tick:
                    tick(proc)
            # wait4, not Popen.wait: it returns the child's rusage, its own children's CPU included.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            os.close(fd)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: Popen must not wait again
        LIVE.discard(proc)
        out.seek(0)
        err.seek(0)
        cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # the upper bound without GNU time
        if GNU_TIME and (kb := tv.read().split()):
            rss = int(kb[-1]) / 1024  # after any "Command exited with non-zero status" line
        return Run(proc.returncode, wall, cpu, rss, err.read().decode(errors="replace"), out.read().decode())


def run_together(cmds: list[list[str]], *, timeout: float) -> list[Run]:
    """Start every command at once on the client core and wait for all: they compete for that
    one core as two jobs on one machine would.  Runs come back in the order of `cmds`; their RSS
    is wait4's (an upper bound: see run_child), their wall from the common start to each exit."""
    with ExitStack() as stack:
        outs = [stack.enter_context(tempfile.TemporaryFile()) for _ in cmds]
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in cmds]
        started = time.monotonic()
        procs: list[subprocess.Popen[bytes]] = []
        for cmd, out, err in zip(cmds, outs, errs, strict=True):
            procs.append(subprocess.Popen(pinned(CLIENT_CORE, cmd), stdout=out, stderr=err, cwd=ROOT, start_new_session=True))
            LIVE.add(procs[-1])
        fds = {os.pidfd_open(p.pid): i for i, p in enumerate(procs)}
        done: dict[int, tuple[int, float, float, float]] = {}  # index -> rc, wall, cpu, rss
        try:
            while fds:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    for i in fds.values():
                        os.killpg(procs[i].pid, signal.SIGKILL)
                        procs[i].wait()
                        LIVE.discard(procs[i])
                    raise BenchError(f"{len(fds)} of {len(cmds)} runs started together still running after {timeout:.0f} s")
                for fd in select.select(list(fds), [], [], min(left, 1.0))[0]:
                    i = fds.pop(fd)
                    os.close(fd)
                    _, status, usage = os.wait4(procs[i].pid, 0)
                    procs[i].returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
                    LIVE.discard(procs[i])
                    rusage = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
                    done[i] = (procs[i].returncode, time.monotonic() - started, *rusage)
        finally:
            for fd in fds:
                os.close(fd)
        runs = []
        for i, (out, err) in enumerate(zip(outs, errs, strict=True)):
            out.seek(0)
            err.seek(0)
            runs.append(Run(*done[i], err.read().decode(errors="replace"), out.read().decode()))
        return runs


@dataclass(frozen=True)
class Span:
    """Whole seconds [lo, hi) of a server timeline; `whole_run` when the span asked for was empty
    (a --quick run ends before 10 s) and the whole run was taken instead."""

    lo: int
    hi: int
    whole_run: bool = False

    @property
    def seconds(self) -> int:
        return self.hi - self.lo

    def describe(self) -> str:
        return f"[{self.lo}, {self.hi}) s" + (" (asked-for span empty: whole run)" if self.whole_run else "")


class Timeline:
    """The fake server's GET /timeline: chat answers per whole second since its first chat request."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.buckets: dict[int, dict[str, Any]] = {int(b["t"]): b for b in raw["buckets"]}

    def count(self, key: str, lo: int = 0, hi: int | None = None, *, model: str | None = None) -> int:
        """Answers of `key` ("ok", "429", "other") in seconds [lo, hi); `model` counts its ok only."""
        n = 0
        for t, b in self.buckets.items():
            if t >= lo and (hi is None or t < hi):
                n += b["ok_by_model"].get(model, 0) if model else b[key]
        return n

    def last_ok(self, model: str | None = None) -> int:
        """The last second with an ok answer (of `model`); 0 when none."""
        return max((t for t, b in self.buckets.items() if (b["ok_by_model"].get(model, 0) if model else b["ok"])), default=0)

    def span(self, lo: int, hi: int | None = None, *, model: str | None = None) -> Span:
        """Whole seconds [lo, hi), ending at the latest where the last ok second starts: that second
        is partial, and counting it as whole would understate every rate.  When nothing is left,
        the whole run [0, last ok second) (at least one second) instead, flagged."""
        end = self.last_ok(model)
        hi = end if hi is None else min(hi, end)
        return Span(lo, hi) if hi - lo >= 1 else Span(0, max(end, 1), whole_run=True)

    def per_min(self, span: Span, *, model: str | None = None) -> float:
        """Ok answers per minute over `span`."""
        return self.count("ok", span.lo, span.hi, model=model) / span.seconds * 60

    def share_429(self, lo: int = 0, hi: int | None = None) -> float:
        """429s / all answers in seconds [lo, hi)."""
        r = self.count("429", lo, hi)
        total = r + self.count("ok", lo, hi) + self.count("other", lo, hi)
        return r / total if total else 0.0

    def max_window_per_min(self, width: int) -> tuple[float, int]:
        """The highest ok rate per minute in any `width` consecutive whole seconds before the
        last ok second, and that width (narrower when the run is shorter than `width`)."""
        end = max(self.last_ok(), 1)
        width = min(width, end)
        best = max(self.count("ok", t, t + width) for t in range(end - width + 1))
        return best / width * 60, width

    def compact(self) -> list[list[Any]]:
        """[second, ok, 429, other, ok by model] per second, for the figures."""
        return [[t, b["ok"], b["429"], b["other"], b["ok_by_model"]] for t, b in sorted(self.buckets.items())]


class Server:
    """tests/fakeserver.py in its own process on the server core, so its CPU never counts as the client's."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rpm: int | None = None,
        window: str = "minute",
        fault_rate: float = 0.0,
        rate_headers: str = "openai",
        tpm: int | None = None,
        limit_schedule: str | None = None,
        max_in_flight: int | None = None,
        in_flight_message: str = "named",
        slots: int | None = None,
    ) -> None:
        """Keywords are the fake server's options (tests/fakeserver.py --help); `window` is
        --rate-window, `rate_headers` "openai" (its default, sent whenever rpm or tpm is set),
        "anthropic" or "none"."""
        cmd = [sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--port", "0", "--latency", str(latency), "--no-record"]
        cmd += ["--rpm", str(rpm)] if rpm else []
        cmd += ["--tpm", str(tpm)] if tpm else []
        cmd += ["--rate-window", window] if rpm or tpm else []
        cmd += ["--rate-headers", rate_headers]
        cmd += ["--limit-schedule", limit_schedule] if limit_schedule else []
        cmd += ["--max-in-flight", str(max_in_flight)] if max_in_flight else []
        cmd += ["--in-flight-message", in_flight_message]
        cmd += ["--slots", str(slots)] if slots else []
        cmd += ["--fault-rate", str(fault_rate)] if fault_rate else []
        # stderr to a file, not a pipe: a chatty server could fill a pipe nobody reads and stall.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server, closed in close()
        self.proc = subprocess.Popen(
            pinned(SERVER_CORE, cmd), stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, start_new_session=True
        )
        LIVE.add(self.proc)
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], 20)[0]
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            self.close()
            raise BenchError(f"fake server did not start: {line!r}")
        self.url = line.split()[1]

    def _http(self, method: str, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, method=method), timeout=10) as r:
            return dict(json.load(r))

    def stats(self) -> dict[str, int]:
        return self._http("GET", "/stats")

    def timeline(self) -> Timeline:
        return Timeline(self._http("GET", "/timeline"))

    def reset(self) -> None:
        self._http("POST", "/reset")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        LIVE.discard(self.proc)
        self._err.close()


class Bench:
    def __init__(self, tmp: Path, quick: bool) -> None:
        self.tmp, self.quick = tmp, quick
        self.timeout = 120.0 if quick else 300.0
        self.rows: list[Row] = []
        self.figures: dict[str, dict[str, Any]] = {}
        self._runs = 0

    def n(self, full: int) -> int:
        return full // 10 if self.quick else full

    def table(self, n: int, *, empty: bool = False) -> Path:
        """Parquet with unique short texts (identical prompts are sent once), made once per size.

        With `empty`, every text is null: each row then streams through read, render,
        the engine and the ordered writer as a "not sent" row, and no request is made."""
        path = self.tmp / f"in-{n}{'-null' if empty else ''}.parquet"
        if path.exists():
            return path
        # In 1M-row slices: this harness never holds a 10M-row frame, so it stays small on a shared machine.
        schema = pl.DataFrame(schema={"id": pl.Int64, "text": pl.String}).to_arrow().schema  # as to_arrow() makes it
        with pq.ParquetWriter(path, schema, compression="zstd") as w:
            for start in range(0, n, 1_000_000):
                ids = pl.int_range(start, min(n, start + 1_000_000), dtype=pl.Int64).alias("id")
                text = pl.lit(None, dtype=pl.String) if empty else pl.format("item {} arrived on time and works", "id")
                w.write_table(pl.select(ids).with_columns(text=text).to_arrow(), 100_000)
        return path

    def add(self, scenario: str, metric: str, ours: float | None, base: float | None = None) -> None:
        self.rows.append((scenario, metric, ours, base, ours / base if ours is not None and base else None))

    def ours_cmd(
        self,
        inp: Path | str,
        url: str,
        conc: int,
        *extra: str,
        out: Path | str | None = None,
        model: str = "fake-model",
        path: str = "/v1",
    ) -> list[str]:
        """`pipeline run` on `inp` against the server at `url` + `path`, writing a fresh output unless `out`."""
        self._runs += 1
        out = out or self.tmp / f"out-{self._runs}" / "out.parquet"
        exe = Path(sys.executable).with_name("pipeline")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline"]
        cmd += ["run", "--input", str(inp), "--output", str(out), "--prompt", PROMPT, "--base-url", url + path]
        return [*cmd, "--model", model, "--concurrency", str(conc), *extra]

    def ours(
        self,
        inp: Path | str,
        url: str,
        conc: int,
        *extra: str,
        out: Path | str | None = None,
        expect: int = 0,
        model: str = "fake-model",
        path: str = "/v1",
        **kw: Any,
    ) -> Run:
        r = run_child(self.ours_cmd(inp, url, conc, *extra, out=out, model=model, path=path), timeout=self.timeout, **kw)
        if r.rc != expect:
            raise BenchError(f"pipeline run exited {r.rc}, expected {expect}: {r.stderr.strip()[-800:]}")
        return r

    def base(self, inp: Path, url: str, conc: int, *extra: str) -> tuple[Run, dict[str, Any]]:
        cmd = [sys.executable, str(ROOT / "bench" / "baseline.py"), "--input", str(inp), "--base-url", url + "/v1"]
        r = run_child([*cmd, "--prompt", PROMPT, "--concurrency", str(conc), *extra], timeout=self.timeout)
        if r.rc != 0:
            raise BenchError(f"baseline exited {r.rc}: {r.stderr.strip()[-800:]}")
        return r, json.loads(r.stdout)

    def overhead(self) -> None:
        """Ours (the default: adaptive) against the bare baseline, plus ours with --no-adapt.

        R9 (issue 8): adaptation costs nothing on an unlimited server: requests/s adaptive
        within 5% of --no-adapt (ratio >= 0.95)."""
        n, conc, reps = self.n(20_000), 256, 1 if self.quick else 3
        inp = self.table(n)
        samples: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": [], "no_adapt": []}
        with closing(Server(latency=0.02)) as srv:
            for _ in range(reps):  # alternated, best of each kept: the machine is shared and noisy
                for who in ("baseline", "ours", "no_adapt"):
                    srv.reset()
                    cpu0 = srv.cpu()
                    if who != "baseline":
                        r = self.ours(inp, srv.url, conc, *(["--no-adapt"] if who == "no_adapt" else []))
                        s = r.summary()  # rows/s, not its wall: that is printed to 0.1 s only
                        sending, ok = n / s["rows_per_s"] if s.get("rows_per_s") else r.wall, s.get("ok", 0)
                    else:
                        r, rep = self.base(inp, srv.url, conc)
                        sending, ok = rep["send_s"], rep["ok"]
                    got = srv.stats()
                    if ok != n or got["requests"] != n:
                        raise BenchError(f"{who}: {ok} ok rows, server saw {got['requests']} requests; expected {n}")
                    server_cpu = srv.cpu() - cpu0
                    samples[who].append(
                        dict(wall_s=r.wall, cpu_s=r.cpu, rss_mb=r.rss_mb, sending_s=sending, server_cpu_s=server_cpu)
                    )
        best = {k: min(v, key=lambda s: s["wall_s"]) for k, v in samples.items()}
        o, b = best["ours"], best["baseline"]
        scn = f"1 overhead {n} req c{conc} 20ms"
        self.add(scn, "requests/s, spawn to exit", n / o["wall_s"], n / b["wall_s"])
        self.add(scn, "requests/s, start-up excluded", n / o["sending_s"], n / b["sending_s"])
        self.add(scn, "client CPU µs/request", o["cpu_s"] / n * 1e6, b["cpu_s"] / n * 1e6)
        self.add(scn, "client peak RSS MB", o["rss_mb"], b["rss_mb"])
        # The server's CPU per request bounds the rate any client can get from this one-core server.
        self.add(scn, "server busy share of its core", o["server_cpu_s"] / o["sending_s"], b["server_cpu_s"] / b["sending_s"])
        self.add(scn, "server ceiling req/s (1/CPU per req)", n / o["server_cpu_s"], n / b["server_cpu_s"])
        # "ours" is the default run, adaptive; the same client with --no-adapt is the reference here.
        ratio = best["no_adapt"]["sending_s"] / o["sending_s"]
        what = "requests/s start-up excluded, adaptive / --no-adapt"
        self.add(scn, f"R9 {what} (target >= 0.95)", ratio)
        target = self.target("R9", f"overhead: {what}", ratio, lo=0.95)
        self.figures["overhead"] = dict(requests=n, concurrency=conc, latency_s=0.02, samples=samples, best=best,
                                        adaptive_over_no_adapt=ratio, targets=[target])  # fmt: skip

    def ratelimit(self) -> None:
        n, rpm, conc = self.n(3_000), 6_000, 64
        inp = self.table(n)
        fig: dict[str, Any] = dict(requests=n, rpm=rpm, concurrency=conc, latency_s=0.02)
        for window in ("second", "minute"):
            samples: list[tuple[float, int]] = []
            with closing(Server(latency=0.02, rpm=rpm, window=window)) as srv:

                def poll(_: subprocess.Popen[bytes], srv: Server = srv, samples: list[tuple[float, int]] = samples) -> None:
                    if not samples or time.monotonic() - samples[-1][0] >= 0.1:
                        samples.append((time.monotonic(), srv.stats()["ok"]))

                r = self.ours(inp, srv.url, conc, "--rpm", str(rpm), tick=poll)
                got = srv.stats()
                srv.reset()
                _, rep = self.base(inp, srv.url, conc)  # no limiter at all: proves the server does enforce
            # The rate between the first and last samples strictly inside the run: start-up and tail excluded.
            inside = [(t, ok) for t, ok in samples if 0 < ok < n]
            if len(inside) < 2:
                raise BenchError(f"rate window {window}: only {len(inside)} samples of /stats inside the run")
            (t0, c0), (t1, c1) = inside[0], inside[-1]
            share = (c1 - c0) / (t1 - t0) * 60 / rpm
            scn = f"2 rate {n} req --rpm {rpm}, server per {window}"
            self.add(scn, "achieved rate / limit", share)
            self.add(scn, "429 answers", got["status_429"], rep["statuses"].get("429", 0))
            fig[window] = dict(share_of_limit=share, server=got, wall_s=r.wall, cpu_s=r.cpu, summary=r.summary(), baseline=rep)
        self.figures["ratelimit"] = fig

    def memory(self) -> None:
        small, conc = self.n(100_000), 512
        fig: dict[str, Any] = dict(concurrency=conc, input="parquet, 100k-row groups", rss_by="GNU time" if GNU_TIME else "wait4")
        with closing(Server(latency=0.0)) as srv:
            # A: every row sent over HTTP, ours against the bare baseline.
            inp = self.table(small)
            r, (br, _) = self.ours(inp, srv.url, conc), self.base(inp, srv.url, conc)
            inp.unlink()
            fig["sent"] = dict(rows=small, ours_rss_mb=r.rss_mb, base_rss_mb=br.rss_mb, ours_wall_s=r.wall)
            self.add("3 memory (peak RSS)", f"MB, {small:,} rows, all sent", r.rss_mb, br.rss_mb)
            # B: the whole table streamed end to end (read, render, engine, ordered
            # Parquet write) with nothing to send, so 10M rows fit in the time.
            streamed: dict[int, float] = {}
            for size in (small, small * 10, small * 100):
                inp = self.table(size, empty=True)
                r = self.ours(inp, srv.url, conc, "--max-error-rate", "1")
                inp.unlink()  # the 10M-row file is large: keep the temp folder small
                streamed[size] = r.rss_mb
                fig[f"streamed_{size}"] = dict(rows=size, ours_rss_mb=r.rss_mb, ours_wall_s=r.wall, rows_per_s=size / r.wall)
                self.add("3 memory (peak RSS)", f"MB, {size:,} rows streamed, none sent", r.rss_mb)
            for size in list(streamed)[1:]:
                self.add("3 memory (peak RSS)", f"streamed {size:,} / {small:,} rows", streamed[size] / streamed[small])
        fig["note"] = (
            "streamed tables have a null prompt in every row: each row is read, rendered, passed through the engine "
            "and written to the output in order, but no request is sent and so nothing is journaled"
        )
        self.figures["memory"] = fig

    def resume(self) -> None:
        n, conc = self.n(5_000), 64
        inp, out = self.table(n), self.tmp / "resume" / "out.parquet"
        journal_lines, kill_at_half = _killer(out.with_name("out.checkpoint"), n // 2)

        with closing(Server(latency=0.02)) as srv:
            self.ours(inp, srv.url, conc, out=out, tick=kill_at_half, expect=-signal.SIGKILL)
            first, saved = srv.stats()["requests"], journal_lines()
            r = self.ours(inp, srv.url, conc, out=out)
            total = srv.stats()["requests"]
        ok = pl.scan_parquet(out).filter(pl.col("status") == "ok").select(pl.len()).collect().item()
        if ok != n:
            raise BenchError(f"resume: the output has {ok} ok rows, expected {n}")
        scn = f"4 resume {n} req c{conc}, SIGKILL at 50%"
        self.add(scn, "requests sent twice", total - n, first)  # a client with no checkpoint re-sends all it got
        self.add(scn, "rows in the journal at the kill", saved, 0)
        self.add(scn, "re-run wall s", r.wall)
        self.figures["resume"] = dict(requests=n, concurrency=conc, first_run_requests=first, journal_at_kill=saved,
                                      total_requests=total, sent_twice=total - n, rerun=r.summary())  # fmt: skip

    def faults(self) -> None:
        n, conc, rate = self.n(5_000), 64, 0.1
        inp = self.table(n)
        res: dict[float, dict[str, Any]] = {}
        for fault in (0.0, rate):
            with closing(Server(latency=0.02, fault_rate=fault)) as srv:
                r = self.ours(inp, srv.url, conc, "--max-attempts", "10", "--max-error-rate", "1")
                got = srv.stats()
                srv.reset()
                b, rep = self.base(inp, srv.url, conc)
            res[fault] = dict(wall_s=r.wall, summary=r.summary(), server=got, base_wall_s=b.wall, base=rep)
        clean, bad = res[0.0], res[rate]
        scn = f"5 faults {n} req c{conc}, {rate:.0%} 500/503"
        self.add(scn, "wall s with faults", bad["wall_s"], bad["base_wall_s"])
        self.add(scn, "wall with / without faults", bad["wall_s"] / clean["wall_s"], bad["base_wall_s"] / clean["base_wall_s"])
        self.add(scn, "rows ended in error", bad["summary"].get("errors"), bad["base"]["failed"])
        self.add(scn, "retries (--max-attempts 10)", bad["summary"].get("retries"), 0)
        self.figures["faults"] = dict(requests=n, concurrency=conc, fault_rate=rate, runs={str(k): v for k, v in res.items()})

    # ---- issue 10: unattended nights -------------------------------------------------------------

    def spend(self) -> None:
        """With --max-cost at half of what the job costs, what the server billed (its usage at the
        prices) is at most the ceiling and at least 95% of it."""
        n, conc, p_in, p_out = self.n(3_000), 64, 1.0, 2.0
        inp = self.table(n)
        prices = ["--price-in", str(p_in), "--price-out", str(p_out), "--max-tokens", "64"]

        def billed(st: dict[str, int]) -> float:
            return (st["billed_prompt_tokens"] * p_in + st["billed_completion_tokens"] * p_out) / 1e6

        with closing(Server(latency=0.02)) as srv:
            self.ours(inp, srv.url, conc, *prices)
            full = billed(srv.stats())
            srv.reset()
            ceiling = full / 2
            r = self.ours(inp, srv.url, conc, *prices, "--max-cost", f"{ceiling:.8f}", expect=1)
            got = srv.stats()
        spent = billed(got)
        scn = f"7 spend {n} req c{conc}, --max-cost half the job"
        self.add(scn, "job cost without a ceiling (server-billed)", full)
        self.add(scn, "spent (server-billed) / ceiling", spent / ceiling)
        self.add(scn, "rows answered before the stop", r.summary().get("ok"))
        targets = [
            self.target("R11", "spend ceiling: spent / ceiling, at most", spent / ceiling, hi=1.0),
            self.target("R11", "spend ceiling: spent / ceiling, at least", spent / ceiling, lo=0.95),
        ]
        self.figures["spend"] = dict(requests=n, full_cost=full, ceiling=ceiling, spent=spent, server=got, targets=targets)

    def report(self) -> None:
        """`pipeline report` on a 1M-row output (it reads columns, not rows), and the report a
        20,000-row run draws at its end: what it adds to the run's wall time."""
        n = self.n(1_000_000)
        out = self.tmp / "report-1m" / "big.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        i = pl.col("id")
        ok = i % 50 != 0
        pl.select(pl.int_range(0, n, dtype=pl.Int64).alias("id")).with_columns(
            completion=pl.when(ok).then(pl.format("summary {}", i)),
            prompt_tokens=i % 300 + 20,
            completion_tokens=pl.when(ok).then(i % 64 + 1),
            total_tokens=i % 300 + i % 64 + 21,
            finish_reason=pl.when(i % 7 == 0).then(pl.lit("length")).otherwise(pl.lit("stop")),
            model=pl.lit("m"),
            status=pl.when(ok).then(pl.lit("ok")).otherwise(pl.lit("error")),
            error=pl.when(ok).then(None).otherwise(pl.lit("HTTP 500: boom (after 6 attempts)")),
            attempts=pl.lit(1, dtype=pl.Int64),
            latency_ms=(i % 997).cast(pl.Float64) + 5.0,
            request_key=i.cast(pl.String),
            tokens_estimated=pl.lit(False),
        ).write_parquet(out)
        exe = Path(sys.executable).with_name("pipeline")
        r = run_child([str(exe), "report", str(out), "-o", str(out.with_suffix(".html"))], timeout=self.timeout)
        if r.rc != 0:
            raise BenchError(f"pipeline report exited {r.rc}: {r.stderr.strip()[-800:]}")
        size = out.with_suffix(".html").stat().st_size
        scn = f"8 report, {n:,}-row output"
        self.add(scn, "pipeline report wall s (process start to exit)", r.wall)
        self.add(scn, "pipeline report peak RSS MB", r.rss_mb)
        self.add(scn, "report size kB", size / 1000)
        # The same run with and without its report: the report is drawn once, after the summary.
        rows = self.n(20_000)
        inp = self.table(rows)
        walls: dict[str, float] = {}
        with closing(Server(latency=0.0)) as srv:
            for who, extra in (("report", []), ("no_report", ["--no-report"]), ("report2", []), ("no_report2", ["--no-report"])):
                srv.reset()
                walls[who] = self.ours(inp, srv.url, 256, *extra).wall
        with_r, without = min(walls["report"], walls["report2"]), min(walls["no_report"], walls["no_report2"])
        self.add(f"8 report, {rows:,}-row run", "wall s with the report / --no-report", with_r, without)
        self.figures["report"] = dict(rows=n, wall_s=r.wall, rss_mb=r.rss_mb, size=size, run_walls=walls)

    def api(self) -> None:
        """The Python API's complete() against `pipeline run` on the same 20,000 requests (issue 11: within
        5%). Both from spawn to exit, alternated, best of each: the API builds its DataFrame in memory
        where the CLI writes Parquet, and neither draws a report."""
        n, conc = self.n(20_000), 256
        inp = self.table(n)
        script = (
            "import sys, polars as pl, pipeline\n"
            "out = pipeline.complete(pl.read_parquet(sys.argv[1]), prompt=sys.argv[2], base_url=sys.argv[3], "
            "model='fake-model', concurrency=int(sys.argv[4]), progress=False)\n"
            "assert out.height == int(sys.argv[5]) and (out['status'] == 'ok').all()\n"
        )
        walls: dict[str, list[float]] = {"api": [], "cli": []}
        with closing(Server(latency=0.02)) as srv:
            for _ in range(1 if self.quick else 3):
                for who in ("cli", "api"):
                    srv.reset()
                    if who == "cli":
                        r = self.ours(inp, srv.url, conc, "--no-report")
                    else:
                        cmd = [sys.executable, "-c", script, str(inp), PROMPT, srv.url + "/v1", str(conc), str(n)]
                        r = run_child(cmd, timeout=self.timeout)
                        if r.rc != 0:
                            raise BenchError(f"complete() exited {r.rc}: {r.stderr.strip()[-800:]}")
                    if srv.stats()["requests"] != n:
                        raise BenchError(f"{who}: the server saw {srv.stats()['requests']} requests, expected {n}")
                    walls[who].append(r.wall)
        api, cli = min(walls["api"]), min(walls["cli"])
        self.add(f"9 Python API, {n:,} req c{conc} 20ms", "requests/s spawn to exit, complete() / pipeline run", n / api, n / cli)
        self.figures["api"] = dict(requests=n, walls=walls, target="ratio >= 0.95")

    def s3(self) -> None:
        """Reading 1M rows from a local S3-compatible server (moto, its own process) against the same
        file on disk, through the source module as a run reads it (issue 11: memory flat, time within 2x)."""
        n = self.n(1_000_000)
        inp = self.table(n)
        with _moto() as (env, client):
            client.upload_file(str(inp), "bench", "in.parquet")
            script = (
                "import sys\nfrom pipeline.tables import source\n"
                "t = source.open_table((sys.argv[1],))\nrows = source.count_rows(t)\n"
                "seen = sum(b.height for b in source.batches(t, 5000))\nassert rows == seen == int(sys.argv[2]), (rows, seen)\n"
            )
            runs: dict[str, list[Run]] = {"s3": [], "disk": []}
            for _ in range(1 if self.quick else 2):
                for who, where in (("disk", str(inp)), ("s3", "s3://bench/in.parquet")):
                    r = run_child([sys.executable, "-c", script, where, str(n)], timeout=self.timeout, env=env)
                    if r.rc != 0:
                        raise BenchError(f"reading from {who} exited {r.rc}: {r.stderr.strip()[-800:]}")
                    runs[who].append(r)
        s3, disk = min(runs["s3"], key=lambda r: r.wall), min(runs["disk"], key=lambda r: r.wall)
        scn = f"10 object storage, read {n:,} rows of Parquet"
        self.add(scn, "wall s, s3:// (local moto server) / disk", s3.wall, disk.wall)
        self.add(scn, "peak RSS MB, s3:// / disk", s3.rss_mb, disk.rss_mb)
        self.figures["s3"] = dict(rows=n, s3_wall=s3.wall, disk_wall=disk.wall, s3_rss=s3.rss_mb, disk_rss=disk.rss_mb,
                                  bytes=inp.stat().st_size, target="time ratio <= 2, memory flat")  # fmt: skip

    # ---- issue 19: the state follows the job ---------------------------------------------------------

    def s3state(self) -> None:
        """A job's checkpoint in the bucket beside its s3:// output (issue 19).

        A: 20,000 rows s3:// to s3://, SIGKILL at 50%, then the same command from another folder with a fresh
        HOME and TMPDIR: requests sent twice, against what was in flight at the kill plus one journal segment.
        B: what shipping the journal costs: the overhead scenario's job (c256, 20 ms) with an s3:// output,
        its checkpoint in the bucket (shipped) against a local --checkpoint-dir (never shipped), alternated,
        best of each; requests/s start-up excluded; target ratio >= 0.95."""
        n, conc, segment = self.n(20_000), 256, 500  # remote_state.SHIP_ROWS, the default
        inp = self.table(n)
        with closing(Server(latency=0.02)) as srv, _moto() as (env, client):
            client.upload_file(str(inp), "bench", "in.parquet")
            machines = {}
            for who in ("a", "b"):
                home, tmp, folder = (self.tmp / "s3state" / who / d for d in ("home", "tmp", "cwd"))
                for d in (home, tmp, folder):
                    d.mkdir(parents=True)
                machines[who] = (
                    {**env, "HOME": str(home), "TMPDIR": str(tmp), "XDG_STATE_HOME": "", "PIPELINE_STATE_DIR": ""},
                    folder,
                )
            work = (
                self.tmp / "s3state" / "a" / "home" / ".local" / "state" / "pipeline" / "s3" / "bench" / "kill" / "out.checkpoint"
            )
            journal_lines, kill_at_half = _killer(work, n // 2)
            out = "s3://bench/kill/out.parquet"
            env_a, cwd_a = machines["a"]
            self.ours("s3://bench/in.parquet", srv.url, conc, out=out, tick=kill_at_half, expect=-signal.SIGKILL,
                      env=env_a, cwd=cwd_a)  # fmt: skip
            first, answered = srv.stats()["requests"], journal_lines()
            segments_at_kill = [_lines(client, k) for k in _keys(client, "kill/out.checkpoint/journal/")]
            shipped = sum(segments_at_kill)
            # One segment: what one shipment carried, SHIP_ROWS and those answered before the thread read the journal.
            segment = max([segment, *segments_at_kill])
            env_b, cwd_b = machines["b"]
            again = self.ours("s3://bench/in.parquet", srv.url, conc, out=out, env=env_b, cwd=cwd_b)
            total = srv.stats()["requests"]
            body = client.get_object(Bucket="bench", Key="kill/out.parquet")["Body"].read()
            ok = pl.read_parquet(body).filter(pl.col("status") == "ok").height
            if ok != n:
                raise BenchError(f"s3state: the output has {ok} ok rows, expected {n}")
            in_flight, unshipped = first - answered, answered - shipped
            twice = total - n
            # B: interleaved, best of each: the machine is shared and noisy.
            samples: dict[str, list[dict[str, float]]] = {"shipped": [], "local": []}
            for rep in range(1 if self.quick else 4):
                for who in ("shipped", "local"):
                    srv.reset()
                    extra = ["--checkpoint-dir", str(self.tmp / "s3state" / f"ck-{rep}")] if who == "local" else []
                    r = self.ours(inp, srv.url, conc, *extra, out=f"s3://bench/cost-{who}-{rep}/out.parquet", env=env_a)
                    s = r.summary()
                    segments = len(_keys(client, f"cost-{who}-{rep}/out.checkpoint/journal/"))
                    samples[who].append(dict(rows_per_s=s.get("rows_per_s", 0.0), wall_s=r.wall, cpu_s=r.cpu, segments=segments))
        best = {k: max(v, key=lambda x: x["rows_per_s"]) for k, v in samples.items()}
        ratio = best["shipped"]["rows_per_s"] / best["local"]["rows_per_s"] if best["local"]["rows_per_s"] else None
        # CPU per request moves far less than requests/s when others load the machine: the steadier figure.
        cpu = {k: sorted(x["cpu_s"] for x in v)[len(v) // 2] / n * 1e6 for k, v in samples.items()}
        scn = f"12 state in the bucket {n:,} rows s3:// to s3:// c{conc}"
        self.add(scn, "A: requests sent twice after SIGKILL at 50%", twice, in_flight + segment)
        self.add(scn, "A: in flight at the kill / answered, not shipped", in_flight, unshipped)
        self.add(scn, "A: largest journal segment, rows", segment)
        self.add(scn, "A: resume from a fresh disk, wall s", again.wall)
        self.add(scn, "B: requests/s, journal shipped / local", best["shipped"]["rows_per_s"], best["local"]["rows_per_s"])
        self.add(scn, "B: client CPU µs/request (median), shipped / local", cpu["shipped"], cpu["local"])
        self.add(scn, "B: journal segments shipped (best run)", best["shipped"]["segments"])
        targets = [  # nothing that was shipped is sent again: only what was in flight or not yet shipped
            self.target(
                "I19", "s3:// kill: sent twice - (in flight + not shipped), at most", twice - in_flight - unshipped, hi=0
            ),
            self.target("I19", "journal shipping: requests/s shipped / local, at least", ratio, lo=0.95),
        ]
        self.figures["s3state"] = dict(rows=n, concurrency=conc, segment_rows=segment, first_run_requests=first,
                                       answered_at_kill=answered, shipped_at_kill=shipped, in_flight=in_flight,
                                       sent_twice=twice, resume=again.summary(), cost=samples, ratio=ratio, cpu_us=cpu,
                                       targets=targets)  # fmt: skip

    # ---- issue 21: the reader keeps the cells as written ---------------------------------------------

    def reader(self) -> None:
        """A CSV read as a run reads it (open: the types settled where no text changes, the rows counted,
        every line parsed; then every batch) against the least any reader does: polars streaming the file
        as text. Both in child processes, alternated, best of each."""
        n = self.n(1_000_000)
        path = self.tmp / f"in-{n}.csv"
        ids = pl.int_range(0, n, dtype=pl.Int64, eager=True).alias("id")
        pl.DataFrame(ids).with_columns(
            text=pl.format("item {} arrived on time and works", "id"),
            score=pl.col("id").cast(pl.Float64) / 7,
            sku=pl.format("{}", pl.col("id") % 10_000).str.zfill(6),  # leading zeros: text, as written
        ).write_csv(path)
        ours = (
            "import sys\nfrom pipeline.tables import source\n"
            "t = source.open_table((sys.argv[1],))\nrows = source.count_rows(t)\n"
            "seen = sum(b.height for b in source.batches(t, 5000))\nassert rows == seen == int(sys.argv[2]), (rows, seen)\n"
            "assert str(t.schema['sku']) == 'String' and str(t.schema['id']) == 'Int64', t.schema\n"
        )
        base = (
            "import sys, polars as pl\n"
            "seen = sum(b.height for b in pl.scan_csv(sys.argv[1], infer_schema=False).collect_batches(chunk_size=5000, "
            "maintain_order=True))\nassert seen == int(sys.argv[2]), seen\n"
        )
        runs: dict[str, list[Run]] = {"ours": [], "base": []}
        for _ in range(1 if self.quick else 3):
            for who, script in (("base", base), ("ours", ours)):
                r = run_child([sys.executable, "-c", script, str(path), str(n)], timeout=self.timeout)
                if r.rc != 0:
                    raise BenchError(f"reading the CSV ({who}) exited {r.rc}: {r.stderr.strip()[-800:]}")
                runs[who].append(r)
        o, b = min(runs["ours"], key=lambda r: r.wall), min(runs["base"], key=lambda r: r.wall)
        scn = f"13 reader, {n:,}-row CSV"
        self.add(scn, "wall s, open + count + every batch / polars as text", o.wall, b.wall)
        self.add(scn, "peak RSS MB", o.rss_mb, b.rss_mb)
        self.figures["reader"] = dict(rows=n, bytes=path.stat().st_size, walls={k: [r.wall for r in v] for k, v in runs.items()},
                                      rss={k: [r.rss_mb for r in v] for k, v in runs.items()})  # fmt: skip

    # ---- issues 13 and 22: the Ray engine ---------------------------------------------------------------

    def ray(self) -> None:
        """Scenario 11 (bench/raybench.py): the Ray engine's bars against the local engine, side by side
        with Ray Data LLM on a two-node cluster, SIGKILL of the driver, memory."""
        import raybench  # beside this file

        raybench.scenario(self, sys.modules[__name__])

    def images(self) -> None:
        """Scenario 14 (bench/imagebench.py): a 50 kB image a row, 2,000 and 10,000 rows: memory flat in
        rows, requests/s and CPU against text-only rows of the same prompts."""
        import imagebench  # beside this file

        imagebench.scenario(self, sys.modules[__name__])

    # ---- issue 8: the client learns the server's limits --------------------------------------------

    def target(
        self,
        tid: str,
        what: str,
        value: float | None,
        *,
        lo: float | None = None,
        hi: float | None = None,
        span: Span | None = None,
    ) -> dict[str, Any]:
        """One target of issue 8 as a figure: PASS when lo <= value <= hi.  Never raises: a miss is reported."""
        passed = value is not None and (lo is None or value >= lo) and (hi is None or value <= hi)
        notes = ["steady span empty: whole run"] if span and span.whole_run else []
        return dict(id=tid, what=what, value=value, target=target_text(lo, hi), passed=passed, notes=notes)

    def metric(
        self, fig: dict[str, Any], scn: str, tid: str, what: str, value: float | None, *,
        lo: float | None = None, hi: float | None = None, span: Span | None = None,
    ) -> None:  # fmt: skip
        """A table row "tid what (target ...)" and, when there is a bound, a target in fig["targets"]."""
        shown = f"{tid} {what}" + (f" (target {target_text(lo, hi)})" if lo is not None or hi is not None else "")
        self.add(scn, shown + (" [whole run]" if span and span.whole_run else ""), value)
        if lo is not None or hi is not None:
            fig["targets"].append(self.target(tid, what, value, lo=lo, hi=hi, span=span))

    def adapt(self) -> None:
        """Issue 8's targets for a client that learns limits (../shared/research/rate-control.md, section 4).

        Each sub-case runs against a fresh fake server; every figure is measured at the server
        from GET /timeline (answers per whole second since its first chat request).  The client
        is given no --rpm and --concurrency 64 unless stated.  Steady span: whole seconds from
        10 s to the last second with an ok answer, that last (partial) second left out; rates are
        ok answers in it per minute; "429s after 10 s" count to the end of the run.  A --quick run
        ends before 10 s: spans then fall back to the whole run, marked "[whole run]".  A sub-case
        whose run fails is recorded in figures["adapt"]["failed"] and the others still run."""
        fig: dict[str, Any] = self.figures.setdefault("adapt", {})
        fig.update(targets=[], failed={})
        cases: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
            ("R1", self._adapt_r1), ("R2", self._adapt_r2), ("R3", self._adapt_r3), ("R4", self._adapt_r4),
            ("R5", self._adapt_r5), ("R6", self._adapt_r6), ("R7", self._adapt_r7), ("R8", self._adapt_r8),
        ]  # fmt: skip
        for tid, case in cases:
            t = time.monotonic()
            print(f"bench: adapt {tid}...", file=sys.stderr, flush=True)
            try:
                case(fig)
            except BenchError as exc:
                fig["failed"][tid] = str(exc)
                print(f"bench: adapt {tid} FAILED: {exc}", file=sys.stderr, flush=True)
            fig.setdefault(tid, {})["case_s"] = time.monotonic() - t
        if fig["failed"]:
            raise BenchError("; ".join(f"{k}: {v}" for k, v in fig["failed"].items()))

    @staticmethod
    def _record(r: Run, tl: Timeline, st: dict[str, int], span: Span, **more: Any) -> dict[str, Any]:
        """What one run leaves in the figures: enough to recompute every metric."""
        return dict(span=[span.lo, span.hi], span_whole_run=span.whole_run, wall_s=r.wall, cpu_s=r.cpu,
                    summary=r.summary(), server=st, timeline=tl.compact(), **more)  # fmt: skip

    def _header_rate(self, fig: dict[str, Any], tid: str, rpm: int, latency: float, rows: int, conc: int) -> None:
        """R1 / R2: the limit enforced per wall-clock second, announced in OpenAI headers."""
        n = self.n(rows)
        with closing(Server(latency=latency, rpm=rpm, window="second")) as srv:
            r = self.ours(self.table(n), srv.url, conc)
            tl, st = srv.timeline(), srv.stats()
        span = tl.span(10)
        scn = f"6 adapt {tid} {n:,} rows, {rpm:,}/min per s, headers, c{conc}"
        self.metric(fig, scn, tid, f"steady share of {rpm:,}/min", tl.per_min(span) / rpm, lo=0.95, span=span)
        self.metric(fig, scn, tid, "429s after 10 s", tl.count("429", span.lo), hi=0, span=span)
        self.metric(fig, scn, tid, "429s in total", st["status_429"], hi=conc)
        if tid == "R1":  # R10: what the summary says it learned
            pace = r.summary().get("pace_rpm")
            self.metric(fig, scn, "R10", "learned pace requests/min in the summary", pace, lo=rpm * 0.98, hi=rpm * 1.02)
        fig[tid] = self._record(r, tl, st, span, rows=n, rpm=rpm, latency_s=latency, concurrency=conc)

    def _adapt_r1(self, fig: dict[str, Any]) -> None:
        """R1: 6,000/min per second with OpenAI headers, 3,000 rows: >= 95% of the limit in the
        steady span, 0 429s after 10 s, <= 64 in total.  R10: the summary's learned pace within
        2% of 6,000."""
        self._header_rate(fig, "R1", 6_000, 0.03, 3_000, 64)

    def _adapt_r2(self, fig: dict[str, Any]) -> None:
        """R2 (R1 at a low rate): 300/min per second with headers, 200 ms latency, 300 rows,
        --concurrency 16: >= 95% in the steady span, 0 429s after 10 s, <= 16 in total."""
        self._header_rate(fig, "R2", 300, 0.2, 300, 16)

    def _adapt_r3(self, fig: dict[str, Any]) -> None:
        """R3: R1's server without rate-limit headers (429 + Retry-After only), 4,000 rows:
        >= 85% of the limit, 429 share <= 3% in the steady span."""
        n, rpm = self.n(4_000), 6_000
        with closing(Server(latency=0.03, rpm=rpm, window="second", rate_headers="none")) as srv:
            r = self.ours(self.table(n), srv.url, 64)
            tl, st = srv.timeline(), srv.stats()
        span = tl.span(10)
        scn = f"6 adapt R3 {n:,} rows, {rpm:,}/min per s, no headers, c64"
        self.metric(fig, scn, "R3", f"steady share of {rpm:,}/min", tl.per_min(span) / rpm, lo=0.85, span=span)
        self.metric(fig, scn, "R3", "429 share after 10 s", tl.share_429(span.lo), hi=0.03, span=span)
        self.metric(fig, scn, "R3", "429s in total", st["status_429"])
        fig["R3"] = self._record(r, tl, st, span, rows=n, rpm=rpm, latency_s=0.03, concurrency=64)

    def _adapt_r4(self, fig: dict[str, Any]) -> None:
        """R4: ModelsLab with 10 requests in flight allowed, 200 ms latency, no headers, 1,500
        rows.  --concurrency 64 (adaptive) reaches >= 90% of the throughput of --concurrency 10
        --no-adapt on the same server, with <= 1% of answers 429 after 10 s when the 429 names N
        ("Maximum 10 queued requests allowed.") and <= 2% when it does not (generic message).
        R10: the final concurrency in the summary is 9 or 10 (named)."""
        n, cap = self.n(1_500), 10
        inp, env = self.table(n), {"MODELSLAB_API_KEY": "bench-key-0000"}
        ml = ("--provider", "modelslab")
        for message, most in (("named", 0.01), ("generic", 0.02)):
            with closing(Server(latency=0.2, max_in_flight=cap, in_flight_message=message)) as srv:
                r = self.ours(inp, srv.url, 64, *ml, path="/api/v7/llm", env=env)
                tl, st = srv.timeline(), srv.stats()
                srv.reset()
                ref = self.ours(inp, srv.url, cap, *ml, "--no-adapt", path="/api/v7/llm", env=env)
                ref_tl, ref_st = srv.timeline(), srv.stats()
            span, ref_span = tl.span(10), ref_tl.span(10)
            ok_s, ref_ok_s = tl.per_min(span) / 60, ref_tl.per_min(ref_span) / 60
            whole = span if span.whole_run else ref_span
            scn = f"6 adapt R4 {n:,} rows, ModelsLab {cap} in flight, 429 {message}, c64"
            self.metric(
                fig,
                scn,
                "R4",
                f"throughput adaptive / --concurrency {cap} --no-adapt",
                ok_s / ref_ok_s if ref_ok_s else None,
                lo=0.9,
                span=whole,
            )
            self.metric(fig, scn, "R4", "429 share after 10 s", tl.share_429(span.lo), hi=most, span=span)
            self.metric(fig, scn, "R4", "429s in total, adaptive run", st["status_429"])
            conc = r.summary().get("concurrency")
            if message == "named":
                self.metric(fig, scn, "R10", "final concurrency in the summary", conc, lo=cap - 1, hi=cap)
            else:
                self.metric(fig, scn, "R4", "final concurrency in the summary", conc)
            ref_fig = dict(wall_s=ref.wall, summary=ref.summary(), server=ref_st, timeline=ref_tl.compact(),
                           span=[ref_span.lo, ref_span.hi], ok_per_s=ref_ok_s)  # fmt: skip
            fig[f"R4_{message}"] = self._record(r, tl, st, span, rows=n, ok_per_s=ok_s, reference=ref_fig)

    def _adapt_r5(self, fig: dict[str, Any]) -> None:
        """R5: a vLLM-like server, 32 slots and a FIFO queue (no 429), 100 ms service time, 6,000
        rows.  --concurrency 256 (adaptive) reaches >= 90% of the throughput of --concurrency 32
        --no-adapt on the same server, with a mean queue wait <= 1.5x the service time."""
        n, slots, service = self.n(6_000), 32, 0.1
        inp = self.table(n)
        with closing(Server(latency=service, slots=slots)) as srv:
            r = self.ours(inp, srv.url, 256)
            tl, st = srv.timeline(), srv.stats()
            srv.reset()
            ref = self.ours(inp, srv.url, slots, "--no-adapt")
            ref_tl, ref_st = srv.timeline(), srv.stats()
        span, ref_span = tl.span(10), ref_tl.span(10)
        ok_s, ref_ok_s = tl.per_min(span) / 60, ref_tl.per_min(ref_span) / 60
        wait_s = st["queue_wait_ms_total"] / 1000 / max(st["slot_served"], 1)
        scn = f"6 adapt R5 {n:,} rows, {slots} slots + queue, {service * 1000:.0f} ms, c256"
        whole = span if span.whole_run else ref_span
        self.metric(
            fig,
            scn,
            "R5",
            f"throughput adaptive / --concurrency {slots} --no-adapt",
            ok_s / ref_ok_s if ref_ok_s else None,
            lo=0.9,
            span=whole,
        )
        self.metric(fig, scn, "R5", "mean queue wait / service time", wait_s / service, hi=1.5)
        self.metric(fig, scn, "R5", "most requests queued at once", st["max_queue_seen"])
        ref_fig = dict(wall_s=ref.wall, summary=ref.summary(), server=ref_st, timeline=ref_tl.compact(),
                       span=[ref_span.lo, ref_span.hi], ok_per_s=ref_ok_s)  # fmt: skip
        fig["R5"] = self._record(r, tl, st, span, rows=n, ok_per_s=ok_s, mean_queue_wait_s=wait_s, reference=ref_fig)

    def _adapt_r6(self, fig: dict[str, Any]) -> None:
        """R6: R1's server whose limit halves at 15 s and is restored at 35 s, about 4,500 rows:
        <= 30 429s in the 5 s after the drop, none from 20 s on; >= 90% of 3,000/min over
        [20, 35) s and of 6,000/min from 45 s (10 s after the rise) to the end."""
        n, schedule = self.n(4_500), "0:6000,15:3000,35:6000"
        with closing(Server(latency=0.03, rpm=6_000, window="second", limit_schedule=schedule)) as srv:
            r = self.ours(self.table(n), srv.url, 64)
            tl, st = srv.timeline(), srv.stats()
        low, high = tl.span(20, 35), tl.span(45)
        scn = f"6 adapt R6 {n:,} rows, 6,000 -> 3,000 (15 s) -> 6,000/min (35 s), c64"
        self.metric(fig, scn, "R6", "429s in [15, 20) s", tl.count("429", 15, 20), hi=30)
        self.metric(fig, scn, "R6", "429s from 20 s on", tl.count("429", 20), hi=0)
        self.metric(fig, scn, "R6", "share of 3,000/min over [20, 35) s", tl.per_min(low) / 3_000, lo=0.9, span=low)
        self.metric(fig, scn, "R6", "share of 6,000/min from 45 s", tl.per_min(high) / 6_000, lo=0.9, span=high)
        fig["R6"] = self._record(r, tl, st, high, rows=n, schedule=schedule, low_span=[low.lo, low.hi],
                                 low_span_whole_run=low.whole_run)  # fmt: skip

    def _adapt_r7(self, fig: dict[str, Any]) -> None:
        """R7: two `pipeline run` at once on R1's server (one key, one client core), 3,000 rows
        each, models fake-a and fake-b so the server tells them apart.  Over the span where both
        run (10 s to the first one's last ok second): together >= 90% of the limit, <= 2% of
        answers 429, each >= 35% of the limit."""
        n, rpm, models = self.n(3_000), 6_000, ("fake-a", "fake-b")
        first = self.table(n)
        second = first.with_name(f"{first.stem}-copy.parquet")  # each run its own input and output
        shutil.copyfile(first, second)
        with closing(Server(latency=0.03, rpm=rpm, window="second")) as srv:
            cmds = [self.ours_cmd(inp, srv.url, 64, model=m) for inp, m in zip((first, second), models, strict=True)]
            runs = run_together(cmds, timeout=self.timeout)
            tl, st = srv.timeline(), srv.stats()
        second.unlink()
        for m, r in zip(models, runs, strict=True):
            if r.rc != 0:
                raise BenchError(f"pipeline run --model {m} exited {r.rc}, expected 0: {r.stderr.strip()[-800:]}")
        span = tl.span(10, min(tl.last_ok(m) for m in models))
        scn = f"6 adapt R7 2 x {n:,} rows at once, {rpm:,}/min per s, headers, c64 each"
        self.metric(fig, scn, "R7", f"combined share of {rpm:,}/min", tl.per_min(span) / rpm, lo=0.9, span=span)
        self.metric(fig, scn, "R7", "429 share", tl.share_429(span.lo, span.hi), hi=0.02, span=span)
        for m in models:
            self.metric(fig, scn, "R7", f"{m} share of {rpm:,}/min", tl.per_min(span, model=m) / rpm, lo=0.35, span=span)
        fig["R7"] = dict(rows_each=n, rpm=rpm, span=[span.lo, span.hi], span_whole_run=span.whole_run, server=st,
                         timeline=tl.compact(), runs={m: dict(wall_s=r.wall, cpu_s=r.cpu, summary=r.summary())
                                                      for m, r in zip(models, runs, strict=True)})  # fmt: skip

    def _adapt_r8(self, fig: dict[str, Any]) -> None:
        """R8: --rpm 3000 against R1's 6,000/min server, 3,000 rows: the user's cap is a ceiling:
        no 10 s window above 3,000/min, >= 97% of it over the steady span, 0 429s."""
        n, cap = self.n(3_000), 3_000
        with closing(Server(latency=0.03, rpm=6_000, window="second")) as srv:
            r = self.ours(self.table(n), srv.url, 64, "--rpm", str(cap))
            tl, st = srv.timeline(), srv.stats()
        span = tl.span(10)
        peak, width = tl.max_window_per_min(10)
        scn = f"6 adapt R8 {n:,} rows, --rpm {cap:,} on 6,000/min, c64"
        narrow = f" [only {width} s of run]" if width < 10 else ""
        self.metric(fig, scn, "R8", f"highest 10 s window / {cap:,}/min{narrow}", peak / cap, hi=1.0)
        self.metric(fig, scn, "R8", f"steady share of {cap:,}/min", tl.per_min(span) / cap, lo=0.97, span=span)
        self.metric(fig, scn, "R8", "429s in total", st["status_429"], hi=0)
        fig["R8"] = self._record(r, tl, st, span, rows=n, rpm_flag=cap, peak_10s_per_min=peak, peak_window_s=width)

    def targets(self) -> list[dict[str, Any]]:
        """Every target computed from the figures of the scenarios that ran, in scenario order.
        R9's "--rpm 6000 still 98% with no 429s" and "10% 5xx still <= 1.3x" are read from the
        ratelimit and faults scenarios' figures; the overhead and adapt scenarios keep their own."""
        out: list[dict[str, Any]] = []
        for name in SCENARIOS:
            f = self.figures.get(name, {})
            out += f.get("targets", [])
            if name == "ratelimit":
                for window in ("second", "minute"):
                    if w := f.get(window):
                        what = f"--rpm 6000, server per {window}"
                        out.append(self.target("R9", f"{what}: achieved rate / limit", w["share_of_limit"], lo=0.98))
                        out.append(self.target("R9", f"{what}: 429s", w["server"]["status_429"], hi=0))
            if name == "faults" and "0.1" in f.get("runs", {}):
                ratio = f["runs"]["0.1"]["wall_s"] / f["runs"]["0.0"]["wall_s"]
                out.append(self.target("R9", "10% 5xx: wall with / without faults", ratio, hi=1.3))
        return out


def _killer(ckpt: Path, at: int) -> tuple[Callable[[], int], Callable[[subprocess.Popen[bytes]], None]]:
    """Answers in the checkpoint's journals, and a tick for run_child that SIGKILLs the run once there are `at`."""

    def journal_lines() -> int:
        return sum(p.read_bytes().count(b"\n") for p in ckpt.glob("journal-*.jsonl"))

    def kill(proc: subprocess.Popen[bytes]) -> None:
        if journal_lines() >= at:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: `pipeline` itself, not only its GNU time wrapper

    return journal_lines, kill


@contextlib.contextmanager
def _moto() -> Iterator[tuple[dict[str, str], Any]]:
    """moto's S3 server in its own process on the server core, a bucket `bench`, the environment to reach
    it, and a boto3 client for setting up and reading back."""
    import boto3  # moto's server and this client come with the dev tools

    from pipeline.providers.local_model import free_port

    port = free_port()
    moto = subprocess.Popen(pinned(SERVER_CORE, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    LIVE.add(moto)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("moto's server did not start") from None
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")  # fmt: skip
        client.create_bucket(Bucket="bench")
        yield env, client
    finally:
        with suppress(ProcessLookupError):
            os.killpg(moto.pid, signal.SIGKILL)
        moto.wait()
        LIVE.discard(moto)


def _keys(client: Any, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _lines(client: Any, key: str) -> int:
    return int(client.get_object(Bucket="bench", Key=key)["Body"].read().count(b"\n"))


def target_text(lo: float | None, hi: float | None) -> str:
    def num(v: float) -> str:
        return f"{v:,g}"

    if lo is not None and hi is not None:
        return num(lo) if lo == hi else f"{num(lo)} to {num(hi)}"
    if hi is not None:
        return "0" if hi == 0 else f"<= {num(hi)}"
    return f">= {num(lo)}" if lo is not None else "none"


def print_targets(targets: list[dict[str, Any]], quick: bool) -> None:
    """PASS/MISS per target of issue 8, figure beside its bound: the list to quote."""
    if not targets:
        return
    print("\ntargets (--quick: sizes 10x smaller, figures not meaningful):" if quick else "\ntargets:")
    for t in targets:
        v = t["value"]
        shown = "-" if v is None else f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"
        notes = f"  ({'; '.join(t['notes'])})" if t["notes"] else ""
        print(f"  {'PASS' if t['passed'] else 'MISS'}  {t['id']:<4} {t['what']}: {shown} (target {t['target']}){notes}")


def print_table(rows: list[Row]) -> None:
    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    cells = [("scenario", "metric", "ours", "baseline", "ours/base")] + [(s, m, fmt(o), fmt(b), fmt(r)) for s, m, o, b, r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    for i, c in enumerate(cells):
        shown = ("" if i > 1 and c[0] == cells[i - 1][0] else c[0], *c[1:])  # a scenario's name once per group
        print("  ".join(x.ljust(w) if j < 2 else x.rjust(w) for j, (x, w) in enumerate(zip(shown, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def machine() -> dict[str, Any]:
    cpus = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # read-only
    return dict(nproc=os.cpu_count(), usable_cores=CORES, cpu=cpus[0] if cpus else "?", python=platform.python_version(),
                platform=platform.platform(), date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                polars=pl.__version__, git_head=git, pinned=bool(TASKSET), load_avg_start=os.getloadavg())  # fmt: skip


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a CI timeout) unwinds through the same cleanup as Ctrl-C


def main() -> int:
    p = argparse.ArgumentParser(description="Benchmark `pipeline run` against a minimal baseline client.")
    p.add_argument("--quick", action="store_true", help="10x smaller sizes: a smoke run")
    p.add_argument("--only", choices=SCENARIOS, help="run one scenario")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's `cmd &` starts it ignored
        signal.signal(sig, _interrupt)
    started, info, failed = time.monotonic(), machine(), dict[str, str]()
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    bench = Bench(tmp, args.quick)
    try:
        for name in [args.only] if args.only else SCENARIOS:
            t = time.monotonic()
            print(f"bench: {name}...", file=sys.stderr, flush=True)
            try:
                getattr(bench, name)()
            except BenchError as exc:
                failed[name] = str(exc)
                print(f"bench: {name} FAILED: {exc}", file=sys.stderr, flush=True)
            bench.figures.setdefault(name, {})["scenario_s"] = time.monotonic() - t
    except KeyboardInterrupt:
        print("bench: interrupted; children stopped, temp files removed", file=sys.stderr)
        return 130
    finally:
        for proc in list(LIVE):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: a GNU time wrapper's child too
            with suppress(ChildProcessError, subprocess.TimeoutExpired):
                proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - started
    print_table(bench.rows)
    where = f"clients on core {CLIENT_CORE}, server on core {SERVER_CORE}" if TASKSET else "not pinned (no taskset or 1 core)"
    print(f"\ntotal {total:.0f} s{' (--quick)' if args.quick else ''}; {where}; progress bar off (stderr is not a terminal)")
    if "memory" in bench.figures:
        print(f"memory: {bench.figures['memory'].get('note', '')}")
    targets = bench.targets()
    print_targets(targets, args.quick)
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    info["load_avg_end"] = os.getloadavg()
    table = [dict(zip(("scenario", "metric", "ours", "baseline", "ratio"), r, strict=True)) for r in bench.rows]
    result = dict(machine=info, quick=args.quick, total_s=total, failed=failed, scenarios=bench.figures, table=table,
                  targets=targets)  # fmt: skip
    out = ROOT / "bench" / "results" / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"figures: {out.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
