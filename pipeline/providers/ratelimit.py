"""Read the rate-limit headers a provider sends into one neutral shape.

Pure and fast: no I/O, no logging, no clock unless a reset is an absolute instant.
It runs on every response, so the common case (no rate-limit header at all) costs
one pass over the header names before it returns None.

Headers are hints, never a dependency: servers have sent -1, 0, remaining above
the limit, and the same names in different units (Groq's requests are per day,
Together's per second). A value that makes no sense becomes None, a dimension
with neither a limit nor a remaining count is dropped, and a window longer than
a minute is reported in the `*_day` fields, which callers treat as a stop
signal, never as a pace.
"""

from __future__ import annotations

import email.utils
import functools
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

Dialect = Literal["auto", "openai", "azure", "anthropic", "groq", "together", "fireworks", "cerebras", "openrouter", "litellm"]

MINUTE = 60.0
DAY = 86400.0

# The longest reset a per-minute bucket can announce. Not exactly 60: a just-emptied bucket
# rounds up ("1m0.001s" from a server that never lets a client wait too little).
_MINUTE_RESET_MAX = 61.0
_DAILY_RESET_MIN = 3600.0  # under OpenAI's names, a reset longer than this means a daily limit


@dataclass(frozen=True, slots=True)
class Budget:
    """One limited dimension as the server announced it."""

    limit: float | None  # units allowed per window (None when not announced or nonsense)
    remaining: float | None  # units left now (clamped to [0, limit] when both known)
    reset_s: float | None  # seconds until the counter is back to full / the window ends (clamped to [0, 86400])
    window_s: float  # 1 (per second), 60 (per minute), 86400 (per day)
    header: str  # the header name the limit (or remaining) came from, for reports

    @property
    def per_minute(self) -> float | None:
        """The limit scaled to a minute, or None."""
        return None if self.limit is None else self.limit * MINUTE / self.window_s


@dataclass(frozen=True, slots=True)
class RateHeaders:
    requests: Budget | None = None
    tokens: Budget | None = None  # total tokens (OpenAI TPM, Anthropic "tokens")
    input_tokens: Budget | None = None  # Anthropic ITPM, Fireworks prompt tokens
    output_tokens: Budget | None = None  # Anthropic OTPM, Fireworks generated tokens
    requests_day: Budget | None = None  # daily request limits (Groq, Cerebras ...-requests-day): never paced, only a stop signal
    tokens_day: Budget | None = None


# --- which dialect a base URL speaks -------------------------------------------------------------

# Host suffixes, most specific first. Azure OpenAI also answers on the newer AI Services hosts.
_HOSTS: tuple[tuple[str, Dialect], ...] = (
    ("groq.com", "groq"),
    ("together.xyz", "together"),
    ("together.ai", "together"),
    ("fireworks.ai", "fireworks"),
    ("cerebras.ai", "cerebras"),
    ("openrouter.ai", "openrouter"),
    ("openai.azure.com", "azure"),
    ("cognitiveservices.azure.com", "azure"),
    ("services.ai.azure.com", "azure"),
    ("anthropic.com", "anthropic"),
    ("api.openai.com", "openai"),
)
# Provider names that are dialects. Not "openai": that provider means any OpenAI-compatible server (vLLM,
# llama.cpp, a proxy), so only the host api.openai.com says "openai".
_NAMED: tuple[Dialect, ...] = (
    "azure",
    "anthropic",
    "groq",
    "together",
    "fireworks",
    "cerebras",
    "openrouter",
    "litellm",
)


def dialect_for(base_url: str, provider: str) -> Dialect:
    """The header dialect of a server, from its host first (an "openai" provider pointed at Groq speaks
    Groq), then from the provider's name; "auto" when neither says."""
    url = base_url.strip()
    try:
        host = (urlsplit(url if "://" in url else "//" + url).hostname or "").rstrip(".")
    except ValueError:  # e.g. an unbalanced "[" in the host
        host = ""
    for suffix, dialect in _HOSTS:
        if host == suffix or host.endswith("." + suffix):
            return dialect
    name = provider.strip().lower()
    for dialect in _NAMED:
        if name == dialect:
            return dialect
    return "auto"


