"""The state follows an s3:// job (issue 19), against moto's S3 server and the fake LLM server on 127.0.0.1:
a run killed in one folder and resumed from another on an empty HOME and TMPDIR pays only for what it had not
shipped, its metrics and report land in the bucket, two runs of one job do not run at once, and what a killed
run leaves (an unfinished multipart upload, a copy of its input) is cleaned by the next run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import polars as pl
import pytest

from pipeline.tables import remote_state
from tests.conftest import ROOT, chat_requests, run_cli, texts
from tests.fakeserver import FakeLLMServer
from tests.test_s3 import args, get_parquet, keys, put_table

boto3 = pytest.importorskip("boto3", reason="moto[server] (a dev dependency) brings boto3")

SHIP_ROWS = 40  # the journal's count trigger in these tests, so a kill at 200 answers has shipped some of them
CONCURRENCY = 8


def machine(root: Path) -> dict[str, str]:
    """The environment of a fresh worker: its own empty HOME and TMPDIR, no state folder set, the bucket's settings."""
    home, tmp = root / "home", root / "tmp"
    home.mkdir(parents=True)
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_STATE_HOME", "PIPELINE_STATE_DIR")}
    return {**env, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT),
            "PIPELINE_JOURNAL_ROWS": str(SHIP_ROWS), "PIPELINE_JOURNAL_SECONDS": "1"}  # fmt: skip


