"""Conversations as data: a messages column where some messages carry an optional field (name) and
others do not. polars fills the missing ones with null; the fake server refuses a null field as OpenAI
does, so these runs fail unless no null field is sent."""

from __future__ import annotations

from typing import Any

import orjson
import polars as pl
import pytest

import pipeline
from pipeline.config import RunConfig
from pipeline.engine import prepare
from pipeline.plan import renderer_for
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
