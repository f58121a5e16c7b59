"""`pipeline estimate`: figures checked by hand, against the real fake server, with no generation sent."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.observe.estimate import Estimate, Scan, estimate, estimate_job, figures
from pipeline.settings import build_config
from tests.conftest import ROOT, chat_requests, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer

SECRET = "sk-estimate-secret-123"


def config(**values: Any) -> RunConfig:
    base = {"input": "in.csv", "output": "out/result.parquet", "prompt": "Summarise: {text}", "model": "fake-model"}
    return build_config({**base, **values}, {})  # as file values, so None (no max_tokens) is kept


def paths(server: FakeLLMServer) -> list[str]:
    return [r.path for r in server.requests]


def five_rows() -> None:
    # One null row (not sendable) and one duplicate of row 0 (sent once).
    write_table("in.csv", [{"id": i, "text": t} for i, t in enumerate(["a b c", None, "d e", "a b c", "f"])])


def test_figures_match_a_hand_count_from_the_anthropic_count_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    five_rows()
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    with FakeLLMServer(api_key=SECRET) as server:
        cfg = config(
            provider="anthropic",
            base_url=server.url,
            system="Be brief.",
            max_tokens=10,
            price_in=3.0,
            price_out=15.0,
            batch_size=2,
        )
        est = estimate(cfg)
        received = server.requests
    assert (est.rows, est.not_sendable, est.skipped, est.requests) == (5, 1, 0, 3)
    # The fake counts words of each message + 3 a message + words of the system ("Be brief." = 2):
    # "Summarise: a b c" 4+3+2, "Summarise: d e" 3+3+2, "Summarise: f" 2+3+2.
    assert est.tokens_in == 9 + 8 + 7
    assert est.tokens_in_method == "exact, from the provider's count endpoint"
    assert est.tokens_out == 3 * 10
    assert est.cost_in == pytest.approx(24 / 1e6 * 3.0)
    assert est.cost_out == pytest.approx(30 / 1e6 * 15.0)
    # Only count requests reached the server, one per distinct request, with Anthropic's headers.
    assert [r.path for r in received] == ["/v1/messages/count_tokens"] * 3
    assert all(r.headers["x-api-key"] == SECRET and r.headers["anthropic-version"] == "2023-06-01" for r in received)
    assert sorted(r.content for r in received) == ["Summarise: a b c", "Summarise: d e", "Summarise: f"]
    assert all("max_tokens" not in r.body for r in received)


def test_large_table_counts_a_sample_and_extrapolates_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    write_table("in.csv", texts(30))
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    with FakeLLMServer(api_key=SECRET) as server:
        est = estimate(config(provider="anthropic", base_url=server.url), count_limit=4)
        assert len(server.requests) == 4
    assert est.tokens_in_method == "extrapolated from 4 rows counted by the provider"
    # Every row is "Summarise: review number N says the product is fine": 9 words + 3.
    assert est.tokens_in == pytest.approx(30 * 12, rel=0.05)


def test_no_generation_request_and_the_report_names_every_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    five_rows()
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    out = io.StringIO()
    with FakeLLMServer(api_key=SECRET) as server:
        cfg = config(provider="anthropic", base_url=server.url, max_tokens=10, price_in=3.0, price_out=15.0)
        assert estimate_job(cfg, out, samples=2) == 0
        assert chat_requests(server) == []
        assert set(paths(server)) == {"/v1/messages/count_tokens"}
    text = out.getvalue()
    assert text.count("sample request") == 2 and '"content": "Summarise: a b c"' in text
    assert "requests to send: 3" in text and "not sendable (null/empty): 1" in text
    assert "at most 30 (3 requests x max_tokens 10)" in text
    # Counted exactly, and no answers to go by: the typical cost is the bound, shown once.
    assert "cost: at most $0.0005 (bound: the exact prompt count + max_tokens)" in text
    assert "ceiling" not in text
    assert SECRET not in text
    assert not Path("out/result.parquet").exists() and not Path("out/result.checkpoint").exists()


def test_answered_rows_in_the_checkpoint_are_skipped_and_left_untouched(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(4))
    run = ["run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "Summarise: {text}", "--base-url", f"{server.url}/v1"]
    assert run_cli(*run, "--model", "fake-model", "--no-progress").exit_code == 0
    write_table("in.csv", texts(6))  # two new rows since the run
    server.reset()
    folder = Path("out/result.checkpoint")
    before = sorted(p.name for p in folder.iterdir())
    est = estimate(config(base_url=f"{server.url}/v1"))
    assert (est.rows, est.skipped, est.requests) == (6, 4, 2)
    # The four answers' billed prompt tokens calibrate the two rows to send (the fake counts words, not bytes).
    assert est.tokens_in_method.startswith("calibrated from 4 answers in the checkpoint: ")
    assert est.tokens_in_method.endswith("tokens per KB of prompt; no tokenizer for this provider")
    assert est.tokens_in == 2 * (9 + 3)  # every prompt is 9 words, + 3 a message: the calibration is exact here
    assert "median of 4 answers in the checkpoint" in est.pace
    assert server.requests == []
    assert sorted(p.name for p in folder.iterdir()) == before  # not compacted, no new journal
    assert estimate(config(base_url=f"{server.url}/v1", fresh=True)).skipped == 0


def test_modelslab_sample_body_masks_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    write_table("in.csv", texts(2))
    monkeypatch.setenv("MODELSLAB_API_KEY", SECRET)
    out = io.StringIO()
    with FakeLLMServer(api_key=SECRET) as server:
        estimate_job(config(provider="modelslab", base_url=f"{server.url}/api/v7/llm"), out)
        assert set(paths(server)) == {"/api/v7/llm/v1/messages/count_tokens"}
    text = out.getvalue()
    assert '"key": "***"' in text and '"model_id": "fake-model"' in text
    assert SECRET not in text
    assert "exact, from the provider's count endpoint" in text  # the key went in x-api-key


@pytest.mark.parametrize("where", ["unreachable", "404"])
def test_count_endpoint_failure_falls_back_to_a_labelled_estimate(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write_table("in.csv", texts(3))
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    with FakeLLMServer() as server:
        base = "http://127.0.0.1:9" if where == "unreachable" else f"{server.url}/no/such/api"
        est = estimate(config(provider="anthropic", base_url=base))
    assert est.tokens_in_method.startswith("estimate: about 4 bytes a token; the provider's count endpoint failed")
    assert ("cannot connect" if where == "unreachable" else "HTTP 404") in est.tokens_in_method
    assert SECRET not in est.tokens_in_method
    prompt = "Summarise: review number 0 says the product is fine"
    assert est.tokens_in == 3 * ((len(prompt) + 3) // 4)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prompt": "Summarise: {body}"}, "'body'"),
        ({"input": "missing.csv"}, "missing.csv does not exist"),
    ],
)
def test_bad_input_is_a_user_error_like_run(values: dict[str, Any], message: str) -> None:
    write_table("in.csv", texts(2))
    out = io.StringIO()
    with pytest.raises(errors.UserError, match=message):
        estimate_job(config(**values), out)
    assert out.getvalue() == ""


def scan(requests: int, charged: int = 0) -> Scan:
    return Scan(requests, 0, 0, requests, 0, 0, charged, (), ())


@pytest.mark.parametrize(
    ("values", "rate", "pace"),
    [
        ({"concurrency": 4}, 4.0, "concurrency 4, assumed 1.0 s per request"),
        ({"concurrency": 4, "rpm": 60}, 1.0, "limited by rpm 60"),
        # The limiter charges 300 tokens a request here: 6000 tpm is 100 tokens a second.
        ({"concurrency": 4, "rpm": 600, "tpm": 6000}, 1 / 3, "limited by tpm 6000 at 300 tokens a request"),
    ],
)
def test_wall_time_follows_the_tightest_limit(values: dict[str, Any], rate: float, pace: str) -> None:
    est: Estimate = figures(config(**values), scan(120, charged=120 * 300), (1000, "x"), (1.0, "no latency measured yet"))
    assert est.rate == pytest.approx(rate)
    assert est.seconds == pytest.approx(120 / rate)
    assert est.pace.startswith(pace)


def test_no_max_tokens_and_no_prices_are_said_not_guessed() -> None:
    est = figures(config(max_tokens=None, price_in=1.0), scan(10), (500, "x"), (1.0, "no latency measured yet"))
    assert est.tokens_out is None and est.cost_in is None
    # Anthropic requires max_tokens, so the adapter's default is the worst case there.
    est = figures(config(provider="anthropic", max_tokens=None), scan(10), (500, "x"), (1.0, ""))
    assert est.tokens_out == 10 * 1024


def test_estimate_without_a_key_falls_back_to_the_labelled_estimate() -> None:
    write_table("in.csv", texts(3))
    result = run_cli("estimate", "-i", "in.csv", "-o", "out/e.parquet", "-p", "{text}", "--provider", "modelslab")
    assert result.exit_code == 0, result.output
    assert "set MODELSLAB_API_KEY to count exactly" in result.output


# --- Two figures for prompt tokens: typical (calibrated) and an upper bound (the run's byte bound) ---

RUN = ["-i", "in.csv", "-o", "out/result.parquet", "-p", "Summarise: {text}", "-m", "fake-model", "--max-tokens", "20"]
PRICES = ["--price-in", "1", "--price-out", "2"]


def varied(n: int) -> list[dict[str, Any]]:
    """Reviews of different lengths and wording, so tokens a byte is not the same for every row."""
    return [
        {"id": i, "text": f"review {i}: the {'very ' * (i % 7)}{'extraordinarily ' * (i % 3)}good product, {i * 37} stars"}
        for i in range(n)
    ]


def figure(text: str, pattern: str) -> int:
    found = re.search(pattern, text)
    assert found, (pattern, text)
    return int(found.group(1).replace(",", ""))


def test_estimate_calibrated_from_the_checkpoint_matches_what_the_run_then_bills(server: FakeLLMServer) -> None:
    write_table("in.csv", varied(120))
    base = [*RUN, "--base-url", f"{server.url}/v1"]
    assert run_cli("run", *base, "--limit", "30", "--no-progress").exit_code == 0  # a try-out on the first rows
    server.reset()
    est = run_cli("estimate", *base, *PRICES)
    assert est.exit_code == 0, est.output
    assert chat_requests(server) == []
    assert "requests to send: 90" in est.output
    assert re.search(r"calibrated from 30 answers in the checkpoint: [0-9,]+ tokens per KB of prompt", est.output)
    typical = figure(est.output, r"tokens in: about ([0-9,]+) ")
    most = figure(est.output, r"; at most ([0-9,]+) \(bound: 1 token a byte of the request")
    assert "cost: about $" in est.output and "(typical), at most $" in est.output
    assert "(bound: 1 token a byte of the request + max_tokens)" in est.output
    run = run_cli("run", *base, "--no-progress")
    assert run.exit_code == 0, run.output
    assert len(chat_requests(server)) == 90
    billed = server.stats()["billed_prompt_tokens"]
    rule = sum((len(f"Summarise: {r['text']}".encode()) + 3) // 4 for r in varied(120)[30:])
    assert abs(rule - billed) / billed > 0.1  # the 4-bytes rule is well off here...
    assert typical == pytest.approx(billed, rel=0.04)  # ...the calibration is not
    assert most >= billed


def test_estimate_with_no_answers_says_the_rule_and_still_bounds_what_is_billed(server: FakeLLMServer) -> None:
    write_table("in.csv", varied(20))
    base = [*RUN, "--base-url", f"{server.url}/v1"]
    est = run_cli("estimate", *base, *PRICES)
    assert est.exit_code == 0, est.output
    assert "tokens in: about" in est.output and "estimate: about 4 bytes a token, no tokenizer for this provider" in est.output
    assert "every request at max_tokens: no answers yet" not in est.output  # typical out = the bound, not repeated
    assert "cost: about $" in est.output and "(typical prompt, output at max_tokens), at most $" in est.output
    most = figure(est.output, r"; at most ([0-9,]+) \(bound: 1 token a byte of the request")
    assert run_cli("run", *base, "--no-progress").exit_code == 0
    assert most >= server.stats()["billed_prompt_tokens"]


@pytest.mark.parametrize(
    ("ceiling", "verdict"),
    [("0.0000001", "does not fit under --max-cost"), ("100", "fits under --max-cost $100.00 (at most $")],
)
def test_estimate_with_a_ceiling_says_whether_the_job_fits_and_sends_nothing(
    server: FakeLLMServer, ceiling: str, verdict: str
) -> None:
    write_table("in.csv", varied(20))
    est = run_cli("estimate", *RUN, "--base-url", f"{server.url}/v1", *PRICES, "--max-cost", ceiling)
    assert est.exit_code == 0, est.output  # estimate prices, it does not refuse
    assert verdict in est.output and "; nothing was sent" in est.output
    if verdict.startswith("does not"):
        assert "(about 0 of 20 requests at the typical cost)" in est.output
    assert server.requests == []
    assert not Path("out/result.checkpoint").exists()


def test_a_ceiling_between_typical_and_bound_may_not_fit(server: FakeLLMServer) -> None:
    write_table("in.csv", varied(40))
    base = [*RUN, "--base-url", f"{server.url}/v1"]
    assert run_cli("run", *base, "--limit", "10", "--no-progress").exit_code == 0
    server.reset()
    est = run_cli("estimate", *base, "--max-tokens-total", "1")
    typical = figure(est.output, r"tokens in: about ([0-9,]+) ")
    most = figure(est.output, r"; at most ([0-9,]+) \(bound")
    out_typical = figure(est.output, r"tokens out: at most [0-9,]+ \(30 requests x max_tokens 20\); about ([0-9,]+)")
    between = str((typical + out_typical + most + 30 * 20) // 2)
    est = run_cli("estimate", *base, "--max-tokens-total", between)
    assert est.exit_code == 0, est.output
    assert f"may not fit under --max-tokens-total {int(between):,} tokens: about" in est.output
    assert "by the byte bound" in est.output
    assert chat_requests(server) == []


def test_the_invoices_example_is_bounded_by_what_estimate_calls_at_most(server: FakeLLMServer) -> None:
    for name in ("configs/extract-invoices.yaml", "data/invoices.jsonl"):
        Path(name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, name)
    where = ["--provider", "openai", "--base-url", f"{server.url}/v1", "--model", "fake-model"]
    est = run_cli("estimate", "configs/extract-invoices.yaml", *where)
    assert est.exit_code == 0, est.output
    assert chat_requests(server) == []
    most = figure(est.output, r"; at most ([0-9,]+) \(bound: 1 token a byte of the request")
    cost_most = float(re.search(r"at most \$([0-9.]+) \(bound", est.output).group(1))  # type: ignore[union-attr]
    run = run_cli("run", "configs/extract-invoices.yaml", *where, "--no-progress")
    assert run.exit_code == 0, run.output
    stats = server.stats()
    assert most >= stats["billed_prompt_tokens"]
    billed_cost = stats["billed_prompt_tokens"] * 0.05 / 1e6 + stats["billed_completion_tokens"] * 0.10 / 1e6
    assert cost_most >= billed_cost
