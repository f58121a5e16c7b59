"""Conversations as data: a messages column where some messages carry an optional field (name) and
others do not. polars fills the missing ones with null; the fake server refuses a null field as OpenAI
does, so these runs fail unless no null field is sent."""

from __future__ import annotations

import json
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.config import RunConfig
from pipeline.engines.prepared import prepare
from pipeline.plan import renderer_for
from pipeline.requests import prompts
from tests.conftest import chat_requests, run_cli
from tests.fakeserver import FakeLLMServer, _null_field

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello, I am Ada.", "name": "ada"}, {"role": "user", "content": "And I am nobody."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": 'Quote this: {"k": null}', "name": "bob"}],
]


def sent_messages(server: FakeLLMServer) -> list[list[dict[str, Any]]]:
    return sorted((r.body["messages"] for r in chat_requests(server)), key=lambda m: orjson.dumps(m))


def expected() -> list[list[dict[str, Any]]]:
    return sorted(CONVERSATIONS, key=lambda m: orjson.dumps(m))


def check(server: FakeLLMServer, out: pl.DataFrame) -> None:
    assert set(out["status"]) == {"ok"}, out["error"].to_list()
    assert sent_messages(server) == expected()  # names kept where given, no "name": null where not
    for request in chat_requests(server):
        assert _null_field(request.body["messages"], "messages") is None
        assert request.status == 200


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_messages_column_from_a_file_sends_no_null_fields(server: FakeLLMServer, fmt: str) -> None:
    rows = [{"id": i, "conversation": c} for i, c in enumerate(CONVERSATIONS)]
    if fmt == "jsonl":
        with open("in.jsonl", "wb") as f:
            f.writelines(orjson.dumps(r) + b"\n" for r in rows)
    else:
        pl.DataFrame(rows).write_parquet("in.parquet")
    read = pl.read_ndjson("in.jsonl") if fmt == "jsonl" else pl.read_parquet("in.parquet")
    # The shape that makes nulls: one struct type for every message, "name" null where a message has none.
    assert read["conversation"].dtype == pl.List(pl.Struct({"role": pl.String, "content": pl.String, "name": pl.String}))
    result = run_cli(
        "run", "-i", f"in.{fmt}", "-o", "out/result.parquet", "--messages-column", "conversation",
        "--base-url", f"{server.url}/v1", "-m", "fake-model", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    check(server, pl.read_parquet("out/result.parquet"))


def test_messages_column_from_a_dataframe_sends_no_null_fields(server: FakeLLMServer) -> None:
    df = pl.DataFrame({"conversation": CONVERSATIONS})
    out = pipeline.complete(df, messages_column="conversation", base_url=f"{server.url}/v1", model="m", progress=False)
    check(server, out)


def test_a_null_field_in_json_text_cells_is_dropped_and_strings_are_untouched() -> None:
    cells = [
        '[{"role": "user", "content": "a, ", "name": null}]',
        '[{"name":null,"role":"user","content":"x, \\"a\\":null"}]',
        '[{"role":"user","content":[{"type":"text","text":"t","cache_control":null}]}]',
    ]
    renderer = renderer_for(RunConfig(messages_column="c", model="m"))
    p = prepare(pl.DataFrame({"c": cells}), renderer, pl.DataFrame())
    assert [orjson.loads(x) for x in p.prompts] == [
        [{"role": "user", "content": "a, "}],
        [{"role": "user", "content": 'x, "a":null'}],
        [{"role": "user", "content": [{"type": "text", "text": "t"}]}],
    ]
    assert p.skip == [None, None, None]


def test_text_that_looks_like_a_null_member_is_not_cut() -> None:
    """A string ending in a comma or a brace, then one beginning with ': null', looks like a member to
    the vectorised patterns; such rows are rewritten exactly instead."""
    conversations = [
        [{"role": "user", "content": ["x,", ": null"], "name": None}],
        [{"role": "user", "content": ["a{", ": null", "b"]}],
        [{"role": "user", "content": "a{", "k": None, ": null,": 1}],
        [{"role": "user", "content": "ok", 'na"me': None}],  # a key with an escape
    ]
    cells = [orjson.dumps(c).decode() for c in conversations]
    p = prepare(pl.DataFrame({"c": cells}), renderer_for(RunConfig(messages_column="c", model="m")), pl.DataFrame())
    assert [orjson.loads(x) for x in p.prompts] == [_without_nulls(c) for c in conversations]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return [_without_nulls(v) for v in value] if isinstance(value, list) else value


_text = st.lists(st.sampled_from([*',{}[]: "\\nul', "null", ": null", ", ", "é", "\t"]), max_size=6).map("".join)
_value = st.recursive(
    st.none() | st.booleans() | st.integers(-9, 9) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_text, _value, max_size=4), min_size=1, max_size=3), st.booleans())
def test_every_null_member_and_nothing_else_is_dropped(messages: list[dict[str, Any]], spaced: bool) -> None:
    text = json.dumps(messages, ensure_ascii=False) if spaced else orjson.dumps(messages).decode()
    got = prompts._without_nulls(pl.Series("p", [text])).item()
    assert orjson.loads(got) == _without_nulls(messages)


def test_the_fake_server_refuses_a_null_field_as_openai_does(server: FakeLLMServer) -> None:
    """The check these tests rely on: the old behaviour (sending "name": null) fails here."""
    import urllib.error
    import urllib.request

    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi", "name": None}]})
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert "messages[0].name" in caught.value.read().decode()