def start(job: list[str], folder: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *job], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(server: FakeLLMServer, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(chat_requests(server)) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run did not get that far"
        time.sleep(0.02)


def shipped(client: object, prefix: str) -> set[str]:
    """The prompts whose answers are in the bucket's journal segments (the fake server echoes the prompt)."""
    found = set()
    for key in keys(client):
        if key.startswith(prefix) and key.endswith(".jsonl"):
            body = client.get_object(Bucket="lake", Key=key)["Body"].read()  # type: ignore[attr-defined]
            found.update(orjson.loads(line)["completion"].removeprefix("echo: ") for line in body.splitlines())
    return found


def test_a_job_killed_in_one_folder_resumes_from_another_on_a_fresh_disk(s3: object, tmp_path: Path) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(400)))
    first_machine, second_machine = machine(tmp_path / "a"), machine(tmp_path / "b")
    with FakeLLMServer(latency=0.05) as server:
        job = args(server, "s3://lake/in.csv", "s3://lake/out/result.parquet", "--concurrency", str(CONCURRENCY),
                   "--batch-size", "50", "--no-adapt")  # fmt: skip
        proc = start(job, tmp_path / "a" / "cron", first_machine)
        wait_for(server, 200, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        first = Counter(r.content for r in chat_requests(server))
        kept = shipped(s3, "out/result.checkpoint/journal/")
        left = Path(first_machine["TMPDIR"])
        assert list(left.glob("pipeline-input-*")), "a killed run leaves its input copy"
        assert not [k for k in keys(s3) if k.startswith("out/result.") and not k.startswith("out/result.checkpoint/")]

        server.reset()
        again = start(job, tmp_path / "b" / "pod", second_machine)
        _, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        second = Counter(r.content for r in chat_requests(server))

        # A third run, on the first machine again: nothing left to send, and the killed run's input copy is gone.
        server.reset()
        third = start(job, tmp_path / "a" / "elsewhere", first_machine)
        assert third.wait(timeout=120) == 0
        assert chat_requests(server) == []
    assert not list(left.glob("pipeline-input-*"))

    paid_twice = set(first) & set(second)
    print(f"sent before the kill {len(first)}, shipped {len(kept)}, sent again {len(paid_twice)}")
    assert not paid_twice & kept  # no answer that had been shipped is bought again
    # The bound, on what the fake server received: the answers not yet shipped plus the requests in flight,
    # at most one segment's worth (SHIP_ROWS, plus the answers that came while it uploaded) and CONCURRENCY.
    assert len(paid_twice) <= len(first) - len(kept) <= 2 * SHIP_ROWS + CONCURRENCY, (len(paid_twice), len(first), len(kept))
    assert "resuming: the checkpoint s3://lake/out/result.checkpoint/ holds" in err
    assert "took over the lock of a run that stopped" in err
    result = get_parquet(s3, "out/result.parquet")
    assert result["id"].to_list() == list(range(400)) and set(result["status"]) == {"ok"}
    assert not list((tmp_path / "b" / "pod").iterdir())  # nothing written in the folder it ran from
    assert "out/result.checkpoint/lock" not in keys(s3)  # given back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_s3_job_ships_every_answer_before_it_exits(s3: object, tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C or a scheduler's SIGTERM: the journal is shipped on the way out, so a successor on a fresh disk
    sends again only the requests that were in flight."""
    put_table(s3, "in.csv", pl.DataFrame(texts(300)))
    with FakeLLMServer(latency=0.05) as server:
        job = args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet", "--concurrency", str(CONCURRENCY), "--no-adapt")
        first_machine = {**machine(tmp_path / "a"), "PIPELINE_JOURNAL_ROWS": "100000", "PIPELINE_JOURNAL_SECONDS": "600"}
        proc = start(job, tmp_path / "a" / "w", first_machine)  # nothing shipped while it runs: only on the way out
        wait_for(server, 100, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "saved in s3://lake/out/r.checkpoint/" in err
        first = Counter(r.content for r in chat_requests(server))
        kept = shipped(s3, "out/r.checkpoint/journal/")
        server.reset()
        again = start(job, tmp_path / "b" / "w", machine(tmp_path / "b"))
        _, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        second = Counter(r.content for r in chat_requests(server))
    assert len(kept) >= 100 - CONCURRENCY
    assert not set(second) & kept and len(set(first) & set(second)) <= CONCURRENCY


def test_metrics_and_report_are_uploaded_beside_the_output(server: FakeLLMServer, s3: object) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(5)))
    job = [a for a in args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet") if a != "--no-report"]
    result = run_cli(*job)
    assert result.exit_code == 0, result.output
    assert {"out/r.metrics.json", "out/r.report.html", "out/r.parquet"} <= set(keys(s3))
    m = orjson.loads(s3.get_object(Bucket="lake", Key="out/r.metrics.json")["Body"].read())  # type: ignore[attr-defined]
    assert m["rows"]["ok"] == 5
    assert m["paths"] == {"output": "s3://lake/out/r.parquet", "checkpoint": "s3://lake/out/r.checkpoint/",
                          "metrics": "s3://lake/out/r.metrics.json", "report": "s3://lake/out/r.report.html"}  # fmt: skip
    page = s3.get_object(Bucket="lake", Key="out/r.report.html")["Body"].read()  # type: ignore[attr-defined]
    assert b"<html" in page.lower()
    assert "report: s3://lake/out/r.report.html" in result.output


def test_metrics_and_checkpoint_flags_take_an_s3_address(server: FakeLLMServer, s3: object) -> None:
    Path("in.csv").write_text("id,text\n" + "".join(f"{i},review {i} is fine\n" for i in range(6)))
    job = args(server, "in.csv", "out/r.parquet", "--metrics", "s3://lake/nightly/r.json", "--checkpoint-dir",
               "s3://lake/state/r/")  # fmt: skip
    result = run_cli(*job)
    assert result.exit_code == 0, result.output
    assert orjson.loads(s3.get_object(Bucket="lake", Key="nightly/r.json")["Body"].read())["rows"]["ok"] == 6  # type: ignore[attr-defined]
    assert any(k.startswith("state/r/journal/") for k in keys(s3))
    assert not Path("s3:").exists() and not Path("out/r.checkpoint").exists()
    # The same job from another folder, its output removed: every answer comes from the bucket.
    Path("other").mkdir()
    os.chdir("other")
    server.reset()
    again = run_cli(*args(server, "../in.csv", "../out/again.parquet", "--checkpoint-dir", "s3://lake/state/r"))
    assert again.exit_code == 0, again.output
    assert chat_requests(server) == []
    assert pl.read_parquet("../out/again.parquet")["status"].to_list() == ["ok"] * 6


@pytest.mark.parametrize("flag", ["--metrics", "--checkpoint-dir", "--report"])
def test_a_scheme_that_cannot_be_honoured_is_refused(server: FakeLLMServer, flag: str) -> None:
    Path("in.csv").write_text("id,text\n1,fine\n")
    result = run_cli(*args(server, "in.csv", "out/r.parquet", flag, "gs://bucket/x/"))
    assert result.exit_code == 2, result.output
    assert "gs:// is not a place pipeline can write" in result.output
    assert chat_requests(server) == [] and not Path("gs:").exists()


def test_a_second_run_of_a_job_held_elsewhere_is_refused(s3: object, tmp_path: Path) -> None:
    """Two workers (their own disks) start the same s3:// job: the second is refused while the first holds it."""
    put_table(s3, "in.csv", pl.DataFrame(texts(200)))
    with FakeLLMServer(latency=0.1) as server:  # about 10 s for the first run: the second starts well within it
        job = args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet", "--concurrency", "2", "--no-adapt")
        first = start(job, tmp_path / "a" / "w", machine(tmp_path / "a"))
        wait_for(server, 5, first)
        second = start(job, tmp_path / "b" / "w", machine(tmp_path / "b"))
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert "Another pipeline run holds this job" in err and "s3://lake/out/r.checkpoint/lock" in err
        assert first.wait(timeout=120) == 0
        sent = Counter(r.content for r in chat_requests(server))
    assert len(sent) == 200 and max(sent.values()) == 1  # the second sent nothing


def test_a_lock_not_refreshed_by_a_holder_elsewhere_is_taken_over_once_stale(
    server: FakeLLMServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(3)))
    holder = {"run": "x", "host": "another-pod", "pid": 1, "boot": "", "started": time.time()}
    s3.put_object(Bucket="lake", Key="out/r.checkpoint/lock", Body=orjson.dumps(holder))  # type: ignore[attr-defined]
    job = args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet")
    refused = run_cli(*job)
    assert refused.exit_code == 2 and "process 1 on another-pod" in refused.output, refused.output
    monkeypatch.setattr(remote_state, "STALE_AFTER", 1.0)
    time.sleep(1.5)  # the lock's age, on the server's clock
    taken = run_cli(*job)
    assert taken.exit_code == 0, taken.output
    assert "took over the lock of a run that stopped (process 1 on another-pod" in taken.output


