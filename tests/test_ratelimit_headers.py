"""Rate-limit headers of each provider read into one shape: units, clock skew, and servers' nonsense.

Header sets follow the providers' documented samples (see research/rate-control.md section 1). Every test
passes `now`, so nothing depends on the machine's clock.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from pipeline.providers.ratelimit import (
    Budget,
    Dialect,
    RateHeaders,
    dialect_for,
    parse_duration,
    parse_rate_headers,
    parse_reset,
)

NOW = 1_755_780_000.0  # 2025-08-21T12:40:00Z, our clock
DATE = "Thu, 21 Aug 2025 12:40:00 GMT"  # the server's Date, same clock as ours
BASE = {"Content-Type": "application/json", "Connection": "keep-alive", "x-request-id": "req_abc", "Server": "cloudflare"}
FIELDS = ("requests", "tokens", "input_tokens", "output_tokens", "requests_day", "tokens_day")


def rfc3339(offset_s: float, *, at: float = NOW) -> str:
    return datetime.fromtimestamp(at + offset_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def B(limit: float | None, remaining: float | None, reset_s: float | None, window_s: float, header: str) -> Budget:
    return Budget(limit, remaining, reset_s, window_s, header)


OPENAI = {
    **BASE,
    "date": DATE,
    "openai-processing-ms": "312",
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-limit-tokens": "800000",
    "x-ratelimit-limit-tokens_usage_based": "800000",
    "x-ratelimit-remaining-requests": "4999",
    "x-ratelimit-remaining-tokens": "799980",
    "x-ratelimit-remaining-tokens_usage_based": "799980",
    "x-ratelimit-reset-requests": "12ms",
    "x-ratelimit-reset-tokens": "1ms",
}
OPENAI_READ = RateHeaders(
    requests=B(5000, 4999, 0.012, 60, "x-ratelimit-limit-requests"),
    tokens=B(800000, 799980, 0.001, 60, "x-ratelimit-limit-tokens"),
)

# The server's clock runs 5 minutes behind ours: resets must be read against its Date, not our clock.
SKEW = -300.0
ANTHROPIC = {
    **BASE,
    "Date": formatdate(NOW + SKEW, usegmt=True),
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": rfc3339(SKEW + 2),
    "anthropic-ratelimit-tokens-limit": "480000",
    "anthropic-ratelimit-tokens-remaining": "479000",
    "anthropic-ratelimit-tokens-reset": rfc3339(SKEW + 1),
    "anthropic-ratelimit-input-tokens-limit": "400000",
    "anthropic-ratelimit-input-tokens-remaining": "400000",
    "anthropic-ratelimit-input-tokens-reset": rfc3339(SKEW),
    "anthropic-ratelimit-output-tokens-limit": "80000",
    "anthropic-ratelimit-output-tokens-remaining": "79000",
    "anthropic-ratelimit-output-tokens-reset": rfc3339(SKEW + 45),
}
ANTHROPIC_READ = RateHeaders(
    requests=B(4000, 3999, 2.0, 60, "anthropic-ratelimit-requests-limit"),
    tokens=B(480000, 479000, 1.0, 60, "anthropic-ratelimit-tokens-limit"),
    input_tokens=B(400000, 400000, 0.0, 60, "anthropic-ratelimit-input-tokens-limit"),
    output_tokens=B(80000, 79000, 45.0, 60, "anthropic-ratelimit-output-tokens-limit"),
)

GROQ = {
    **BASE,
    "x-ratelimit-limit-requests": "14400",
    "x-ratelimit-limit-tokens": "6000",
    "x-ratelimit-remaining-requests": "14370",
    "x-ratelimit-remaining-tokens": "5997",
    "x-ratelimit-reset-requests": "2m59.56s",
    "x-ratelimit-reset-tokens": "7.66s",
}
GROQ_READ = RateHeaders(
    requests_day=B(14400, 14370, 179.56, 86400, "x-ratelimit-limit-requests"),
    tokens=B(6000, 5997, 7.66, 60, "x-ratelimit-limit-tokens"),
)
# Only one request used today: the daily counter is full again in 6 s.
GROQ_FRESH = {**GROQ, "x-ratelimit-remaining-requests": "14399", "x-ratelimit-reset-requests": "6s"}

TOGETHER = {
    **BASE,
    "x-ratelimit-limit": "100",
    "x-ratelimit-limit-dynamic": "100",
    "x-ratelimit-remaining": "99",
    "x-ratelimit-reset": "1",
    "x-tokenlimit-limit": "33333",
    "x-tokenlimit-remaining": "33000",
}
TOGETHER_READ = RateHeaders(
    requests=B(100, 99, 1.0, 1, "x-ratelimit-limit"),
    tokens=B(33333, 33000, None, 1, "x-tokenlimit-limit"),
)

FIREWORKS = {**BASE, "X-Ratelimit-Limit-Tokens-Prompt": "60000", "X-Ratelimit-Limit-Tokens-Generated": "600"}
FIREWORKS_READ = RateHeaders(
    input_tokens=B(60000, None, None, 1, "x-ratelimit-limit-tokens-prompt"),
    output_tokens=B(600, None, None, 1, "x-ratelimit-limit-tokens-generated"),
)

CEREBRAS = {
    **BASE,
    "x-ratelimit-limit-requests-day": "14400",
    "x-ratelimit-limit-tokens-minute": "60000",
    "x-ratelimit-remaining-requests-day": "14399",
    "x-ratelimit-remaining-tokens-minute": "59900",
    "x-ratelimit-reset-requests-day": "33011.382867",
    "x-ratelimit-reset-tokens-minute": "11.382867",
}
CEREBRAS_READ = RateHeaders(
    tokens=B(60000, 59900, 11.382867, 60, "x-ratelimit-limit-tokens-minute"),
    requests_day=B(14400, 14399, 33011.382867, 86400, "x-ratelimit-limit-requests-day"),
)

# OpenRouter, on a 429 only; reset is an epoch in milliseconds.
OPENROUTER = {
    **BASE,
    "X-RateLimit-Limit": "20",
    "X-RateLimit-Remaining": "0",
    "X-RateLimit-Reset": str(int((NOW + 42) * 1000)),
}
OPENROUTER_READ = RateHeaders(requests=B(20, 0, 42.0, 60, "x-ratelimit-limit"))
# Its free-model daily cap: the reset is hours away, so this is a stop signal, not 50 per minute.
OPENROUTER_DAILY = {**OPENROUTER, "X-RateLimit-Limit": "50", "X-RateLimit-Reset": str(int((NOW + 8 * 3600) * 1000))}
OPENROUTER_DAILY_READ = RateHeaders(requests_day=B(50, 0, 8 * 3600.0, 86400, "x-ratelimit-limit"))

AZURE = {
    **BASE,
    "x-ratelimit-limit-requests": "120",
    "x-ratelimit-limit-tokens": "120000",
    "x-ratelimit-remaining-requests": "19",  # a 10 s bucket: meaningless per minute
    "x-ratelimit-remaining-tokens": "119500",
}
AZURE_READ = RateHeaders(
    requests=B(120, None, None, 60, "x-ratelimit-limit-requests"),
    tokens=B(120000, 119500, None, 60, "x-ratelimit-limit-tokens"),
)
AZURE_OLD = {**BASE, "x-ratelimit-remaining-requests": "19", "x-ratelimit-remaining-tokens": "119500"}
AZURE_OLD_READ = RateHeaders(tokens=B(None, 119500, None, 60, "x-ratelimit-remaining-tokens"))
AZURE_RESPONSES = {
    **BASE,
    "x-ratelimit-limit-requests": "-1",
    "x-ratelimit-remaining-requests": "-1",
    "x-ratelimit-reset-requests": "0",
    "x-ratelimit-limit-tokens": "-1",
    "x-ratelimit-remaining-tokens": "-1",
    "x-ratelimit-reset-tokens": "0",
}

LITELLM = {
    **BASE,
    "x-ratelimit-limit-requests": "600",
    "x-ratelimit-remaining-requests": "598",
    "x-ratelimit-limit-tokens": "100000",
    "x-ratelimit-remaining-tokens": "99000",
}
LITELLM_READ = RateHeaders(
    requests=B(600, 598, None, 60, "x-ratelimit-limit-requests"),
    tokens=B(100000, 99000, None, 60, "x-ratelimit-limit-tokens"),
)

# An unknown compatible server whose request limit is daily-style: a reset of hours must never become a pace.
UNKNOWN_LONG = {
    **BASE,
    "x-ratelimit-limit-requests": "1000",
    "x-ratelimit-remaining-requests": "990",
    "x-ratelimit-reset-requests": "3h0m0s",
    "x-ratelimit-limit-tokens": "200000",
    "x-ratelimit-remaining-tokens": "150000",
    "x-ratelimit-reset-tokens": "30s",
}
UNKNOWN_LONG_READ = RateHeaders(
    tokens=B(200000, 150000, 30.0, 60, "x-ratelimit-limit-tokens"),
    requests_day=B(1000, 990, 10800.0, 86400, "x-ratelimit-limit-requests"),
)


@pytest.mark.parametrize(
    ("headers", "dialect", "expected"),
    [
        pytest.param(OPENAI, "openai", OPENAI_READ, id="openai"),
        pytest.param(OPENAI, "auto", OPENAI_READ, id="openai-auto"),
        pytest.param({k.upper(): v for k, v in OPENAI.items()}, "auto", OPENAI_READ, id="openai-upper-case"),
        pytest.param(ANTHROPIC, "anthropic", ANTHROPIC_READ, id="anthropic-skewed-clock"),
        pytest.param(ANTHROPIC, "auto", ANTHROPIC_READ, id="anthropic-auto"),
        pytest.param(GROQ, "groq", GROQ_READ, id="groq"),
        # Behind an unknown proxy Groq's daily requests look like OpenAI's per-minute ones (a reset of
        # minutes, as OpenAI's own 6m0s example): read as a pace, which the 429s then correct.
        pytest.param(
            GROQ,
            "auto",
            RateHeaders(requests=B(14400, 14370, 179.56, 60, "x-ratelimit-limit-requests"), tokens=GROQ_READ.tokens),
            id="groq-auto-minutes-reset-is-per-minute",
        ),
        pytest.param(
            {"x-ratelimit-limit-tokens": "150000", "x-ratelimit-remaining-tokens": "149984", "x-ratelimit-reset-tokens": "6m0s"},
            "openai",
            RateHeaders(tokens=B(150000, 149984, 360.0, 60, "x-ratelimit-limit-tokens")),
            id="openai-doc-example-6m-reset-is-per-minute",
        ),
        pytest.param(
            GROQ_FRESH,
            "groq",
            RateHeaders(
                requests_day=B(14400, 14399, 6.0, 86400, "x-ratelimit-limit-requests"),
                tokens=GROQ_READ.tokens,
            ),
            id="groq-short-reset-still-daily",
        ),
        pytest.param(TOGETHER, "together", TOGETHER_READ, id="together"),
        pytest.param(TOGETHER, "auto", TOGETHER_READ, id="together-auto"),
        pytest.param(FIREWORKS, "fireworks", FIREWORKS_READ, id="fireworks"),
        pytest.param(FIREWORKS, "auto", FIREWORKS_READ, id="fireworks-auto"),
        pytest.param(CEREBRAS, "cerebras", CEREBRAS_READ, id="cerebras"),
        pytest.param(CEREBRAS, "auto", CEREBRAS_READ, id="cerebras-auto"),
        pytest.param(OPENROUTER, "openrouter", OPENROUTER_READ, id="openrouter"),
        pytest.param(OPENROUTER, "auto", OPENROUTER_READ, id="openrouter-auto-epoch-ms"),
        pytest.param(OPENROUTER_DAILY, "openrouter", OPENROUTER_DAILY_READ, id="openrouter-daily"),
        pytest.param(OPENROUTER_DAILY, "auto", OPENROUTER_DAILY_READ, id="openrouter-daily-auto"),
        pytest.param(
            {**BASE, "x-ratelimit-limit": "20", "x-ratelimit-remaining": "7"},
            "openrouter",
            RateHeaders(requests=B(20, 7, None, 60, "x-ratelimit-limit")),
            id="openrouter-no-reset",
        ),
        pytest.param(
            {**BASE, "x-ratelimit-limit": "20", "x-ratelimit-remaining": "7"},
            "auto",
            RateHeaders(requests=B(20, 7, None, 60, "x-ratelimit-limit")),
            id="bare-auto-no-reset-per-minute",
        ),
        pytest.param(
            {**BASE, "x-ratelimit-limit": "20", "x-ratelimit-remaining": "7", "x-ratelimit-reset": "1"},
            "auto",
            RateHeaders(requests=B(20, 7, 1.0, 1, "x-ratelimit-limit")),
            id="bare-auto-short-reset-per-second",
        ),
        pytest.param(
            {**BASE, "x-ratelimit-limit": "20", "x-ratelimit-remaining": "7", "x-ratelimit-reset": "3600"},
            "auto",
            RateHeaders(requests_day=B(20, 7, 3600.0, 86400, "x-ratelimit-limit")),
            id="bare-auto-long-reset-daily",
        ),
        pytest.param(AZURE, "azure", AZURE_READ, id="azure"),
        pytest.param(
            AZURE,
            "auto",
            RateHeaders(requests=B(120, 19, None, 60, "x-ratelimit-limit-requests"), tokens=AZURE_READ.tokens),
            id="azure-as-auto-keeps-remaining",
        ),
        pytest.param(AZURE_OLD, "azure", AZURE_OLD_READ, id="azure-remaining-only"),
        pytest.param(AZURE_RESPONSES, "azure", None, id="azure-responses-minus-one"),
        pytest.param(AZURE_RESPONSES, "auto", None, id="azure-responses-minus-one-auto"),
        pytest.param(LITELLM, "litellm", LITELLM_READ, id="litellm-no-reset"),
        pytest.param(UNKNOWN_LONG, "auto", UNKNOWN_LONG_READ, id="unknown-long-reset-daily"),
        pytest.param(UNKNOWN_LONG, "litellm", UNKNOWN_LONG_READ, id="litellm-upstream-long-reset"),
        pytest.param(
            {
                **BASE,
                "x-ratelimit-limit-requests": "6000",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1m0.001s",
            },
            "auto",
            RateHeaders(requests=B(6000, 0, 60.001, 60, "x-ratelimit-limit-requests")),
            id="just-emptied-minute-rounded-up",
        ),
        pytest.param(BASE, "auto", None, id="no-rate-headers"),
        pytest.param({}, "openai", None, id="empty"),
    ],
)
def test_provider_header_sets(headers: dict[str, str], dialect: Dialect, expected: RateHeaders | None) -> None:
    assert parse_rate_headers(headers, dialect, now=NOW) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            {"x-ratelimit-limit-requests": "abc", "x-ratelimit-remaining-requests": "NaN", "x-ratelimit-reset-requests": "soon"},
            None,
            id="non-numeric",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": "inf", "x-ratelimit-remaining-requests": "1e309"},
            None,
            id="infinite",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": "0", "x-ratelimit-remaining-requests": "5"},
            RateHeaders(requests=B(None, 5, None, 60, "x-ratelimit-remaining-requests")),
            id="zero-limit-keeps-remaining",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "250", "x-ratelimit-reset-requests": "soon"},
            RateHeaders(requests=B(100, 100, None, 60, "x-ratelimit-limit-requests")),
            id="remaining-above-limit-clamped",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "-3"},
            RateHeaders(requests=B(100, None, None, 60, "x-ratelimit-limit-requests")),
            id="negative-remaining-unknown",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": " 100.5 ", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "-1"},
            RateHeaders(requests=B(100.5, 0, None, 60, "x-ratelimit-limit-requests")),
            id="padded-fractional-limit-and-minus-one-reset",
        ),
        pytest.param(
            {"x-ratelimit-limit-requests": "100", "x-ratelimit-reset-requests": "9999999h"},
            RateHeaders(requests_day=B(100, None, 86400.0, 86400, "x-ratelimit-limit-requests")),
            id="huge-reset-clamped-to-a-day",
        ),
        pytest.param({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset": "5"}, None, id="reset-only"),
        pytest.param({"x-ratelimit-limit-tokens_usage_based": "5"}, None, id="unknown-name-with-prefix"),
        pytest.param(
            {"x-ratelimit-limit-requests": "100", "X-RATELIMIT-LIMIT-REQUESTS": "200"},
            RateHeaders(requests=B(100, None, None, 60, "x-ratelimit-limit-requests")),
            id="repeated-name-first-wins",
        ),
        pytest.param(
            {
                "x-ratelimit-limit-tokens-second": "1000",
                "x-ratelimit-limit-tokens-minute": "50000",
                "x-ratelimit-remaining-tokens-minute": "49000",
            },
            RateHeaders(tokens=B(50000, 49000, None, 60, "x-ratelimit-limit-tokens-minute")),
            id="two-windows-keep-the-tighter",
        ),
        pytest.param(
            {"anthropic-ratelimit-tokens-limit": "-1", "anthropic-ratelimit-tokens-remaining": "x", "Date": "yesterday"},
            None,
            id="anthropic-garbage",
        ),
        pytest.param(
            {
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": rfc3339(20),
                "Date": "not a date",
            },
            RateHeaders(requests=B(50, 0, 20.0, 60, "anthropic-ratelimit-requests-limit")),
            id="anthropic-unreadable-date-uses-now",
        ),
    ],
)
def test_nonsense_is_dropped(headers: dict[str, str], expected: RateHeaders | None) -> None:
    assert parse_rate_headers(headers, "auto", now=NOW) == expected


def test_auto_cannot_tell_groq_days_from_minutes() -> None:
    """A known limit of auto mode: Groq's daily requests with a short reset look like OpenAI's per minute.
    dialect_for() names Groq by its host, so auto only meets Groq behind an unknown proxy."""
    seen = parse_rate_headers(GROQ_FRESH, "auto", now=NOW)
    assert seen is not None and seen.requests is not None and seen.requests_day is None
    assert seen.requests.window_s == 60


def test_aiohttp_headers_are_case_insensitive() -> None:
    proxy = CIMultiDictProxy(CIMultiDict([(k.title(), v) for k, v in OPENAI.items()]))
    assert parse_rate_headers(proxy, "openai", now=NOW) == OPENAI_READ


def test_per_minute_scales_the_window() -> None:
    together = parse_rate_headers(TOGETHER, "together", now=NOW)
    fireworks = parse_rate_headers(FIREWORKS, "fireworks", now=NOW)
    cerebras = parse_rate_headers(CEREBRAS, "cerebras", now=NOW)
    assert together is not None and fireworks is not None and cerebras is not None
    assert together.requests is not None and together.requests.per_minute == 6000
    assert fireworks.input_tokens is not None and fireworks.input_tokens.per_minute == 3_600_000
    assert fireworks.output_tokens is not None and fireworks.output_tokens.per_minute == 36_000
    assert cerebras.requests_day is not None and cerebras.requests_day.per_minute == 10
    assert B(None, 3, None, 60, "h").per_minute is None


def test_skew_is_measured_on_the_server_clock() -> None:
    """Our clock is 5 min ahead of the server's: against our clock every reset would be in the past (0)."""
    without_date = {k: v for k, v in ANTHROPIC.items() if k != "Date"}
    skewed = parse_rate_headers(without_date, "anthropic", now=NOW)
    assert skewed is not None and skewed.output_tokens is not None and skewed.output_tokens.reset_s == 0
    fixed = parse_rate_headers(ANTHROPIC, "anthropic", now=NOW)
    assert fixed is not None and fixed.output_tokens is not None and fixed.output_tokens.reset_s == 45


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1m30.5s", 90.5),
        ("20ms", 0.02),
        ("0s", 0.0),
        ("0", 0.0),
        ("2m59.56s", 179.56),
        ("7.66s", 7.66),
        ("1h2m3s", 3723.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),  # micro sign
        ("500μs", 0.0005),  # Greek mu
        ("250ns", 2.5e-7),
        ("1.5", 1.5),
        (" 15m ", 900.0),
        ("900", 900.0),
        (".5s", 0.5),
        ("-1", None),
        ("-1s", None),
        ("soon", None),
        ("", None),
        ("1e309", None),
        ("nan", None),
        ("inf", None),
        ("s", None),
        ("1m-3s", None),
        ("1 s", None),
        ("10d", None),
        ("1S", None),
    ],
)
def test_parse_duration(value: str, seconds: float | None) -> None:
    got = parse_duration(value)
    assert got == (None if seconds is None else pytest.approx(seconds, rel=1e-12))


