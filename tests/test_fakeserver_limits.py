"""The fake server's provider-like limits: rate headers, token window, slots, schedule, timeline."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakeserver import FakeLLMServer, _go_duration

OPENAI, ANTHROPIC, MODELSLAB = "/v1/chat/completions", "/v1/messages", "/api/v7/llm/chat/completions"
_GO = re.compile(r"(?:(?P<ms>\d+)ms|(?:(?P<m>\d+)m)?(?P<s>\d+(?:\.\d+)?)s)")


@dataclass
class Answer:
    status: int
    headers: Message  # case-insensitive lookups
    body: Any


def chat_body(path: str, text: str = "hello there", *, max_tokens: int | None = None, model: str = "m1") -> dict[str, Any]:
    body: dict[str, Any] = {"model_id" if path == MODELSLAB else "model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def post(server: FakeLLMServer, path: str = OPENAI, body: Any = None, **kw: Any) -> Answer:
    """One request over a real socket; HTTP errors are answers too."""
    if body is None:
        body = chat_body(path, max_tokens=50 if path == ANTHROPIC else None, **kw)
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    req = urllib.request.Request(server.url + path, data=orjson.dumps(body), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return Answer(r.status, r.headers, orjson.loads(r.read()))
    except urllib.error.HTTPError as e:
        with e:
            return Answer(e.code, e.headers, orjson.loads(e.read()))


def get(server: FakeLLMServer, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return orjson.loads(r.read())


def seconds(go: str) -> float:
    m = _GO.fullmatch(go)
    assert m, go
    if m["ms"] is not None:
        return int(m["ms"]) / 1000
    return int(m["m"] or 0) * 60 + float(m["s"])


def instant(rfc3339: str) -> float:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z", rfc3339), rfc3339
    return datetime.fromisoformat(rfc3339).timestamp()


def fresh_second() -> None:
    """Sleep until just after a wall-clock second starts, so a short burst stays inside one second."""
    time.sleep(1.0 - time.time() % 1.0 + 0.02)


async def concurrently(server: FakeLLMServer, bodies: list[tuple[str, dict[str, Any]]], stagger: float = 0.0) -> list[int]:
    async def one(i: int, path: str, body: dict[str, Any], session: aiohttp.ClientSession) -> int:
        await asyncio.sleep(i * stagger)
        async with session.post(server.url + path, json=body) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(i, p, b, session) for i, (p, b) in enumerate(bodies))))


# ---- rate-limit headers --------------------------------------------------------------


def test_go_duration_format() -> None:
    cases = {0.0: "0s", 0.532: "532ms", 0.0004: "1ms", 1.2: "1.2s", 59.9: "59.9s", 60.0: "1m0s", 62.0: "1m2s"}
    assert {s: _go_duration(s) for s in cases} == cases
    assert [seconds(v) for v in cases.values()] == [0.0, 0.532, 0.001, 1.2, 59.9, 60.0, 62.0]


def test_openai_headers_sliding_minute_on_200_and_429() -> None:
    with FakeLLMServer(rpm=2) as server:
        first, second, third = post(server), post(server), post(server)
    assert (first.status, second.status, third.status) == (200, 200, 429)
    for a, left in ((first, "1"), (second, "0"), (third, "0")):
        assert a.headers["x-ratelimit-limit-requests"] == "2"
        assert a.headers["x-ratelimit-remaining-requests"] == left
        assert 58 < seconds(a.headers["x-ratelimit-reset-requests"]) <= 60  # the newest admitted leaves in ~60 s
        assert "x-ratelimit-limit-tokens" not in a.headers  # no tpm, no token headers
    assert 58 <= int(third.headers["Retry-After"]) <= 60


def test_openai_headers_per_second_announce_the_minute_figure() -> None:
    with FakeLLMServer(rpm=120, rate_window="second") as server:
        fresh_second()
        answers = [post(server) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
    for a in answers:
        assert a.headers["x-ratelimit-limit-requests"] == "120"  # per minute, though 2/s are enforced
        assert 0 < seconds(a.headers["x-ratelimit-reset-requests"]) < 1  # the next wall-clock second
    assert answers[2].headers["Retry-After"] == "1"


def test_headers_on_every_dialect_and_on_errors_that_consume_nothing() -> None:
    with FakeLLMServer(rpm=10, api_key="k") as server:
        denied = post(server)  # 401: never reached the window
        refused = [post(server, path) for path in (ANTHROPIC, MODELSLAB)]  # 401, and 200 {"status": "error"}
        server.api_key = None
        ok = post(server, MODELSLAB)
        invalid = post(server, MODELSLAB, {"model_id": "m1"})  # ModelsLab: validation error as HTTP 200
        counted = post(server, ANTHROPIC.replace("messages", "messages/count_tokens"), chat_body(ANTHROPIC))
    assert [a.status for a in (denied, *refused)] == [401, 401, 200]
    for a in (denied, *refused):
        assert a.headers["x-ratelimit-limit-requests"] == "10"
        assert a.headers["x-ratelimit-remaining-requests"] == "10"
        assert a.headers["x-ratelimit-reset-requests"] == "0s"  # full
    assert ok.status == 200 and ok.headers["x-ratelimit-remaining-requests"] == "9"
    assert invalid.status == 200 and invalid.body["status"] == "error"
    assert invalid.headers["x-ratelimit-remaining-requests"] == "9"
    assert counted.status == 200 and "x-ratelimit-limit-requests" not in counted.headers  # not a chat request


def test_no_headers_without_limits_or_when_turned_off() -> None:
    with FakeLLMServer() as server:
        a = post(server)
    assert a.status == 200 and not any(k.lower().startswith(("x-ratelimit", "anthropic-ratelimit")) for k in a.headers)
    with FakeLLMServer(rpm=1, tpm=1000, rate_headers="none") as server:
        answers = [post(server), post(server), post(server, MODELSLAB)]
    assert [a.status for a in answers] == [200, 429, 429]
    assert not any(k.lower().startswith("x-ratelimit") for a in answers for k in a.headers)
    assert 58 <= int(answers[1].headers["Retry-After"]) <= 60  # still told when to come back
    assert "Retry-After" not in answers[2].headers and answers[2].body["retry_after"] >= 58  # ModelsLab: body only


def test_anthropic_headers() -> None:
    with FakeLLMServer(rpm=5, tpm=1000, rate_headers="anthropic") as server:
        a = post(server, ANTHROPIC, chat_body(ANTHROPIC, "one two three", max_tokens=50))
        on_openai = post(server, OPENAI)
    assert a.status == 200
    prompt = 3 + 3  # three words + 3 per message
    expected = {
        "requests": ("5", "4"),
        "tokens": ("1000", str(1000 - prompt - 50)),
        "input-tokens": ("1000", str(1000 - prompt)),
        "output-tokens": ("1000", "950"),
    }
    date = parsedate_to_datetime(a.headers["Date"]).timestamp()
    assert abs(date - time.time()) < 5
    for name, (limit, remaining) in expected.items():
        assert a.headers[f"anthropic-ratelimit-{name}-limit"] == limit
        assert a.headers[f"anthropic-ratelimit-{name}-remaining"] == remaining
        assert 59 <= instant(a.headers[f"anthropic-ratelimit-{name}-reset"]) - date < 61  # fully replenished in ~60 s
    assert not any(k.lower().startswith("x-ratelimit") for k in a.headers)
    assert on_openai.headers["anthropic-ratelimit-requests-remaining"] == "3"  # the style, not the path, decides
    assert on_openai.headers["anthropic-ratelimit-output-tokens-remaining"] == "950"  # no max_tokens: 0 charged


def test_clock_skew_shifts_date_and_resets() -> None:
    with FakeLLMServer(rpm=10, rate_headers="anthropic", clock_skew_s=3600) as server:
        a = post(server)
        server.rate_headers = "openai"
        b = post(server)
    now = time.time()
    date = parsedate_to_datetime(a.headers["Date"]).timestamp()
    assert 3595 < date - now < 3601
    assert 59 <= instant(a.headers["anthropic-ratelimit-requests-reset"]) - date < 61
    assert 3595 < parsedate_to_datetime(b.headers["Date"]).timestamp() - now < 3601  # every answer's Date is skewed
    assert 58 < seconds(b.headers["x-ratelimit-reset-requests"]) <= 60  # durations are not


# ---- token window ----------------------------------------------------------------------


def test_token_window_charges_prompt_plus_max_tokens() -> None:
    with FakeLLMServer(tpm=100, rpm=50) as server:
        # "a b c": 3 words + 3 per message = 6 prompt tokens; + 40 max_tokens = 46 each
        first = post(server, body=chat_body(OPENAI, "a b c", max_tokens=40))
        second = post(server, body={**chat_body(OPENAI, "a b c"), "max_completion_tokens": 40})
        third = post(server, body=chat_body(OPENAI, "a b c", max_tokens=40))
        small = post(server, body=chat_body(OPENAI, "x"))  # 4 tokens, no max_tokens: fits the 8 left
    assert [a.status for a in (first, second, third, small)] == [200, 200, 429, 200]
    assert [a.headers["x-ratelimit-remaining-tokens"] for a in (first, second, third, small)] == ["54", "8", "8", "4"]
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert 58 < seconds(third.headers["x-ratelimit-reset-tokens"]) <= 60
    assert third.body["error"]["message"] == "Rate limit reached for tokens"
    assert third.body["error"]["type"] == "tokens" and third.body["error"]["code"] == "rate_limit_exceeded"
    assert 58 <= int(third.headers["Retry-After"]) <= 60
    # the rejected request took nothing from the request window either
    assert [a.headers["x-ratelimit-remaining-requests"] for a in (second, third, small)] == ["48", "48", "47"]


def test_token_window_per_second_admits_one_oversized_request() -> None:
    with FakeLLMServer(tpm=600, rate_window="second") as server:  # 10 tokens per second
        fresh_second()
        big = post(server, body=chat_body(OPENAI, "a b c", max_tokens=40))  # 46 > 10, but the second is empty
        next_one = post(server, body=chat_body(OPENAI, "x"))
        anthropic = post(server, ANTHROPIC)
    assert [big.status, next_one.status, anthropic.status] == [200, 429, 429]
    assert big.headers["x-ratelimit-limit-tokens"] == "600"
    assert big.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 0 < seconds(big.headers["x-ratelimit-reset-tokens"]) < 1
    assert next_one.headers["Retry-After"] == "1"
    assert anthropic.body["error"] == {"type": "rate_limit_error", "message": "Rate limit reached for tokens"}


# ---- in-flight message -----------------------------------------------------------------


def _in_flight_429(path: str, message: str) -> Answer:
    """The over-limit answer to a second request sent while a slow first one is in flight."""
    slow = chat_body(path, "[[fault:slow@0.3]] hold", max_tokens=50)
    with FakeLLMServer(max_in_flight=1, in_flight_message=message) as server:  # type: ignore[arg-type]

        async def both() -> Answer:
            async with aiohttp.ClientSession(headers={"anthropic-version": "2023-06-01"}) as session:
                first = asyncio.ensure_future(session.post(server.url + path, json=slow))
                await asyncio.sleep(0.1)
                async with session.post(server.url + path, json=chat_body(path, max_tokens=50)) as r:
                    answer = Answer(r.status, Message(), await r.json(content_type=None))
                async with await first as r:
                    assert r.status == 200
                return answer

        return asyncio.run(both())


def _message(answer: Answer) -> str:
    return str(answer.body["message"] if "message" in answer.body else answer.body["error"]["message"])


@pytest.mark.parametrize("path", [OPENAI, ANTHROPIC, MODELSLAB])
def test_generic_in_flight_message_names_no_number(path: str) -> None:
    answer = _in_flight_429(path, "generic")
    assert answer.status == 429
    assert _message(answer) == "Rate limit exceeded. Please try again later."


def test_named_in_flight_message_is_unchanged() -> None:
    assert _message(_in_flight_429(MODELSLAB, "named")) == "Rate limit exceeded. Maximum 1 queued requests allowed."
    assert _message(_in_flight_429(OPENAI, "named")) == "Rate limit reached for requests"


# ---- slots -----------------------------------------------------------------------------


def test_slots_queue_instead_of_rejecting() -> None:
    with FakeLLMServer(slots=2, latency=0.2) as server:
        started = time.monotonic()
        statuses = asyncio.run(concurrently(server, [(OPENAI, chat_body(OPENAI, f"row {i}")) for i in range(4)]))
        took = time.monotonic() - started
        stats = server.stats()
    assert statuses == [200] * 4
    assert stats["slot_served"] == 4 and stats["max_in_service_seen"] == 2 and stats["max_queue_seen"] == 2
    assert stats["max_in_flight_seen"] == 4 and stats["status_429"] == 0
    assert 300 <= stats["queue_wait_ms_total"] <= 1000  # two requests waited one service time (0.2 s) each
    assert took >= 0.39  # two waves of 0.2 s


def test_a_client_that_gives_up_leaves_the_queue() -> None:
    with FakeLLMServer(slots=1, latency=0.3) as server:

        async def scene() -> tuple[int, str, float]:
            async with aiohttp.ClientSession() as session:
                holder = asyncio.ensure_future(session.post(server.url + OPENAI, json=chat_body(OPENAI, "a")))
                await asyncio.sleep(0.05)
                try:  # queued behind the holder, gives up after 0.1 s
                    await session.post(server.url + OPENAI, json=chat_body(OPENAI, "b"), timeout=aiohttp.ClientTimeout(total=0.1))
                    quitter = "answered"
                except TimeoutError:
                    quitter = "gave up"
                async with await holder as r:
                    holder_status = r.status
                t = time.monotonic()  # the slot is free again: no ghost ahead in the queue
                async with session.post(server.url + OPENAI, json=chat_body(OPENAI, "c")) as r:
                    assert r.status == 200
                return holder_status, quitter, time.monotonic() - t

        holder_status, quitter, last = asyncio.run(scene())
        for _ in range(50):  # the server notices the dropped connection asynchronously
            if server.stats()["no_response"]:
                break
            time.sleep(0.02)
        stats = server.stats()
    assert (holder_status, quitter) == (200, "gave up")
    assert last < 0.6  # one service time, no wait
    assert stats["slot_served"] == 2 and stats["no_response"] == 1 and stats["status_200"] == 2


# ---- limit schedule, timeline, CLI -----------------------------------------------------


def test_limit_schedule_changes_the_announced_limit_and_restarts_at_reset() -> None:
    with FakeLLMServer(rpm=100, limit_schedule="0:600,0.4:1200") as server:
        assert server.rpm == 100  # the clock starts at the first chat request
        before = post(server)
        time.sleep(0.45)
        after = post(server)
        moved = server.rpm
        server.reset()
        restarted = post(server)
    assert before.headers["x-ratelimit-limit-requests"] == "600"
    assert after.headers["x-ratelimit-limit-requests"] == "1200" and moved == 1200
    assert restarted.headers["x-ratelimit-limit-requests"] == "600"


def test_bad_limit_schedule_fails_at_construction() -> None:
    with pytest.raises(ValueError):
        FakeLLMServer(limit_schedule="0=6000")


def test_timeline_counts_answers_in_the_second_they_were_sent() -> None:
    with FakeLLMServer(rpm=4) as server:
        assert server.timeline() == {"t0": None, "buckets": []}
        bodies = [
            (OPENAI, chat_body(OPENAI, "[[fault:slow@1.1]] late", model="m1")),  # the first request: t0, answered at t=1
            (OPENAI, chat_body(OPENAI, "a", model="m1")),
            (MODELSLAB, chat_body(MODELSLAB, "b", model="m2")),
            (OPENAI, chat_body(OPENAI, "[[fault:500x1]] c")),
            (OPENAI, chat_body(OPENAI, "d")),  # the fifth: over rpm 4
        ]
        statuses = asyncio.run(concurrently(server, bodies, stagger=0.05))
        post(server, "/v1/messages/count_tokens", chat_body(ANTHROPIC))  # not a chat request: not counted
        over_http, direct = get(server, "/timeline"), server.timeline()
        server.reset()
        cleared = server.timeline()
    assert statuses == [200, 200, 200, 500, 429]
    assert over_http == direct
    assert isinstance(direct["t0"], float)
    assert direct["buckets"] == [
        {"t": 0, "ok": 2, "429": 1, "other": 1, "ok_by_model": {"m1": 1, "m2": 1}},
        {"t": 1, "ok": 1, "429": 0, "other": 0, "ok_by_model": {"m1": 1}},
    ]
    assert cleared == {"t0": None, "buckets": []}


def test_cli_options_reach_the_server() -> None:
    script = Path(__file__).with_name("fakeserver.py")
    args = ["--port", "0", "--rpm", "60", "--tpm", "1000", "--no-ratelimit-headers", "--clock-skew-s", "-7200"]
    args += ["--limit-schedule", "0:120", "--in-flight-message", "generic", "--slots", "2"]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        url = line.split()[1]
        req = urllib.request.Request(url + OPENAI, data=orjson.dumps(chat_body(OPENAI)), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            headers = r.headers
        with urllib.request.urlopen(url + "/stats", timeout=10) as r:
            stats = orjson.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(10)
    assert not any(k.lower().startswith("x-ratelimit") for k in headers)
    assert -7205 < parsedate_to_datetime(headers["Date"]).timestamp() - time.time() < -7195
    assert stats["slot_served"] == 1