# --- durations and instants ----------------------------------------------------------------------

_NUMBER = re.compile(r"\+?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_GO_DURATION = re.compile(r"\+?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")  # µ: micro sign, μ: Greek mu
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_RFC3339_START = re.compile(r"\d{4}-\d\d-\d\d[Tt ]")
_EPOCH_S = 1e9  # 2001-09-09: a plain number above this is an instant, not a wait
_EPOCH_MS = 1e12


def parse_duration(value: str) -> float | None:
    """Seconds in a Go duration ("6m0s", "1m30.5s", "20ms", "500us"/"500µs", "1h2m3s") or a plain number of
    seconds ("1.5"); None for garbage, for a negative duration (no header means one) and for one too large to
    be a float."""
    return _duration(value.strip())


@functools.lru_cache(maxsize=4096)
def _duration(text: str) -> float | None:
    # Cached: resets repeat ("1ms", "12ms", "1s") and a hit costs a twentieth of the regular expressions.
    if _NUMBER.fullmatch(text):
        seconds = float(text)
    elif _GO_DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _GO_PART.findall(text))
    else:
        return None
    return seconds if math.isfinite(seconds) else None


class _Clock:
    """`now`, and the server's idea of now (its Date header), each read at most once and only if an
    absolute reset needs it: parsing an HTTP date costs more than the rest of a response's headers."""

    __slots__ = ("_date", "_now", "_server")

    def __init__(self, server_date: str | None, now: float | None) -> None:
        self._date = server_date
        self._now = now
        self._server: float | None = None

    def now(self) -> float:
        if self._now is None:
            self._now = time.time()
        return self._now

    def server(self) -> float:
        if self._server is None:
            # Date has a resolution of one second and is truncated, so a reset measured against it may
            # come out up to 1 s long: the safe side for a wait.
            date = _instant(self._date) if self._date else None
            self._server = date if date is not None else self.now()
        return self._server