@pytest.mark.parametrize(
    ("value", "server_date", "seconds"),
    [
        ("6m0s", None, 360.0),
        ("1m30.5s", DATE, 90.5),
        ("20ms", None, 0.02),
        ("0s", None, 0.0),
        ("2m59.56s", None, 179.56),
        ("7.66s", None, 7.66),
        ("1h2m3s", None, 3723.0),
        ("500us", None, 0.0005),
        ("1.5", None, 1.5),
        ("2025-08-21T12:40:59Z", None, 59.0),
        ("2025-08-21T14:40:59+02:00", None, 59.0),
        ("2025-08-21T12:40:59.532Z", None, 59.532),
        ("2025-08-21T12:40:59.123456789Z", None, 59.123456),  # beyond microseconds is cut
        ("2025-08-21t12:40:59z", None, 59.0),
        ("2025-08-21T12:39:00Z", None, 0.0),  # in the past
        ("2025-08-21T12:40:59Z", "Thu, 21 Aug 2025 12:40:30 GMT", 29.0),  # the server's clock is 30 s ahead
        ("2025-08-21T12:40:59Z", "Thu, 21 Aug 2025 12:35:00 GMT", 359.0),  # ... or 5 min behind
        ("2025-08-21T12:40:59Z", "garbage", 59.0),  # unreadable Date: our clock
        ("Thu, 21 Aug 2025 12:41:00 GMT", None, 60.0),
        ("Thu, 21 Aug 2025 12:41:00 GMT", "Thu, 21 Aug 2025 12:40:50 GMT", 10.0),
        (str(int(NOW + 30)), None, 30.0),  # epoch seconds
        (f"{(NOW + 30.5) * 1000:.0f}", None, 30.5),  # epoch milliseconds
        (str(int(NOW - 100)), None, 0.0),
        (str(int(NOW + 30)), "Thu, 21 Aug 2025 12:40:10 GMT", 20.0),  # an epoch is an instant on the server's clock too
        ("-1", None, None),
        ("soon", None, None),
        ("", None, None),
        ("1e309", None, None),
        ("2025-13-45T99:99:99Z", None, None),
        ("Thu, 99 Foo 2025", None, None),
    ],
)
def test_parse_reset(value: str, server_date: str | None, seconds: float | None) -> None:
    got = parse_reset(value, server_date=server_date, now=NOW)
    assert got == (None if seconds is None else pytest.approx(seconds, abs=1e-6))


