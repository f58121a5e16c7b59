"""`bench/run.py --only ray` (scenario 11): the Ray engine against the local engine, issue 22's bars.

Every client runs on the client core, the fake server on the other, as in every scenario of run.py.

1. Bar B1, every actor busy: `--engine ray --workers 2` with default settings against the local engine
   on a latency-bound server (200 ms a reply, 64 in flight, --no-adapt), for a job of a few thousand
   rows and a large one, alternated; answers a second at the server over its steady span (from its
   first second to its last whole one: the engines' pace, Ray's start apart), target >= 0.9. Spawn to
   exit is reported beside it (a Ray started by the run: tens of seconds of process starts on one core).
2. Bar B2, the shared budget: 4 actors against a server enforcing 6,000/min per wall-clock second, with
   --rpm 6000 and with the limit learned from its headers; share of the limit from 5 s after the first
   request, target >= 0.97 with no 429s (with --rpm).
3. Side by side on a two-node `ray.cluster_utils.Cluster` (2 CPUs each, made on the client core):
   the local engine, `--engine ray` at 1, 2 and 4 workers joining it, and Ray Data LLM's HTTP request
   processor (bench/ray_data_llm.py) on the same server, 64 in flight each; answers a second over the
   steady span, and CPU per request of the whole client (the run's process tree, plus the cluster's
   processes' CPU over the run) against the local engine's.
4. SIGKILL of the driver at 50%, then the same command: requests sent twice (at most those in flight).
5. Peak RSS of the driver and the largest actor in a streaming pass of 100,000 and 1,000,000 rows,
   to a file and to a folder of parts (where the actors write the output, not the driver).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

RAY_2 = ("--engine", "ray", "--workers", "2")


class TreeCPU:
    """CPU seconds of the processes under `root` over a span, sampled: a Ray cluster's processes, its
    actors included, which die at a run's end without a parent that waits for them (their CPU would
    never show in anyone's cutime). Each process counts what it used since the span began, up to its
    last sample (taken every SAMPLE_EVERY while the run goes)."""

    SAMPLE_EVERY = 0.25

    def __init__(self, root: int, skip: set[int]) -> None:
        self.root, self.skip = root, skip
        self.start = self._snapshot()
        self.last = dict(self.start)
        self._at = 0.0

    def _snapshot(self, also: frozenset[int] = frozenset()) -> dict[tuple[int, int], float]:
        parents: dict[int, int] = {}
        own: dict[int, tuple[int, float]] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            own[pid] = (int(fields[19]), (int(fields[11]) + int(fields[12])) / tick)  # starttime; utime + stime
        out = {}
        skip = self.skip | also
        for pid, (started, cpu) in own.items():
            p, chain = pid, []
            while p in parents and p != self.root and p > 1:
                chain.append(p)
                p = parents[p]
            if p == self.root and chain and not skip.intersection(chain):
                out[(pid, started)] = cpu
        return out

    def sample(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """A tick for run_child: the run's own process (measured by wait4) is left out."""
        if time.monotonic() - self._at < self.SAMPLE_EVERY:
            return
        self._at = time.monotonic()
        self.last.update(self._snapshot(frozenset({proc.pid}) if proc is not None else frozenset()))

    def total(self) -> float:
        self._at = 0.0
        self.sample()
        return sum(cpu - self.start.get(key, 0.0) for key, cpu in self.last.items())


def scenario(bench: Any, h: Any) -> None:
    """`bench` is run.py's Bench, `h` run.py itself (Server, run_child, pinned, cores, BenchError)."""
    try:
        import ray  # noqa: F401  # the extra: pip install -e '.[ray]'
    except ImportError:
        raise h.BenchError("ray is not installed (pip install -e '.[ray]')") from None
    fig: dict[str, Any] = bench.figures.setdefault("ray", {})
    fig["targets"] = []
    _busy(bench, h, fig)
    _budget(bench, h, fig)
    _cluster(bench, h, fig)
    _resume(bench, h, fig)
    _memory(bench, h, fig)


def _steady(tl: Any) -> float:
    return float(tl.per_min(tl.span(1)) / 60)