@functools.lru_cache(maxsize=1024)
def _instant(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 instant or an HTTP-date; None for anything else. Cached: within a second,
    every response carries the same Date and mostly the same resets."""
    try:
        if _RFC3339_START.match(text):
            parsed = datetime.fromisoformat(text.replace("t", "T").replace("z", "Z"))
        elif any(c.isalpha() for c in text):  # HTTP-date: "Thu, 21 Aug 2025 12:40:59 GMT"
            parsed = email.utils.parsedate_to_datetime(text)
        else:
            return None
        if parsed.tzinfo is None:  # RFC 3339 requires an offset and "-0000" means "unknown": take UTC
            parsed = parsed.replace(tzinfo=UTC)
        stamp = parsed.timestamp()
    except (ValueError, TypeError, OverflowError, IndexError):
        return None  # parsedate_to_datetime raises more than its documentation says on junk
    return stamp if math.isfinite(stamp) else None


def _reset(value: str, clock: _Clock) -> tuple[float | None, bool]:
    """(seconds until reset, whether the header named an instant rather than a wait)."""
    text = value.strip()
    if not text:
        return None, False
    seconds = _duration(text)
    if seconds is not None:
        if seconds > _EPOCH_S and text[-1] not in "smh":  # an epoch: a plain number, never a Go duration
            return max(0.0, (seconds / 1000 if seconds > _EPOCH_MS else seconds) - clock.server()), True
        return seconds, False
    at = _instant(text)
    if at is None:
        return None, False
    return max(0.0, at - clock.server()), True


def parse_reset(value: str, *, server_date: str | None, now: float | None) -> float | None:
    """Seconds until a reset given as a Go duration or plain seconds, an RFC 3339 instant, an HTTP-date, or an
    epoch in seconds (> 1e9) or milliseconds (> 1e12). Instants are measured against the response's Date
    (the server's clock, so our clock's skew does not matter) when it is given and readable, else against
    `now` (time.time() when None). An instant in the past is 0; a negative wait ("-1", a "not known"
    sentinel) or garbage is None."""
    return _reset(value, _Clock(server_date, now))[0]


# --- one dimension -------------------------------------------------------------------------------


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class _Dim(NamedTuple):
    """The three header names of one dimension, and where it goes when its unit is not in doubt."""

    limit: str
    remaining: str
    reset: str
    field: str
    window_s: float


def _budget(
    found: Mapping[str, str], names: _Dim, reset_s: float | None, window_s: float, *, keep_remaining: bool = True
) -> Budget | None:
    limit = _number(found.get(names.limit))
    if limit is not None and limit <= 0:  # Azure's Responses API says -1; 0 would mean "nothing, ever"
        limit = None
    remaining = _number(found.get(names.remaining)) if keep_remaining else None
    if remaining is not None:
        if remaining < 0:
            remaining = None  # -1 is "not known", not "over the limit"
        elif limit is not None and remaining > limit:
            remaining = limit  # replies arrive out of order across a limit change; never more than the limit
    if limit is None and remaining is None:
        return None
    if reset_s is not None:
        reset_s = min(max(reset_s, 0.0), DAY)
    return Budget(limit, remaining, reset_s, window_s, names.limit if limit is not None else names.remaining)


def _reset_of(found: Mapping[str, str], names: _Dim, clock: _Clock) -> tuple[float | None, bool]:
    value = found.get(names.reset)
    return (None, False) if value is None else _reset(value, clock)


# --- the header families -------------------------------------------------------------------------

_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "x-tokenlimit-")

# OpenAI's names, also sent by Azure, LiteLLM, Groq, Fireworks and unknown compatible servers; the unit is
# decided per response (dialect, reset). Field and window here are the per-minute reading.
_OPENAI = tuple(
    _Dim(f"x-ratelimit-limit-{d}", f"x-ratelimit-remaining-{d}", f"x-ratelimit-reset-{d}", d, MINUTE)
    for d in ("requests", "tokens")
)
# Names whose unit is not in doubt, whatever the dialect.
_FIXED = (
    # Cerebras puts the window in the name ("-second" is not seen yet but costs nothing to read).
    *(
        _Dim(
            f"x-ratelimit-limit-{d}-{unit}",
            f"x-ratelimit-remaining-{d}-{unit}",
            f"x-ratelimit-reset-{d}-{unit}",
            f"{d}_day" if unit == "day" else d,
            window,
        )
        for d in ("requests", "tokens")
        for unit, window in (("second", 1.0), ("minute", MINUTE), ("day", DAY))
    ),
    # Fireworks: the effective limits in tokens per second (enforced per minute, but the figure is per second).
    *(
        _Dim(
            f"x-ratelimit-limit-tokens-{kind}",
            f"x-ratelimit-remaining-tokens-{kind}",
            f"x-ratelimit-reset-tokens-{kind}",
            field,
            1.0,
        )
        for kind, field in (("prompt", "input_tokens"), ("generated", "output_tokens"))
    ),
    # Anthropic: per minute; resets are RFC 3339 instants on the server's clock.
    *(
        _Dim(
            f"anthropic-ratelimit-{d}-limit",
            f"anthropic-ratelimit-{d}-remaining",
            f"anthropic-ratelimit-{d}-reset",
            field,
            MINUTE,
        )
        for d, field in (
            ("requests", "requests"),
            ("tokens", "tokens"),
            ("input-tokens", "input_tokens"),
            ("output-tokens", "output_tokens"),
        )
    ),
)
# Together (requests per second, with x-tokenlimit-* beside them) or OpenRouter (per minute, on 429s only).
_BARE = _Dim("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "requests", MINUTE)
_TOGETHER_TOKENS = _Dim("x-tokenlimit-limit", "x-tokenlimit-remaining", "x-tokenlimit-reset", "tokens", 1.0)


def parse_rate_headers(headers: Mapping[str, str], dialect: Dialect = "auto", *, now: float | None = None) -> RateHeaders | None:
    """None when the response carries no usable rate-limit header (the common case must be fast: one cheap check
    for any known prefix before any real parsing, since this runs on every response at thousands per second)."""
    # The cheap check: every known name contains one of these, and one lower() of all the names joined costs
    # a third of a lower() per name.
    names = "\n".join(headers).lower()
    if "ratelimit-" not in names and "tokenlimit-" not in names:
        return None
    # Normalise the names once: aiohttp's CIMultiDictProxy ignores case but a plain dict does not. The first
    # of repeated names wins.
    found: dict[str, str] = {}
    date: str | None = None
    for key, value in headers.items():
        if key[:1] not in "xXaAdD":  # most names are not ours: skip them before paying for lower()
            continue
        low = key.lower()
        if low.startswith(_PREFIXES):
            if low not in found and isinstance(value, str):
                found[low] = value
        elif low == "date" and date is None and isinstance(value, str):
            date = value
    if not found:
        return None
    clock = _Clock(date, now)
    out: dict[str, Budget] = {}

    for dim in _OPENAI:
        if dim.limit not in found and dim.remaining not in found:
            continue
        reset_s = _reset_of(found, dim, clock)[0]
        requests = dim.field == "requests"
        if (dialect == "groq" and requests) or (reset_s is not None and reset_s > _DAILY_RESET_MIN):
            # Groq sends requests per day under OpenAI's per-minute name, and a reset of hours is a daily
            # cap: never a pace. Minutes are not enough to tell: OpenAI's own example sends 6m0s for a
            # per-minute token limit (the time until the bucket is back to full).
            field, window = dim.field + "_day", DAY
        else:
            field, window = dim.field, MINUTE
        # Azure's remaining-requests counts a 10 s bucket (19 left of a 120 RPM deployment after one call):
        # no per-minute sense can be made of it; the limit is still good.
        keep = not (requests and dialect == "azure")
        _put(out, field, _budget(found, dim, reset_s, window, keep_remaining=keep))

    for dim in _FIXED:
        if dim.limit in found or dim.remaining in found:
            _put(out, dim.field, _budget(found, dim, _reset_of(found, dim, clock)[0], dim.window_s))

    together = dialect == "together" or _TOGETHER_TOKENS.limit in found or _TOGETHER_TOKENS.remaining in found
    if _BARE.limit in found or _BARE.remaining in found:
        reset = _reset_of(found, _BARE, clock)
        field, window = _bare_window(dialect, together, reset)
        _put(out, field, _budget(found, _BARE, reset[0], window))
    if together and (_TOGETHER_TOKENS.limit in found or _TOGETHER_TOKENS.remaining in found):
        dim = _TOGETHER_TOKENS
        _put(out, dim.field, _budget(found, dim, _reset_of(found, dim, clock)[0], dim.window_s))

    if not out:
        return None
    return RateHeaders(
        requests=out.get("requests"),
        tokens=out.get("tokens"),
        input_tokens=out.get("input_tokens"),
        output_tokens=out.get("output_tokens"),
        requests_day=out.get("requests_day"),
        tokens_day=out.get("tokens_day"),
    )


def _bare_window(dialect: str, together: bool, reset: tuple[float | None, bool]) -> tuple[str, float]:
    """Where bare x-ratelimit-{limit,remaining,reset} go. Together: per second. OpenRouter: per minute, unless
    the reset is further off than a minute (its free-model daily cap). Otherwise (auto) the reset decides:
    an instant (epoch ms) is OpenRouter's, a short wait Together's, a long one a daily-style limit; with no
    usable reset, per minute (OpenRouter's documented case, and the reading of most generic gateways)."""
    seconds, absolute = reset
    if together:
        return "requests", 1.0
    if seconds is not None and seconds > _MINUTE_RESET_MAX:
        return "requests_day", DAY
    if dialect == "openrouter" or seconds is None or absolute:
        return "requests", MINUTE
    return "requests", 1.0


def _put(out: dict[str, Budget], field: str, budget: Budget | None) -> None:
    """Two families naming the same dimension (say Cerebras' per-second and per-minute tokens): keep the tighter,
    since the pace must respect both."""
    if budget is None:
        return
    old = out.get(field)
    if old is None:
        out[field] = budget
        return
    new_rate, old_rate = budget.per_minute, old.per_minute
    if new_rate is not None and (old_rate is None or new_rate < old_rate):
        out[field] = budget
