"""Relative paths in a config file are read from the config file's folder, flags from the current one (issue 19):
the same config run from another folder (cron in $HOME, a scheduler's temporary folder) is the same job, and
resumes instead of starting over."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import chat_requests, run_cli, texts, write_table
from tests.fakeserver import FakeLLMServer


def config(server: FakeLLMServer, **paths: str) -> str:
    lines = [f"{k}: {v}" for k, v in paths.items()]
    return "\n".join([*lines, "prompt: 'Summarise: {text}'", f"base_url: {server.url}/v1", "model: fake-model",
                      "progress: false", "make_report: false"]) + "\n"  # fmt: skip


def test_a_config_run_from_another_folder_is_the_same_job(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = Path("repo/jobs").resolve()
    write_table(jobs / "data" / "in.csv", texts(8))
    (jobs / "schemas").mkdir()
    (jobs / "schemas" / "s.json").write_text('{"type": "object", "properties": {"topic": {"type": "string"}}}')
    (jobs / "nightly.yaml").write_text(
        config(server, input="data/in.csv", output="out/r.parquet", schema="schemas/s.json", metrics="logs/m.json")
    )
    monkeypatch.chdir("repo")
    first = run_cli("run", "jobs/nightly.yaml", "--limit", "5")
    assert first.exit_code == 0, first.output
    assert (jobs / "out" / "r.parquet").exists() and (jobs / "logs" / "m.json").exists()
    assert (jobs / "out" / "r.checkpoint").is_dir() and not Path("out").exists()

    home = Path("../home")
    home.mkdir()
    monkeypatch.chdir(home)  # cron starts in $HOME
    server.reset()
    again = run_cli("run", str(jobs / "nightly.yaml"))
    assert again.exit_code == 0, again.output
    assert len(chat_requests(server)) == 3  # the five answered rows are not sent again
    assert pl.read_parquet(jobs / "out" / "r.parquet").height == 8 and not list(Path().iterdir())

    server.reset()  # flags are read from the current folder, as any command's are
    flagged = run_cli("run", str(jobs / "nightly.yaml"), "--output", "here.parquet")
    assert flagged.exit_code == 0, flagged.output
    assert Path("here.parquet").exists() and Path("here.checkpoint").is_dir()


def test_an_older_config_whose_files_are_only_in_the_current_folder_keeps_working(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Written before the rule, run from where its files are: same meaning, a warning with the fix, nothing paid twice."""
    write_table("in.csv", texts(6))
    Path("configs").mkdir()
    Path("configs/job.yaml").write_text(config(server, input="in.csv", output="out/r.parquet"))
    assert run_cli("run", "-i", "in.csv", "-o", "out/r.parquet", "-p", "Summarise: {text}", "--base-url",
                   f"{server.url}/v1", "-m", "fake-model", "--no-progress", "--limit", "4").exit_code == 0  # fmt: skip
    server.reset()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = run_cli("run", "configs/job.yaml")
    assert result.exit_code == 0, result.output
    assert len(chat_requests(server)) == 2 and not Path("configs/out").exists()
    said = caplog.text
    assert "'in.csv' is read from the current folder" in said and "Write it as '../in.csv'" in said
    assert "'out/r.parquet' is read from the current folder" in said


def test_the_shipped_configs_name_their_files_from_their_own_folder() -> None:
    from pipeline.settings import load_yaml
    from tests.conftest import ROOT

    values = load_yaml(str(ROOT / "configs" / "summarise-reviews.yaml"))
    assert Path(values["input"]) == ROOT / "data" / "reviews.csv" and Path(values["input"]).exists()
    assert Path(values["output"]) == ROOT / "out" / "reviews-summary.parquet"