@pytest.mark.parametrize(
    ("base_url", "provider", "dialect"),
    [
        ("https://api.groq.com/openai/v1", "openai", "groq"),
        ("https://api.together.xyz/v1", "openai", "together"),
        ("https://api.together.ai/v1", "openai", "together"),
        ("https://api.fireworks.ai/inference/v1", "openai", "fireworks"),
        ("https://api.cerebras.ai/v1", "openai", "cerebras"),
        ("https://openrouter.ai/api/v1", "openai", "openrouter"),
        ("https://my-res.openai.azure.com/openai/deployments/gpt-4o", "openai", "azure"),
        ("https://my-res.cognitiveservices.azure.com/openai", "openai", "azure"),
        ("https://gateway.example.com/v1", "azure", "azure"),
        ("https://api.anthropic.com/v1", "anthropic", "anthropic"),
        ("http://localhost:8080", "anthropic", "anthropic"),
        ("https://api.openai.com/v1", "openai", "openai"),
        ("http://localhost:8000/v1", "openai", "auto"),  # vLLM, llama.cpp, a proxy: "openai" is only the wire format
        ("http://localhost:4000", "litellm", "litellm"),
        ("https://API.GROQ.COM./openai/v1", "openai", "groq"),
        ("api.groq.com/openai/v1", "openai", "groq"),  # no scheme
        ("https://notgroq.com/v1", "openai", "auto"),
        ("https://groq.com.evil.example/v1", "openai", "auto"),
        ("http://[::1", "openai", "auto"),
        ("", "modelslab", "auto"),
    ],
)
def test_dialect_for(base_url: str, provider: str, dialect: Dialect) -> None:
    assert dialect_for(base_url, provider) == dialect


