"""`complete()` never throws paid answers away (issue 19): without checkpoint_dir, answers go to the user's
default store, so a call interrupted by a real SIGINT and made again, in the same process or a new one, pays
only for what was never answered; the Interrupted exception carries the rows answered so far."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

import pipeline
from pipeline import answers
from pipeline.tables.statedir import answers_dir, state_dir
from tests.conftest import ROOT, chat_requests, run_cli
from tests.fakeserver import FakeLLMServer

ROWS = 300
CONCURRENCY = 4

CALL_TWICE = textwrap.dedent(
    """
    import json, sys, polars as pl, pipeline
    df = pl.DataFrame({"text": [f"row {i}" for i in range(300)]})
    settings = dict(prompt="{text}", base_url=sys.argv[1], model="m", progress=False, concurrency=4, adapt=False)
    try:
        pipeline.complete(df, **settings)
        sys.exit("not interrupted")
    except pipeline.Interrupted as stop:
        part = stop.partial
        echoed = all(c == "echo: " + t for c, t in zip(part["completion"], part["text"]))
        print(json.dumps({"message": str(stop), "rows": part.height, "echoed": echoed, "ok": part["status"].unique().to_list(),
                          "columns": part.columns, "ordered": part["text"].to_list() == sorted(part["text"].to_list(), key=lambda t: int(t.split()[1]))}), flush=True)
    out = pipeline.complete(df, **settings)  # the same cell again, in the same kernel
    print(json.dumps({"rows": out.height, "ok": out["status"].unique().to_list()}), flush=True)
    """
)
CALL_ONCE = textwrap.dedent(
    """
    import json, sys, polars as pl, pipeline
    df = pl.DataFrame({"text": [f"row {i}" for i in range(300)]})
    out = pipeline.complete(df, prompt="{text}", base_url=sys.argv[1], model="m", progress=False)
    print(json.dumps({"rows": out.height, "ok": out["status"].unique().to_list(), "attempts": out["attempts"].sum()}))
    """
)


def python(script: str, server: FakeLLMServer, home: Path) -> subprocess.Popen[str]:
    """A kernel of its own: a fresh process with the user's HOME (and so the default state folder) at `home`."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_STATE_HOME", "PIPELINE_STATE_DIR")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", script, f"{server.url}/v1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=home)  # fmt: skip


def test_an_interrupted_call_made_again_pays_only_for_what_was_never_answered(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with FakeLLMServer(latency=0.05) as server:
        proc = python(CALL_TWICE, server, home)
        deadline = time.monotonic() + 60
        while len(chat_requests(server)) < 60:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # the notebook's stop button
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        interrupted, again = (json.loads(line) for line in out.splitlines())
        sent = Counter(r.content for r in chat_requests(server))

        server.reset()
        later = python(CALL_ONCE, server, home)  # a new process: a restarted kernel, tomorrow's notebook
        out, err = later.communicate(timeout=120)
        assert later.returncode == 0, err
        assert chat_requests(server) == []  # every answer came from the store
    assert json.loads(out) == {"rows": ROWS, "ok": ["ok"], "attempts": 0}

    store = home / ".local" / "state" / "pipeline" / "answers" / "answers.sqlite"
    assert str(store) in interrupted["message"] and "stop.partial" in interrupted["message"]
    assert "Call the same complete() again" in interrupted["message"]
    assert 40 <= interrupted["rows"] < ROWS and interrupted["echoed"] and interrupted["ok"] == ["ok"] and interrupted["ordered"]
    assert interrupted["columns"][:2] == ["text", "completion"]
    assert again == {"rows": ROWS, "ok": ["ok"]}
    # Each prompt paid once: the requests in flight at the stop button were given time to come back.
    assert len(sent) == ROWS and sum(n - 1 for n in sent.values()) == 0, [p for p, n in sent.items() if n > 1]


def test_the_store_is_cleared_by_the_command_and_the_function(server: FakeLLMServer) -> None:
    df = pl.DataFrame({"text": ["a", "b", "c"]})
    settings = {"prompt": "{text}", "base_url": f"{server.url}/v1", "model": "m", "progress": False}
    pipeline.complete(df, **settings)
    assert (answers_dir() / "answers.sqlite").exists()
    info = run_cli("state", "info")
    assert info.exit_code == 0 and str(state_dir()) in info.output and "3 answers" in info.output, info.output
    assert answers.clear_answers(older_than_days=1) == 0  # all used just now
    cleared = run_cli("state", "clear")
    assert cleared.exit_code == 0 and "3 answers" in cleared.output, cleared.output
    server.reset()
    pipeline.complete(df, **settings)
    assert len(chat_requests(server)) == 3  # nothing kept: sent again
    assert pipeline.clear_answers() == 3


def test_fresh_and_a_checkpoint_dir_keep_the_default_store_out(server: FakeLLMServer) -> None:
    df = pl.DataFrame({"text": ["a", "b"]})
    settings = {"prompt": "{text}", "base_url": f"{server.url}/v1", "model": "m", "progress": False}
    pipeline.complete(df, **settings, fresh=True)
    pipeline.complete(df, **settings, checkpoint_dir="answers")
    assert not answers_dir().exists()
    pipeline.complete(df, **settings)
    server.reset()
    pipeline.complete(df, **settings, fresh=True)
    assert len(chat_requests(server)) == 2  # fresh: sent again, whatever the store holds


@pytest.mark.parametrize("where", ["PIPELINE_STATE_DIR", "XDG_STATE_HOME"])
def test_the_state_folder_follows_the_environment(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv(where, str(tmp_path / "s"))
    assert state_dir() == (tmp_path / "s" if where == "PIPELINE_STATE_DIR" else tmp_path / "s" / "pipeline")
    monkeypatch.delenv(where)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert state_dir() == tmp_path / "h" / ".local" / "state" / "pipeline"
