"""`make bench`: throughput, rate-limit adherence, memory, resume and fault cost of `pipeline run`.

Every scenario runs `pipeline run` as a child process against tests/fakeserver.py (its own
process, pinned to one core) and, in the same run, bench/baseline.py, the least any client
must do.  Clients are pinned to another core so their CPU is measured apart from the server's;
wall is from spawn to exit, CPU from wait4() on the child, peak RSS from GNU time.

    python bench/run.py [--quick] [--only overhead|ratelimit|memory|resume|faults]

Prints a table and writes every figure plus machine info to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from contextlib import closing, suppress
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
SCENARIOS = ("overhead", "ratelimit", "memory", "resume", "faults")
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

    def summary(self) -> dict[str, float]:
        """Figures from `pipeline run`'s closing summary on stderr (its wall excludes start-up)."""
        out: dict[str, float] = {}
        if m := re.search(r"(\d+) rows in ([\d.]+) s: (\d+) ok, (\d+) error \((\d+) ok from the checkpoint", self.stderr):
            out.update(rows=int(m[1]), wall=float(m[2]), ok=int(m[3]), errors=int(m[4]), from_checkpoint=int(m[5]))
        if m := re.search(r"requests: (\d+) sent for (\d+) rows \((\d+) retries\), ([\d.]+) rows/s", self.stderr):
            out.update(requests=int(m[1]), retries=int(m[3]), rows_per_s=float(m[4]))
        return out


def run_child(cmd: list[str], *, timeout: float, tick: Callable[[subprocess.Popen[bytes]], None] | None = None) -> Run:
    """Run `cmd` on the client core; `tick(proc)` is called about every 10 ms while it runs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as tv:
        full = pinned(CLIENT_CORE, cmd)
        if GNU_TIME:
            # Not wait4's ru_maxrss: a child spawned from here inherits this harness's own peak RSS as
            # its starting maxrss; GNU time forks the command from its own tiny image.
            full = [GNU_TIME, "-f", "%M", "-o", tv.name, *full]
        started = time.monotonic()
        # Own process group: killpg() then ends GNU time and the command together.
        proc = subprocess.Popen(full, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
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


class Server:
    """tests/fakeserver.py in its own process on the server core, so its CPU never counts as the client's."""

    def __init__(self, *, latency: float = 0.0, rpm: int | None = None, window: str = "minute", fault_rate: float = 0.0) -> None:
        cmd = [sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--port", "0", "--latency", str(latency), "--no-record"]
        cmd += ["--rpm", str(rpm), "--rate-window", window] if rpm else []
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

    def _http(self, method: str, path: str) -> dict[str, int]:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, method=method), timeout=10) as r:
            return dict(json.load(r))

    def stats(self) -> dict[str, int]:
        return self._http("GET", "/stats")

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

    def ours(self, inp: Path, url: str, conc: int, *extra: str, out: Path | None = None, expect: int = 0, **kw: Any) -> Run:
        self._runs += 1
        out = out or self.tmp / f"out-{self._runs}" / "out.parquet"
        exe = Path(sys.executable).with_name("pipeline")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline"]
        cmd += ["run", "--input", str(inp), "--output", str(out), "--prompt", PROMPT, "--base-url", url + "/v1"]
        r = run_child([*cmd, "--model", "fake-model", "--concurrency", str(conc), *extra], timeout=self.timeout, **kw)
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
        n, conc, reps = self.n(20_000), 256, 1 if self.quick else 2
        inp = self.table(n)
        samples: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
        with closing(Server(latency=0.02)) as srv:
            for _ in range(reps):  # alternated, best of each kept: the machine is shared and noisy
                for who in ("baseline", "ours"):
                    srv.reset()
                    cpu0 = srv.cpu()
                    if who == "ours":
                        r = self.ours(inp, srv.url, conc)
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
        self.figures["overhead"] = dict(requests=n, concurrency=conc, latency_s=0.02, samples=samples, best=best)

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
        ckpt = out.with_name("out.checkpoint")

        def journal_lines() -> int:
            return sum(p.read_bytes().count(b"\n") for p in ckpt.glob("journal-*.jsonl"))

        def kill_at_half(proc: subprocess.Popen[bytes]) -> None:
            if journal_lines() >= n // 2:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: `pipeline` itself, not only its GNU time wrapper

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
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    info["load_avg_end"] = os.getloadavg()
    table = [dict(zip(("scenario", "metric", "ours", "baseline", "ratio"), r, strict=True)) for r in bench.rows]
    result = dict(machine=info, quick=args.quick, total_s=total, failed=failed, scenarios=bench.figures, table=table)
    out = ROOT / "bench" / "results" / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"figures: {out.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
