"""Object storage against local disk: reading a table and uploading an output (issue 11).

Starts moto's S3-compatible server (its own process on 127.0.0.1), then measures, each in its own
child process with peak RSS from GNU time (`/usr/bin/time -f %M`, else the child's ru_maxrss):

- read: 1M rows of Parquet (id Int64, text "item {id} arrived on time and works", as bench/run.py's
  table) through pipeline's source module as a run reads it (`open_table`, `count_rows`, every
  batch of 5,000), from `s3://` and from the same file on disk (issue 11: time within 2x, memory flat);
- upload: `storage.upload` of an output of two sizes to `s3://` (memory must not grow with the size).

    python bench/s3bench.py [--rows N] [--upload-mb A,B] [--repeat K]

Prints a table and one JSON line. Needs the dev tools (moto[server]); not part of `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
TASKSET = shutil.which("taskset") if len(os.sched_getaffinity(0)) >= 2 else None
CLIENT_CORE, SERVER_CORE = min(os.sched_getaffinity(0)), max(os.sched_getaffinity(0))

READ = """
import sys
from pipeline.tables import source
table = source.open_table((sys.argv[1],))
rows = source.count_rows(table)
seen = sum(batch.height for batch in source.batches(table, 5000))
assert rows == seen == int(sys.argv[2]), (rows, seen)
"""
UPLOAD = """
import sys
from pathlib import Path
from pipeline.tables import storage
storage.upload(Path(sys.argv[1]), storage.Url.parse(sys.argv[2]))
"""


@dataclass
class Figure:
    wall: float
    rss_mb: float


def pinned(core: int, cmd: list[str]) -> list[str]:
    return [TASKSET, "-c", str(core), *cmd] if TASKSET else cmd


def child(script: str, *argv: str, env: dict[str, str]) -> Figure:
    """One measurement in a fresh process: wall from spawn to exit, and its peak RSS."""
    with tempfile.NamedTemporaryFile() as tv:
        cmd = pinned(CLIENT_CORE, [sys.executable, "-c", script, *argv])
        if GNU_TIME:  # GNU time forks the command from its own small image: no inherited maxrss
            cmd = [GNU_TIME, "-f", "%M", "-o", tv.name, *cmd]
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"child exited {done.returncode}: {done.stderr.strip()[-800:]}")
        if GNU_TIME:
            rss_kb = float(Path(tv.name).read_text().split()[-1])
        else:
            rss_kb = float(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return Figure(wall, rss_kb / 1024)


def table(path: Path, n: int) -> Path:
    schema = pl.DataFrame(schema={"id": pl.Int64, "text": pl.String}).to_arrow().schema
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for start in range(0, n, 1_000_000):
            ids = pl.int_range(start, min(n, start + 1_000_000), dtype=pl.Int64).alias("id")
            text = pl.format("item {} arrived on time and works", "id")
            w.write_table(pl.select(ids).with_columns(text=text).to_arrow(), 100_000)
    return path


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cmd = pinned(SERVER_CORE, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("moto's server did not start (pip install -e '.[dev]')") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--upload-mb", default="128,512", help="output sizes to upload, in MB (default 128,512)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each read; the fastest is kept (default 2)")
    opts = parser.parse_args()
    try:
        import boto3
    except ImportError:
        raise SystemExit("moto[server] is not installed: pip install -e '.[dev]'") from None

    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        folder = Path(tmp)
        moto, url = start_moto()
        env["AWS_ENDPOINT_URL"] = url
        try:
            client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                                  aws_secret_access_key="bench")  # fmt: skip
            client.create_bucket(Bucket="bench")
            inp = table(folder / "in.parquet", opts.rows)
            parquet_bytes = inp.stat().st_size
            client.upload_file(str(inp), "bench", "in.parquet")
            reads: dict[str, list[Figure]] = {"disk": [], "s3": []}
            for _ in range(opts.repeat):
                for who, where in (("disk", str(inp)), ("s3", "s3://bench/in.parquet")):
                    reads[who].append(child(READ, where, str(opts.rows), env=env))
            uploads: dict[int, Figure] = {}
            for mb in (int(x) for x in opts.upload_mb.split(",")):
                local = folder / f"out-{mb}.parquet"
                with local.open("wb") as out:
                    for _ in range(mb):
                        out.write(os.urandom(1 << 20))
                uploads[mb] = child(UPLOAD, str(local), f"s3://bench/out/out-{mb}.parquet", env=env)
                size = client.head_object(Bucket="bench", Key=f"out/out-{mb}.parquet")["ContentLength"]
                if size != local.stat().st_size:
                    raise SystemExit(f"the uploaded object has {size} bytes, the file {local.stat().st_size}")
                local.unlink()
        finally:
            os.killpg(moto.pid, signal.SIGKILL)
            moto.wait()

    disk, s3 = min(reads["disk"], key=lambda f: f.wall), min(reads["s3"], key=lambda f: f.wall)
    print(f"{'measure':<48} {'s3://':>10} {'disk':>10} {'ratio':>7}")
    print(f"{f'read {opts.rows:,} rows of Parquet, wall s':<48} {s3.wall:>10.2f} {disk.wall:>10.2f} {s3.wall / disk.wall:>7.2f}")
    print(
        f"{f'read {opts.rows:,} rows of Parquet, peak RSS MB':<48} {s3.rss_mb:>10.0f} {disk.rss_mb:>10.0f} {s3.rss_mb / disk.rss_mb:>7.2f}"
    )
    for mb, fig in uploads.items():
        print(f"{f'upload a {mb} MB output, wall s / peak RSS MB':<48} {fig.wall:>10.1f} {fig.rss_mb:>10.0f}")
    read = {"s3_wall": s3.wall, "disk_wall": disk.wall, "s3_rss_mb": s3.rss_mb, "disk_rss_mb": disk.rss_mb,
            "wall_ratio": s3.wall / disk.wall, "target": "wall ratio <= 2, memory flat"}  # fmt: skip
    upload = {str(mb): {"wall": f.wall, "rss_mb": f.rss_mb} for mb, f in uploads.items()}
    print(json.dumps({"rows": opts.rows, "parquet_bytes": parquet_bytes, "read": read, "upload": upload,
                      "gnu_time": GNU_TIME is not None}))  # fmt: skip


if __name__ == "__main__":
    main()
