"""Shared fixtures: an isolated working folder, a fake provider, and ways to drive the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli
from tests.fakeserver import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_reaches_children() -> None:
    """Tests send SIGINT to the processes they start. A shell starts a background job (`make test &`,
    a CI runner's `cmd &`) with SIGINT ignored, and children inherit an ignored signal: with a Python
    handler here instead, each child starts with the default and turns Ctrl-C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder, with its own user state folder and no provider keys from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path.with_name(tmp_path.name + "-state")))  # not in the run's folder
    for var in ("OPENAI_API_KEY", "MODELSLAB_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


def write_table(path: str | Path, rows: list[dict[str, Any]] | pl.DataFrame) -> Path:
    """Write rows as CSV, Parquet or JSONL according to the file name."""
    df = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".csv":
        df.write_csv(p)
    elif p.suffix == ".parquet":
        df.write_parquet(p)
    else:
        df.write_ndjson(p)
    return p


def texts(n: int, prefix: str = "review number") -> list[dict[str, Any]]:
    return [{"id": i, "text": f"{prefix} {i} says the product is fine"} for i in range(n)]


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Drive `pipeline` in-process, as a user would from a shell."""
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def base_args(server: FakeLLMServer, *, inp: str = "in.csv", out: str = "out/result.parquet") -> list[str]:
    return [
        "run", "--input", inp, "--output", out, "--prompt", "Summarise: {text}",
        "--base-url", f"{server.url}/v1", "--model", "fake-model", "--no-progress", "--max-attempts", "4",
    ]  # fmt: skip


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m pipeline ...` as a real child process (for kill and signal tests)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
    )


def chat_requests(server: FakeLLMServer) -> list[Any]:
    return [r for r in server.requests if r.path.endswith(("/chat/completions", "/messages"))]


def run_in_terminal(*args: str, columns: int = 80, interrupt_after: float | None = None) -> tuple[int, str]:
    """`python -m pipeline ...` on a real pseudo-terminal `columns` wide, as a user at a shell sees it;
    with `interrupt_after`, type Ctrl-C after that many seconds. Returns the exit code and everything shown."""
    import fcntl
    import select
    import struct
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def own_terminal() -> None:  # in the child: the pty becomes its controlling terminal, so ^C is SIGINT
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "PYTHONPATH": str(ROOT)},
        preexec_fn=own_terminal,
    )
    os.close(slave)
    shown, started, typed = b"", time.monotonic(), False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if interrupt_after is not None and not typed and time.monotonic() - started > interrupt_after:
                os.write(master, b"\x03")
                typed = True
            if not ready and proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=60)
    return proc.returncode, shown.decode("utf-8", "replace")


# ---- a real S3-compatible server for the object-storage tests: moto's, on 127.0.0.1 -----------------


def start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on a free port of 127.0.0.1, in its own process; its address."""
    from pipeline.providers.local_model import free_port

    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    proc, url = start_moto()
    yield url
    stop_process(proc)


@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A client for setting up and checking, and the environment a user would set; a fresh bucket."""
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": moto_url}.items():  # fmt: skip
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    boto3 = pytest.importorskip("boto3", reason="moto[server] (a dev dependency) brings boto3")
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    client.create_bucket(Bucket="lake")
    yield client
    for upload in client.list_multipart_uploads(Bucket="lake").get("Uploads", []):
        client.abort_multipart_upload(Bucket="lake", Key=upload["Key"], UploadId=upload["UploadId"])
    for obj in client.list_objects_v2(Bucket="lake").get("Contents", []):
        client.delete_object(Bucket="lake", Key=obj["Key"])
    client.delete_bucket(Bucket="lake")