UPLOAD_KILLED = """
import os, signal, sys
from pathlib import Path
from pipeline.tables import storage
storage.COPY_LIMIT = 0  # the upload in place, a multipart upload to the output's own key
storage.UPLOAD_WINDOW = 1 << 20
def send(src, out):
    for n, chunk in enumerate(iter(lambda: src.read(1 << 20), b"")):
        out.write(chunk)
        if n == 11:
            out.flush()  # the parts so far are uploaded: the upload exists, unfinished
            os.kill(os.getpid(), signal.SIGKILL)
storage._send = send
storage.upload(Path(sys.argv[1]), storage.Url.parse(sys.argv[2]))
"""


def test_an_upload_killed_part_way_is_aborted_by_the_next_run(server: FakeLLMServer, s3: object) -> None:
    Path("big.bin").write_bytes(os.urandom(16 << 20))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", UPLOAD_KILLED, "big.bin", "s3://lake/out/r.parquet"], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    uploads = s3.list_multipart_uploads(Bucket="lake").get("Uploads", [])  # type: ignore[attr-defined]
    assert [u["Key"] for u in uploads] == ["out/r.parquet"]  # billed, and in no listing of objects
    put_table(s3, "in.csv", pl.DataFrame(texts(3)))
    result = run_cli(*args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet"))
    assert result.exit_code == 0, result.output
    assert "1 unfinished upload(s) of s3://lake/out/r.parquet aborted" in result.output
    assert s3.list_multipart_uploads(Bucket="lake").get("Uploads", []) == []  # type: ignore[attr-defined]
    assert get_parquet(s3, "out/r.parquet")["id"].to_list() == [0, 1, 2]


def test_many_segments_are_folded_into_one_results_file(
    server: FakeLLMServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(6)))
    monkeypatch.setattr(remote_state, "COMPACT_AT", 5)
    job = args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet")
    for limit in range(1, 7):  # six runs, a segment each
        assert run_cli(*job, "--limit", str(limit)).exit_code == 0
    segments = [k for k in keys(s3) if k.startswith("out/r.checkpoint/journal/")]
    assert len(segments) == 6
    server.reset()
    again = run_cli(*job, "--limit", "6")
    assert again.exit_code == 0, again.output
    assert chat_requests(server) == []
    state = [k for k in keys(s3) if k.startswith("out/r.checkpoint/")]
    assert len(state) == 1 and state[0].startswith("out/r.checkpoint/results-") and state[0].endswith(".parquet")
    folded = pl.read_parquet(io.BytesIO(s3.get_object(Bucket="lake", Key=state[0])["Body"].read()))  # type: ignore[attr-defined]
    assert folded.height == 6


def test_estimate_reads_the_answers_in_the_bucket(server: FakeLLMServer, s3: object) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(4)))
    job = args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet")
    assert run_cli(*job).exit_code == 0
    est = run_cli("estimate", *job[1:])
    assert est.exit_code == 0, est.output
    assert "already answered (skipped): 4" in est.output and "requests to send: 0" in est.output, est.output


def test_a_killed_holder_not_yet_reaped_is_dead() -> None:
    """A killed run whose parent died too is a zombie until something reaps it (a container's init may never):
    its lock is a dead run's, not a live one's."""
    import socket

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = {"host": socket.gethostname(), "boot": remote_state._boot_id(), "pid": proc.pid}
    assert not remote_state._dead(holder)
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, and left unreaped
    assert remote_state._dead(holder)
    proc.wait()
    assert remote_state._dead(holder)
