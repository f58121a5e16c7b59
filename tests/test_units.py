"""Pieces with rules worth pinning down on their own: templates, config, retry, checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import errors
from pipeline.limits.retry import RetryPolicy
from pipeline.requests.prompts import KEY, PROMPT, Renderer, RequestSpec, parse_template
from pipeline.settings import build_config
from pipeline.tables.checkpoint import RESULT_COLUMNS, Checkpoint

SPEC = RequestSpec(model="m", system=None, max_tokens=10, temperature=None, top_p=None)


def renderer(template: str, **kw: object) -> Renderer:
    return Renderer(spec=kw.pop("spec", SPEC), template=parse_template(template), prompt_column=None, id_column=None)  # type: ignore[arg-type]


@given(a=st.text(), b=st.text())
def test_rendering_matches_python_formatting(a: str, b: str) -> None:
    template = "Q: {a} {{literal}} / {b}!"
    out = renderer(template).render(pl.DataFrame({"a": [a], "b": [b]}))
    assert out[PROMPT][0] == template.format(a=a, b=b)


def test_request_keys_are_stable_and_change_with_what_is_sent() -> None:
    df = pl.DataFrame({"text": ["one", "two", "one"]})
    keys = renderer("{text}").render(df)[KEY].to_list()
    assert keys[0] == keys[2] != keys[1]
    assert keys == renderer("{text}").render(df)[KEY].to_list()  # same input, same key, every run
    assert renderer("Summarise {text}").render(df)[KEY][0] != keys[0]  # template
    hotter = RequestSpec(model="m", system=None, max_tokens=10, temperature=0.7, top_p=None)
    assert renderer("{text}", spec=hotter).render(df)[KEY][0] != keys[0]  # parameter


def test_template_errors_are_explained() -> None:
    with pytest.raises(errors.ConfigError, match="format spec"):
        parse_template("{text:>10}")
    with pytest.raises(errors.ConfigError, match="empty placeholder"):
        parse_template("x {} y")
    with pytest.raises(errors.ConfigError, match="not valid"):
        parse_template("unclosed {text")


def test_config_flags_override_file_values() -> None:
    cfg = build_config({"input": "a.csv", "output": "o.parquet", "prompt": "{x}", "rpm": 10}, {"rpm": 20, "model": None})
    assert cfg.rpm == 20 and cfg.input == ("a.csv",)
    assert cfg.setting("concurrency") == 256  # the openai ceiling while learning
    assert cfg.model_copy(update={"adapt": False}).setting("concurrency") == 16  # the fixed default without
    local = build_config({"input": "a.csv", "output": "o.parquet", "prompt": "{x}", "provider": "local"}, {})
    assert local.setting("concurrency") == 1 and local.setting("model") == "SmolLM2-135M-Instruct"


def test_openai_key_is_only_sent_to_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"input": "a.csv", "output": "o.parquet", "prompt": "{x}"}
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert build_config(base, {}).api_key() == "k"
    assert build_config({**base, "base_url": "http://127.0.0.1:9/v1"}, {}).api_key() is None


def test_retry_policy() -> None:
    policy = RetryPolicy(max_attempts=3)
    transient = errors.ServerError("HTTP 503", kind="http_503")
    assert all(0 <= (policy.delay(1, transient) or -1) <= 0.1 for _ in range(50))
    assert all(0 <= (policy.delay(2, transient) or -1) <= 0.2 for _ in range(50))
    assert policy.delay(3, transient) is None  # out of attempts
    assert policy.delay(1, errors.PermanentError("HTTP 400", kind="http_400")) is None
    told = errors.RateLimited("HTTP 429", kind="http_429", retry_after=2.0)
    assert 2.0 <= (policy.delay(1, told) or 0) <= 2.3


def result(key: str, status: str = "ok", text: str = "answer") -> tuple[object, ...]:
    values = {c: None for c in RESULT_COLUMNS} | {"request_key": key, "status": status, "completion": text, "attempts": 1}
    values["tokens_estimated"] = False
    return tuple(values[c] for c in RESULT_COLUMNS)


def test_checkpoint_survives_a_torn_last_line_and_never_loses_an_ok(tmp_path: Path) -> None:
    ck = Checkpoint(tmp_path / "ck")
    ck.open()
    ck.start_journal()
    ck.append(result("a"))
    ck.append(result("b"))
    ck.close()
    (journal,) = (tmp_path / "ck").glob("journal-*.jsonl")
    with open(journal, "ab") as f:
        f.write(b'{"request_key": "c", "status": "o')  # killed mid-write
    ck2 = Checkpoint(tmp_path / "ck")
    ck2.open()
    done = ck2.load()
    assert done["request_key"].to_list() == ["a", "b"]
    ck2.start_journal()
    ck2.append(result("a", status="error", text=None))  # type: ignore[arg-type]  # a later failure (say --fresh)
    ck2.append(result("c"))
    ck2.close()
    ck3 = Checkpoint(tmp_path / "ck")
    ck3.open()
    assert ck3.load()["request_key"].to_list() == ["a", "b", "c"]
    assert list((tmp_path / "ck").glob("journal-*")) == []  # folded into results.parquet
    ck3.close()


def test_a_second_run_on_the_same_checkpoint_is_refused(tmp_path: Path) -> None:
    first = Checkpoint(tmp_path / "ck")
    first.open()
    with pytest.raises(errors.InputError, match="Another pipeline run"):
        Checkpoint(tmp_path / "ck").open()
    first.close()
    assert os.path.exists(tmp_path / "ck" / "lock")


def test_structured_replies_are_checked_and_canonical() -> None:
    from pipeline.requests.structured import Structured, check_reply, load_schema

    schema = load_schema(
        {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}
    )
    structured = Structured(schema=schema, layout="columns", name="")
    validator, dtype = structured.validator(), structured.dtype
    assert check_reply('```json\n{"n": 3, "tags": ["a"]}\n```', validator, dtype) == '{"n":3,"tags":["a"]}'
    with pytest.raises(errors.InvalidOutput, match="too large"):
        check_reply('{"n": 99999999999999999999}', validator, dtype)
    with pytest.raises(errors.InvalidOutput, match="at n"):
        check_reply('{"n": "three"}', validator, dtype)
    with pytest.raises(errors.InvalidOutput, match="not valid JSON"):
        check_reply("three", validator, dtype)


def test_without_a_terminal_progress_is_a_status_line_now_and_then() -> None:
    import asyncio
    import io

    from pipeline.observe.progress import Progress
    from pipeline.observe.stats import RunStats

    stats = RunStats(total_rows=200, rows_done=50, errors=2, retries=3, pace_rpm=5922, pace_source="header")
    stats.pace_detail, stats.concurrency, stats.concurrency_ceiling, stats.limited_rate = "x-ratelimit-limit-requests", 12, 256, 3
    log = io.StringIO()  # not a terminal, like a cron job's log

    async def run_briefly() -> None:
        progress = Progress(stats, enabled=True, stream=log, log_every=0.05)
        progress.start()
        await asyncio.sleep(0.18)
        progress.close()

    asyncio.run(run_briefly())
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 4
    assert lines[0].startswith("pipeline: 50 of 200 rows (25%) done after") and "2 errors, 3 retries" in lines[0]
    # What the run has learned, and from where, is in every line of a nightly log.
    assert "pace 5,922 requests/min (the server's headers, x-ratelimit-limit-requests)" in lines[0]
    assert "12 in flight (learned, at most 256); 429s: 3 rate, 0 in-flight" in lines[0]


def test_after_a_resume_the_pace_and_time_left_count_only_rows_sent_this_run() -> None:
    import re

    from pipeline.observe.progress import Progress, duration
    from pipeline.observe.stats import RunStats

    # 600 of 1,000 rows done 100 s in, but 500 of them came from the checkpoint: 1 row/s is real, 6 is not.
    stats = RunStats(total_rows=1000, rows_done=600, from_checkpoint=500)
    progress = Progress(stats, enabled=False)
    progress._started -= 100
    line = progress.status_line()
    rate = float(re.search(r"([0-9.]+) rows/s", line)[1])  # type: ignore[index]
    assert 0.9 < rate < 1.01, line
    assert "(500 from the checkpoint)" in line and "about 7 min left" in line, line
    assert duration(20) == "under a minute" and duration(3 * 3600) == "about 3.0 h"


@pytest.mark.parametrize(
    ("message", "status", "kind"),
    [
        ("Provider returned error", 200, errors.ServerError),
        ("Something went wrong", 200, errors.ServerError),
        ("Server Error, please try again", 200, errors.ServerError),
        ("Model is currently unavailable", 200, errors.ServerError),
        ("The model_id field is required.", 200, errors.ErrorReply),
        ("Model not found", 200, errors.ErrorReply),
        ("Invalid API key. Please check your key.", 200, errors.KeyRefused),
        ("Rate limit exceeded. Maximum 5 queued requests allowed.", 429, errors.RateLimited),
        ("Insufficient credit balance", 200, errors.OutOfQuota),
    ],
)
def test_modelslab_error_messages_are_retried_unless_known_permanent(message: str, status: int, kind: type) -> None:
    from pipeline.providers.modelslab import classify_message

    err = classify_message(message, status, None)
    assert type(err) is kind
    if isinstance(err, errors.RateLimited):
        assert (err.scope, err.limit) == ("concurrency", 5)


@pytest.mark.parametrize(
    ("message", "scope", "limit"),
    [
        ("Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): Limit 500", "rate", None),
        ("Rate limit reached for requests", "rate", None),
        ("Too many concurrent requests. Maximum 8 concurrent requests allowed.", "concurrency", 8),
        ("You have too many requests in flight", "concurrency", None),
        ("Too Many Requests", "unknown", None),
    ],
)
def test_a_429_says_whether_it_is_about_rate_or_requests_in_flight(message: str, scope: str, limit: int | None) -> None:
    from pipeline.providers.base import limit_scope

    assert limit_scope(message) == (scope, limit)
