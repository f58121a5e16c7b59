"""Each provider's wire format against the fake server, and that the key stays secret."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tests.conftest import chat_requests, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer

SECRET = "sk-test-SECRET-0123456789abcdef"


def job(server: FakeLLMServer, provider: str, base: str, *extra: str) -> list[str]:
    return [
        "run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "Summarise: {text}", "--provider", provider,
        "--base-url", f"{server.url}{base}", "--no-progress", "--max-attempts", "3", *extra,
    ]  # fmt: skip


def test_modelslab_sends_key_and_model_id_in_the_body() -> None:
    with FakeLLMServer(api_key=SECRET) as server:
        write_table("in.csv", texts(3))
        result = run_cli(*job(server, "modelslab", "/api/v7/llm", "--system", "Be brief."), env={"MODELSLAB_API_KEY": SECRET})
        assert result.exit_code == 0, result.output
        reqs = chat_requests(server)
        assert [r.path for r in reqs] == ["/api/v7/llm/chat/completions"] * 3
        body = reqs[0].body
        assert body["key"] == SECRET and body["model_id"] == "meta-llama-Llama-3.2-1B"
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        out = pl.read_parquet("out/result.parquet")
        assert set(out["status"]) == {"ok"} and out["prompt_tokens"][0] > 0


def test_modelslab_rate_limit_body_retry_after_is_honoured() -> None:
    with FakeLLMServer(api_key=SECRET) as server:
        write_table("in.csv", [{"id": 0, "text": "busy [[fault:429@1x1]]"}])
        result = run_cli(*job(server, "modelslab", "/api/v7/llm"), env={"MODELSLAB_API_KEY": SECRET})
        assert result.exit_code == 0, result.output
        first, second = chat_requests(server)
        assert first.status == 429 and second.status == 200
        assert second.t - first.t >= 1.0


def test_anthropic_messages_wire_format() -> None:
    with FakeLLMServer(api_key=SECRET) as server:
        write_table("in.csv", texts(2))
        args = job(server, "anthropic", "", "--model", "claude-test", "--system", "Be brief.", "--max-tokens", "40")
        result = run_cli(*args, env={"ANTHROPIC_API_KEY": SECRET})
        assert result.exit_code == 0, result.output
        req = chat_requests(server)[0]
        assert req.path == "/v1/messages"
        headers = {k.lower(): v for k, v in req.headers.items()}
        assert headers["x-api-key"] == SECRET and headers["anthropic-version"] == "2023-06-01"
        assert req.body["system"] == "Be brief." and req.body["max_tokens"] == 40
        assert req.body["messages"] == [{"role": "user", "content": "Summarise: " + texts(2)[0]["text"]}]
        out = pl.read_parquet("out/result.parquet")
        assert out["finish_reason"].to_list() == ["end_turn", "end_turn"]
        assert out["prompt_tokens"][0] > 0 and out["completion_tokens"][0] > 0


def test_anthropic_529_overloaded_is_transient() -> None:
    with FakeLLMServer(api_key=SECRET) as server:
        write_table("in.csv", [{"id": 0, "text": "overloaded [[fault:529x2]]"}])
        result = run_cli(*job(server, "anthropic", "/api/v7/llm", "--model", "claude-test"), env={"ANTHROPIC_API_KEY": SECRET})
        assert result.exit_code == 0, result.output
        assert [r.status for r in chat_requests(server)] == [529, 529, 200]
        assert chat_requests(server)[0].path == "/api/v7/llm/v1/messages"


def test_the_key_is_in_no_file_and_no_message() -> None:
    with FakeLLMServer(api_key=SECRET) as server:
        rows = [*texts(5), {"id": 5, "text": "rejected [[fault:400]]"}, {"id": 6, "text": "gives up [[fault:500]]"}]
        write_table("in.csv", rows)
        result = run_cli(*job(server, "modelslab", "/api/v7/llm"), env={"MODELSLAB_API_KEY": SECRET})
        assert result.exit_code == 4  # two rows failed
        assert len(chat_requests(server)) >= 7  # the key really was sent...
    files = [p for p in Path("out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any("checkpoint" in str(p) for p in files)
    for path in files:  # ...but written nowhere
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.output


def test_modelslab_out_of_quota_stops_the_run() -> None:
    with FakeLLMServer(api_key=SECRET) as server:
        write_table("in.csv", [{"id": i, "text": f"row {i} [[fault:quota]]"} for i in range(20)])
        result = run_cli(*job(server, "modelslab", "/api/v7/llm", "--concurrency", "1"), env={"MODELSLAB_API_KEY": SECRET})
        assert result.exit_code == 7, result.output  # quota_exhausted
        assert "quota" in result.output.lower() and "stopped" in result.output
        assert len(chat_requests(server)) == 1


def test_modelslab_http_200_invalid_key_stops_the_run_and_the_echoed_key_is_masked() -> None:
    # The fake ModelsLab answers a wrong key with HTTP 200 and echoes the key in its message.
    with FakeLLMServer(api_key="another-key") as server:
        write_table("in.csv", texts(40))
        result = run_cli(*job(server, "modelslab", "/api/v7/llm", "--concurrency", "1"), env={"MODELSLAB_API_KEY": SECRET})
        assert result.exit_code == 6, result.output  # auth_refused
        assert "Invalid API key" in result.output and "Received key: ***" in result.output
        assert len(chat_requests(server)) == 1  # stopped at the first answer, not after 40 failures
        assert SECRET not in result.output
        for path in Path("out").rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes()


def test_modelslab_anthropic_endpoint_http_200_errors_are_classified() -> None:
    # ModelsLab's /v1/messages answers errors with HTTP 200 {"status": "error"} too.
    with FakeLLMServer(api_key=SECRET) as server:
        write_table("in.csv", [{"id": 0, "text": "busy [[fault:error200x1]]"}])
        args = job(server, "anthropic", "/api/v7/llm", "--model", "claude-test")
        result = run_cli(*args, env={"ANTHROPIC_API_KEY": SECRET})
        assert result.exit_code == 0, result.output  # "currently unavailable": transient, retried
        assert [r.status for r in chat_requests(server)] == [200, 200]


def test_estimate_masks_a_key_echoed_by_the_count_endpoint() -> None:
    with FakeLLMServer(api_key="the-right-one") as server:
        write_table("in.csv", texts(3))
        args = ["estimate", "-i", "in.csv", "-o", "out/e.parquet", "-p", "{text}", "--provider", "anthropic"]
        result = run_cli(*args, "--base-url", server.url, "--model", "m", env={"ANTHROPIC_API_KEY": SECRET})
        assert result.exit_code == 0, result.output
        assert "count endpoint failed" in result.output and "***" in result.output
        assert SECRET not in result.output


def test_a_placeholder_key_does_not_mangle_replies() -> None:
    # vLLM-style servers accept any key; users pass "x" or "EMPTY". Masking "x" would corrupt the JSON.
    with FakeLLMServer(api_key="x") as server:
        write_table("in.csv", [{"id": 0, "text": "max extra text"}])
        result = run_cli(*job(server, "openai", "/v1", "--model", "m", "--api-key-env", "DUMMY"), env={"DUMMY": "x"})
        assert result.exit_code == 0, result.output
        row = pl.read_parquet("out/result.parquet").row(0, named=True)
        assert row["completion"] == "echo: Summarise: max extra text" and row["tokens_estimated"] is False