def _busy(bench: Any, h: Any, fig: dict[str, Any]) -> None:
    """B1: 2 actors, default settings, latency-bound: a few thousand rows and a large job."""
    out: dict[str, Any] = {}
    for n, reps in ((bench.n(4_000), 2), (bench.n(20_000), 1)):
        inp = bench.table(n)
        runs: dict[str, list[dict[str, Any]]] = {"local": [], "ray": []}
        with closing(h.Server(latency=0.2)) as srv:
            for _ in range(reps):
                for who, extra in (("local", ()), ("ray", RAY_2)):
                    srv.reset()
                    load = os.getloadavg()[0]
                    r = bench.ours(inp, srv.url, 64, "--no-adapt", "--no-report", *extra)
                    tl = srv.timeline()
                    runs[who].append(dict(steady=_steady(tl), wall_s=r.wall, cpu_s=r.cpu, load_before=load,
                                          timeline=tl.compact(), summary=r.summary()))  # fmt: skip
        best = {who: max(rs, key=lambda x: x["steady"]) for who, rs in runs.items()}
        scn = f"11 ray B1 {n:,} rows, 200 ms, c64 --no-adapt, 2 actors"
        bench.metric(
            fig, scn, "B1", f"{n:,} rows: steady answers/s, ray / local", best["ray"]["steady"] / best["local"]["steady"], lo=0.9
        )
        bench.add(scn, "steady answers/s at the server, ray / local", best["ray"]["steady"], best["local"]["steady"])
        bench.add(scn, "requests/s spawn to exit, ray / local", n / best["ray"]["wall_s"], n / best["local"]["wall_s"])
        out[str(n)] = runs
    fig["busy"] = out


def _budget(bench: Any, h: Any, fig: dict[str, Any]) -> None:
    """B2: 4 actors against 6,000/min enforced per wall-clock second."""
    n = bench.n(6_000)
    for how, extra in (("--rpm 6000", ("--rpm", "6000")), ("learned from headers", ())):
        with closing(h.Server(rpm=6000, window="second")) as srv:
            r = bench.ours(bench.table(n), srv.url, 64, "--engine", "ray", "--workers", "4", "--no-report", *extra)
            tl, st = srv.timeline(), srv.stats()
        span = tl.span(5)
        scn = f"11 ray B2 budget, 4 actors, {n:,} rows, 6,000/min per s, {how}"
        bench.metric(fig, scn, "B2", f"{how}: share of 6,000/min from 5 s", tl.per_min(span) / 6000, lo=0.97, span=span)
        bench.metric(fig, scn, "B2", f"{how}: 429s", st.get("429", st.get("status_429", 0)), hi=0 if extra else None)
        fig[how] = bench._record(r, tl, st, span)


def _cluster(bench: Any, h: Any, fig: dict[str, Any]) -> None:
    """The local engine, --engine ray at 1, 2 and 4 workers and Ray Data LLM on one two-node cluster."""
    import ray.cluster_utils

    n = bench.n(4_000)
    inp = bench.table(n)
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {h.CLIENT_CORE})  # the cluster's processes start (and stay) on the client core
    try:
        cluster = ray.cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        cluster.add_node(num_cpus=2)
    finally:
        os.sched_setaffinity(0, mine)
    results: dict[str, dict[str, Any]] = {}
    try:
        with closing(h.Server(latency=0.2)) as srv:
            skip = {srv.proc.pid}
            cases: list[tuple[str, list[str] | None]] = [("local", []), *((f"ray {w}", ["--engine", "ray", "--workers", str(w),
                     "--ray-address", cluster.address]) for w in (1, 2, 4)), ("ray data llm", None)]  # fmt: skip
            for who, extra in cases:
                srv.reset()
                meter, load = TreeCPU(os.getpid(), skip), os.getloadavg()[0]
                if extra is None:
                    r = h.run_child([sys.executable, str(h.ROOT / "bench" / "ray_data_llm.py"), "--address", cluster.address,
                                     "--url", f"{srv.url}/v1/chat/completions", "--input", str(inp), "--actors", "2",
                                     "--batch-size", "16", "--batches-per-actor", "32"], timeout=bench.timeout,
                                    tick=meter.sample)  # fmt: skip
                    if r.rc != 0:
                        raise h.BenchError(f"ray data llm exited {r.rc}: {r.stderr.strip()[-800:]}")
                else:
                    r = bench.ours(inp, srv.url, 64, "--no-adapt", "--no-report", *extra, tick=meter.sample)
                cluster_cpu = meter.total()
                tl = srv.timeline()
                results[who] = dict(steady=_steady(tl), wall_s=r.wall, cpu_s=r.cpu + cluster_cpu, driver_cpu_s=r.cpu,
                                    cluster_cpu_s=cluster_cpu, requests=srv.stats()["requests"], load_before=load,
                                    timeline=tl.compact())  # fmt: skip
    finally:
        cluster.shutdown()
    local = results["local"]
    scn = f"11 ray on a 2-node cluster, {n:,} rows, 200 ms, 64 in flight"
    for who, res in results.items():
        if who == "local":
            continue
        bench.add(scn, f"{who}: steady answers/s, / local", res["steady"], local["steady"])
        per, base = res["cpu_s"] / max(res["requests"], 1) * 1e3, local["cpu_s"] / max(local["requests"], 1) * 1e3
        bench.add(scn, f"{who}: client CPU ms/request, / local", per, base)
    fig["cluster"] = results