# --- properties ----------------------------------------------------------------------------------

KNOWN_NAMES = sorted(
    {
        *OPENAI,
        *ANTHROPIC,
        *GROQ,
        *TOGETHER,
        *(k.lower() for k in FIREWORKS),
        *CEREBRAS,
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-tokenlimit-reset",
        "x-ratelimit-limit-requests-second",
        "x-ratelimit-remaining-tokens-day",
        "x-ratelimit-limit-tokens-day",
        "x-ratelimit-reset-tokens-prompt",
        "x-ratelimit-remaining-tokens-generated",
        "date",
        "retry-after",
    }
)


def _recase(name: str, flips: list[bool]) -> str:
    """The name with the letters whose flip is set in upper case (letters past the flips unchanged)."""
    return "".join(c.upper() if i < len(flips) and flips[i] else c for i, c in enumerate(name))


known_names = st.builds(_recase, st.sampled_from(KNOWN_NAMES), st.lists(st.booleans(), max_size=40))
junk_names = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["x-ratelimit-", "anthropic-ratelimit-", "x-tokenlimit-", "X-RateLimit-Junk", "ratelimit-", ""]),
)
numbers = st.one_of(
    st.integers(-(10**12), 10**14).map(str),
    st.integers(0, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
values = st.one_of(
    numbers,
    st.floats(-1e6, 1e6).map(lambda x: f"{x}s"),
    st.sampled_from(["-1", "0", "NaN", "inf", "1e309", "12ms", "6m0s", "2m59.56s", "", " ", "soon", DATE, "1µs"]),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: formatdate(d.timestamp(), usegmt=True)),
    st.text(max_size=30),
)
# Mostly known names with mostly numbers, so that most examples reach the parsing, plus junk around them.
header_sets = st.builds(
    lambda known, junk: {**junk, **known},
    st.dictionaries(known_names, st.one_of(numbers, values), max_size=10),
    st.dictionaries(junk_names, values, max_size=4),
)
dialects = st.sampled_from(get_args(Dialect))


def _check(seen: RateHeaders | None, headers: dict[str, str]) -> None:
    if seen is None:
        return
    budgets = [getattr(seen, f) for f in FIELDS]
    assert any(b is not None for b in budgets), "an empty RateHeaders must be None"
    lowered = {k.lower() for k in headers}
    for b in budgets:
        if b is None:
            continue
        assert b.limit is not None or b.remaining is not None
        if b.limit is not None:
            assert math.isfinite(b.limit) and b.limit > 0
        if b.remaining is not None:
            assert math.isfinite(b.remaining) and b.remaining >= 0
            assert b.limit is None or b.remaining <= b.limit
        if b.reset_s is not None:
            assert 0 <= b.reset_s <= 86400
        assert b.window_s in (1, 60, 86400)
        assert b.header in lowered
    for daily in (seen.requests_day, seen.tokens_day):
        assert daily is None or daily.window_s == 86400, "a daily-style budget must never look like a pace"


@settings(max_examples=200, deadline=None)
@given(headers=header_sets, dialect=dialects, now=st.floats(0, 4e9))
def test_never_raises_and_every_value_is_sane(headers: dict[str, str], dialect: Dialect, now: float) -> None:
    _check(parse_rate_headers(headers, dialect, now=now), headers)


@settings(max_examples=100, deadline=None)
@given(
    base=st.sampled_from([OPENAI, ANTHROPIC, GROQ, TOGETHER, FIREWORKS, CEREBRAS, OPENROUTER, AZURE, LITELLM]),
    flips=st.lists(st.booleans(), min_size=40, max_size=40),
    dialect=dialects,
)
def test_case_of_the_names_does_not_matter(base: dict[str, str], flips: list[bool], dialect: Dialect) -> None:
    recased = {_recase(k.lower(), flips): v for k, v in base.items()}
    assert parse_rate_headers(recased, dialect, now=NOW) == parse_rate_headers(base, dialect, now=NOW)


@given(value=st.text(max_size=40), server_date=st.one_of(st.none(), st.text(max_size=40), st.just(DATE)))
def test_duration_and_reset_never_raise(value: str, server_date: str | None) -> None:
    for got in (parse_duration(value), parse_reset(value, server_date=server_date, now=NOW)):
        assert got is None or (math.isfinite(got) and got >= 0)


@given(h=st.integers(0, 10_000), m=st.integers(0, 59), s=st.integers(0, 59), ms=st.integers(0, 999))
def test_go_durations_add_up(h: int, m: int, s: int, ms: int) -> None:
    text = f"{h}h{m}m{s}.{ms:03d}s"
    assert parse_duration(text) == pytest.approx(h * 3600 + m * 60 + s + ms / 1000, rel=1e-12)


@given(offset=st.floats(-1e6, 1e6), skew=st.integers(-3600, 3600))
def test_rfc3339_reset_is_read_on_the_server_clock(offset: float, skew: int) -> None:
    server_now = NOW + skew
    at = datetime.fromtimestamp(server_now, UTC) + timedelta(seconds=offset)
    got = parse_reset(at.isoformat(), server_date=formatdate(server_now, usegmt=True), now=NOW)
    assert got == pytest.approx(max(0.0, offset), abs=1e-5)
