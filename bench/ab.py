"""Overhead of two commits of `pipeline`, measured interleaved in one session: `make bench-ab`.

    python bench/ab.py [--rounds 8] [--requests 20000] REV_A REV_B [-- extra flags for both runs]

On a shared machine one bench run's overhead ratio moves by 10-20% from run to run, far
more than a change worth measuring.  This script takes each revision from its own git
worktree (the code under test is never the working copy, which may change while it runs),
and in every round runs the bare baseline, A and B back to back, in a rotated order,
against one fake server (20 ms per request, as the overhead scenario of bench/run.py).
Each run is compared with the baseline of its own round, and B with A directly, so a
slow minute of the machine moves all three together.  It prints the medians and ranges:
the paired B/A median is the figure to quote.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import closing, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the harness pieces: Server, run_child, the table writer

ROOT = bench.ROOT


def worktree(rev: str, where: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    path = where / sha[:10]
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True, capture_output=True)
    return path


def pipeline_cmd(tree: Path, inp: Path, out: Path, url: str, conc: int, extra: list[str]) -> list[str]:
    # -P: the child's working directory (the repository) is not put first on sys.path, so
    # PYTHONPATH's worktree wins over both it and the editable install.
    return [sys.executable, "-P", "-m", "pipeline", "run", "--input", str(inp), "--output", str(out), "--prompt",
            bench.PROMPT, "--base-url", url + "/v1", "--model", "fake-model", "--concurrency", str(conc), *extra]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev_a", help="the reference revision (say, the commit before a change)")
    p.add_argument("rev_b", help="the revision under test")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("extra", nargs="*", help="after --: flags for both revisions' runs (say, --no-adapt)")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, bench._interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-ab-"))
    trees = tmp / "trees"
    n, conc = args.requests, args.concurrency
    rates: dict[str, list[float]] = {"baseline": [], "A": [], "B": []}
    cpu: dict[str, list[float]] = {"baseline": [], "A": [], "B": []}
    try:
        tree = {"A": worktree(args.rev_a, trees), "B": worktree(args.rev_b, trees)}
        inp = bench.Bench(tmp, quick=False).table(n)
        with closing(bench.Server(latency=0.02)) as srv:
            for i in range(args.rounds):
                order = [("baseline", "A", "B"), ("A", "B", "baseline"), ("B", "baseline", "A")][i % 3]
                for who in order:
                    srv.reset()
                    if who == "baseline":
                        r, rep = bench.Bench(tmp, quick=False).base(inp, srv.url, conc)
                        sending, ok = rep["send_s"], rep["ok"]
                    else:
                        cmd = pipeline_cmd(tree[who], inp, tmp / f"out-{who}-{i}.parquet", srv.url, conc, args.extra)
                        r = bench.run_child(cmd, timeout=300, env={"PYTHONPATH": str(tree[who])})
                        if r.rc != 0:
                            raise bench.BenchError(f"{who} exited {r.rc}: {r.stderr.strip()[-800:]}")
                        s = r.summary()
                        sending, ok = n / s["rows_per_s"], s.get("ok", 0)
                    if ok != n or srv.stats()["requests"] != n:
                        raise bench.BenchError(f"{who}: {ok} ok rows of {n}")
                    rates[who].append(n / sending)
                    cpu[who].append(r.cpu / n * 1e6)
                print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} req/s" for k, v in rates.items()), file=sys.stderr)
    except bench.BenchError as exc:
        print(f"ab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in list(bench.LIVE):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.CalledProcessError):
            for path in trees.glob("*") if trees.exists() else []:
                subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=True, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def spread(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.3f} (range {min(xs):.3f}-{max(xs):.3f})"

    a_over = [a / b for a, b in zip(rates["A"], rates["baseline"], strict=True)]
    b_over = [a / b for a, b in zip(rates["B"], rates["baseline"], strict=True)]
    paired = [b / a for a, b in zip(rates["A"], rates["B"], strict=True)]
    print(f"{n:,} requests, {conc} in flight, 20 ms server, {args.rounds} rounds; requests/s with start-up excluded")
    print(f"  A {args.rev_a} / baseline: {spread(a_over)}")
    print(f"  B {args.rev_b} / baseline: {spread(b_over)}")
    print(f"  B / A, paired per round:   {spread(paired)}")
    print("  client CPU µs/request, median: " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in cpu.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