def _resume(bench: Any, h: Any, fig: dict[str, Any]) -> None:
    n, conc = bench.n(20_000), 64
    inp, out = bench.table(n), bench.tmp / "ray-resume" / "out.parquet"
    journal_lines, kill_at_half = h._killer(out.with_name("out.checkpoint"), n // 2)
    workers = ("--engine", "ray", "--workers", "4", "--no-report")
    with closing(h.Server(latency=0.02)) as srv:
        bench.ours(inp, srv.url, conc, *workers, out=out, tick=kill_at_half, expect=-signal.SIGKILL)
        time.sleep(3)  # what the actors still had in flight lands at the server, counted in the first run
        first, saved = srv.stats()["requests"], journal_lines()
        r = bench.ours(inp, srv.url, conc, *workers, out=out)
        total = srv.stats()["requests"]
    import polars as pl

    ok = pl.scan_parquet(out).filter(pl.col("status") == "ok").select(pl.len()).collect().item()
    if ok != n:
        raise h.BenchError(f"ray resume: the output has {ok} ok rows, expected {n}")
    scn = f"11 ray resume {n:,} req c{conc}, SIGKILL of the driver at 50%"
    bench.metric(fig, scn, "B3", "requests sent twice", total - n, hi=conc)
    bench.add(scn, "rows in the journals at the kill", saved)
    fig["resume"] = dict(requests=n, concurrency=conc, first_run_requests=first, journal_at_kill=saved,
                         total_requests=total, sent_twice=total - n, rerun=r.summary())  # fmt: skip


def _memory(bench: Any, h: Any, fig: dict[str, Any]) -> None:
    """Peak RSS of the driver and the largest actor: every text null, so every row streams through read,
    render, look-up, an actor and the output, and none is sent (the engine's memory, not the server's)."""
    sizes = [bench.n(100_000), bench.n(1_000_000)]
    peaks: dict[str, dict[str, float]] = {}
    for rows in sizes:
        for kind, out in (("file", None), ("folder", bench.tmp / f"parts-{rows}")):
            seen: dict[str, float] = {"driver": 0.0, "actor": 0.0}
            last = [0.0]

            def sample(proc: subprocess.Popen[bytes], seen: dict[str, float] = seen, last: list[float] = last) -> None:
                if time.monotonic() - last[0] < 0.5:
                    return
                last[0] = time.monotonic()
                for who, mb in ray_peaks(proc.pid).items():
                    seen[who] = max(seen[who], mb)

            with closing(h.Server(latency=0.0)) as srv:
                cmd = bench.ours_cmd(bench.table(rows, empty=True), srv.url, 256, "--engine", "ray", "--workers", "4",
                                     "--max-error-rate", "1", "--no-report")  # fmt: skip
                if out is not None:
                    cmd[cmd.index("--output") + 1] = f"{out}/"
                r = h.run_child(cmd, timeout=bench.timeout * 2, tick=sample)
                if r.rc != 0:
                    raise h.BenchError(f"ray memory {rows} {kind}: exit {r.rc}: {r.stderr.strip()[-800:]}")
            peaks[f"{rows} {kind}"] = seen
    scn = f"11 ray memory, streaming pass, {sizes[0]:,} and {sizes[1]:,} rows"
    for kind in ("file", "folder"):
        for who in ("driver", "actor"):
            big, small = peaks[f"{sizes[1]} {kind}"][who], peaks[f"{sizes[0]} {kind}"][who]
            bench.add(scn, f"{kind} output: {who} peak RSS MB, {sizes[1]:,} / {sizes[0]:,} rows", big, small)
    fig["memory"] = peaks


def ray_peaks(root: int) -> dict[str, float]:
    """Peak RSS (VmHWM) in MB of the `pipeline run` under `root` (a GNU time wrapper or itself), and the
    largest of the Ray actors running our engine (their process title is ray::Sender)."""
    peaks = {"driver": 0.0, "actor": 0.0}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        hwm = fields.get("VmHWM", "0 kB").split()[0]
        mb = int(hwm) / 1024 if hwm.isdigit() else 0.0
        if cmdline.startswith("ray::Sender"):
            peaks["actor"] = max(peaks["actor"], mb)
        elif " run " in cmdline and "pipeline" in cmdline and int(fields.get("PPid", "0").strip() or 0) in (root, os.getpid()):
            peaks["driver"] = max(peaks["driver"], mb)
    return peaks


if __name__ == "__main__":
    print(json.dumps({"note": "run through bench/run.py --only ray"}))
