"""Object storage against a real S3-compatible server (moto's server, its own process on 127.0.0.1):
inputs and globs read from it, outputs written to it whole or not at all, resume, and the errors
a user meets first (no bucket, no object, no credentials, access denied)."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import ConfigError
from pipeline.tables import storage
from tests.conftest import chat_requests, run_cli, start_moto, stop_process, texts
from tests.fakeserver import FakeLLMServer

boto3 = pytest.importorskip("boto3", reason="moto[server] (a dev dependency) brings boto3")


def put_table(client: object, key: str, df: pl.DataFrame) -> None:
    buf = io.BytesIO()
    fmt = key.rsplit(".", 1)[1]
    if fmt == "parquet":
        df.write_parquet(buf)
    elif fmt == "csv":
        df.write_csv(buf)
    else:
        df.write_ndjson(buf)
    client.put_object(Bucket="lake", Key=key, Body=buf.getvalue())  # type: ignore[attr-defined]


def get_parquet(client: object, key: str) -> pl.DataFrame:
    body = client.get_object(Bucket="lake", Key=key)["Body"].read()  # type: ignore[attr-defined]
    return pl.read_parquet(io.BytesIO(body))


def keys(client: object, *, markers: bool = False) -> list[str]:
    """The objects, without the empty folder markers pyarrow leaves when it deletes a key (unless asked)."""
    listed = client.list_objects_v2(Bucket="lake").get("Contents", [])  # type: ignore[attr-defined]
    return sorted(o["Key"] for o in listed if markers or not o["Key"].endswith("/"))


def args(server: FakeLLMServer, inp: str, out: str, *more: str) -> list[str]:
    return ["run", "-i", inp, "-o", out, "-p", "Summarise: {text}", "--base-url", f"{server.url}/v1", "-m", "fake-model",
            "--no-progress", "--no-report", *more]  # fmt: skip


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_read_from_and_write_to_object_storage(server: FakeLLMServer, s3: object, fmt: str) -> None:
    df = pl.DataFrame(texts(12))
    put_table(s3, f"reviews/in.{fmt}", df)
    result = run_cli(*args(server, f"s3://lake/reviews/in.{fmt}", "s3://lake/results/out.parquet"))
    assert result.exit_code == 0, result.output
    assert "output: s3://lake/results/out.parquet" in result.output
    out = get_parquet(s3, "results/out.parquet")
    assert out["id"].to_list() == list(range(12)) and set(out["status"]) == {"ok"}
    state = [k for k in keys(s3) if k.startswith("results/out.checkpoint/")]
    # No temporary object left: the output, its metrics file and its checkpoint's journal beside it.
    assert sorted(set(keys(s3)) - set(state)) == sorted([f"reviews/in.{fmt}", "results/out.metrics.json", "results/out.parquet"])
    assert state and all(k.startswith("results/out.checkpoint/journal/") for k in state)
    # The same job on local files gives the same table.
    df.write_parquet("in.parquet")
    server.reset()
    assert run_cli(*args(server, "in.parquet", "out/local.parquet")).exit_code == 0
    local = pl.read_parquet("out/local.parquet")
    assert out.drop("latency_ms").equals(local.drop("latency_ms"))
    # The checkpoint is in the bucket beside the output, named in the summary; nothing is left in the current folder.
    assert "checkpoint: s3://lake/results/out.checkpoint/" in result.output
    assert not Path("s3").exists()


def test_a_glob_under_a_prefix_reads_every_match_in_order(server: FakeLLMServer, s3: object) -> None:
    rows = texts(12)
    put_table(s3, "parts/b.parquet", pl.DataFrame(rows[3:9]))
    put_table(s3, "parts/a.parquet", pl.DataFrame(rows[:3]))
    put_table(s3, "parts/notes.csv", pl.DataFrame(rows[:1]))  # not matched by the glob
    put_table(s3, "parts/year=2026/c.parquet", pl.DataFrame(rows[9:]))  # a folder down: '*' stays in one, as locally
    result = run_cli(*args(server, "s3://lake/parts/*.parquet", "out/r.jsonl"))
    assert result.exit_code == 0, result.output
    assert pl.read_ndjson("out/r.jsonl")["id"].to_list() == list(range(9))
    result = run_cli(*args(server, "s3://lake/parts/**/*.parquet", "out/all.jsonl"))
    assert result.exit_code == 0, result.output
    assert pl.read_ndjson("out/all.jsonl")["id"].to_list() == list(range(12))


@pytest.mark.parametrize(
    ("key", "pattern", "matches"),
    [
        ("reviews/a.parquet", "reviews/*.parquet", True),
        ("reviews/2026/a.parquet", "reviews/*.parquet", False),
        ("reviews/2026/a.parquet", "reviews/*/*.parquet", True),
        ("reviews/a.parquet", "reviews/**/*.parquet", True),
        ("reviews/2026/11/a.parquet", "reviews/**/*.parquet", True),
        ("reviews/2026/11/a.parquet", "reviews/**", True),
        ("reviews/.a.parquet.123.uploading", "reviews/*", False),
        ("reviews/.hidden/a.parquet", "reviews/**/*.parquet", False),
        ("reviews/.a.parquet", "reviews/.a.*", True),
        ("reviews/part-7.csv", "reviews/part-[0-9].csv", True),
        ("reviews/part-7.csv", "reviews/part-?.csv", True),
        ("Reviews/a.csv", "reviews/*.csv", False),
    ],
)
def test_object_globs_match_as_local_globs_do(key: str, pattern: str, matches: bool) -> None:
    assert storage.glob_matches(key, pattern) is matches


def test_a_failed_run_leaves_nothing_under_the_output_key(s3: object, monkeypatch: pytest.MonkeyPatch) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(5)))
    monkeypatch.setenv("MY_KEY", "sk-wrong-0123456789")
    with FakeLLMServer(api_key="sk-right-0123456789") as server:
        result = run_cli(*args(server, "s3://lake/in.csv", "s3://lake/out.parquet", "--api-key-env", "MY_KEY"))
    assert result.exit_code == 6, result.output  # auth_refused
    assert keys(s3) == ["in.csv", "out.metrics.json"]  # no output, and no checkpoint: nothing was answered


@pytest.mark.parametrize(
    ("inp", "out", "says"),
    [
        ("s3://nobucket/in.csv", "out/r.parquet", "the bucket 'nobucket' does not exist"),
        ("s3://lake/missing.csv", "out/r.parquet", "Input s3://lake/missing.csv does not exist"),
        ("s3://lake/none/*.csv", "out/r.parquet", "No input object matches 's3://lake/none/*.csv'"),
        ("s3://lake/in.csv", "s3://nobucket/out.parquet", "Cannot write s3://nobucket/out.parquet: the bucket 'nobucket'"),
        ("s3://lake/in.csv", "s3://lake/out.txt", "no output format's extension"),
        ("s3://lake", "out/r.parquet", "is not an object's address"),
    ],
)
def test_bad_addresses_are_refused_before_anything_is_sent(
    server: FakeLLMServer, s3: object, inp: str, out: str, says: str
) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(2)))
    result = run_cli(*args(server, inp, out))
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert chat_requests(server) == []


def test_missing_credentials_are_refused_and_name_the_variables(
    server: FakeLLMServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(2)))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = run_cli(*args(server, "s3://lake/in.csv", "out/r.parquet"))
    assert result.exit_code == 2
    assert "No credentials for object storage" in result.output and "AWS_ACCESS_KEY_ID" in result.output
    assert chat_requests(server) == []


def test_an_s3_compatible_server_needs_no_region(server: FakeLLMServer, s3: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    put_table(s3, "in.jsonl", pl.DataFrame(texts(3)))
    result = run_cli(*args(server, "s3://lake/in.jsonl", "s3://lake/out.csv"))
    assert result.exit_code == 0, result.output
    body = s3.get_object(Bucket="lake", Key="out.csv")["Body"].read()  # type: ignore[attr-defined]
    assert pl.read_csv(io.BytesIO(body))["id"].to_list() == [0, 1, 2]


def test_access_denied_is_refused_without_showing_the_key(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that checks credentials (moto with authentication on): an unknown key is refused."""
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-secret-nobody-knows")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        result = run_cli(*args(server, "s3://lake/in.csv", "out/r.parquet"))
    finally:
        stop_process(proc)
    assert result.exit_code == 2, result.output
    assert "access denied" in result.output and "s3://lake/in.csv" in result.output
    assert "a-secret-nobody-knows" not in result.output
    assert chat_requests(server) == []


def test_show_and_report_read_an_object_outputs_local_copy(server: FakeLLMServer, s3: object) -> None:
    put_table(s3, "in.csv", pl.DataFrame(texts(3)))
    assert run_cli(*args(server, "s3://lake/in.csv", "s3://lake/out/r.parquet")).exit_code == 0
    shown = run_cli("show", "s3://lake/out/r.parquet")
    assert shown.exit_code == 0 and "ok" in shown.output and "3" in shown.output
    drawn = run_cli("report", "s3://lake/out/r.parquet")
    assert drawn.exit_code == 0, drawn.output
    assert Path(drawn.output.split("Report written to ")[1].strip()).is_file()


# ---- uploads: whole or nothing, at any size, in flat memory -----------------------------------------


class _Reads:
    """A local file whose `n`-th read does `act()` first: a Ctrl-C or a failing disk part-way through."""

    def __init__(self, src: object, n: int, act: object) -> None:
        self.src, self.n, self.act, self.reads = src, n, act, 0
        self.name = src.name  # type: ignore[attr-defined]

    def read(self, size: int) -> bytes:
        self.reads += 1
        if self.reads == self.n:
            self.act()  # type: ignore[operator]
        return self.src.read(size)  # type: ignore[attr-defined,no-any-return]


def _disturbed(monkeypatch: pytest.MonkeyPatch, act: object) -> None:
    """Make `storage.upload` read its file in 1 MiB chunks and `act` on the second one."""
    real = storage._send
    monkeypatch.setattr(storage, "COPY_CHUNK", 1 << 20)
    monkeypatch.setattr(storage, "_send", lambda src, out: real(_Reads(src, 2, act), out))  # type: ignore[arg-type]


def _ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)


def _disk_fails() -> None:
    raise OSError(errno.EIO, "Input/output error")


@pytest.fixture
def local_output() -> Path:
    path = Path("big.parquet")
    path.write_bytes(os.urandom(3 << 20))  # three chunks, so there is a middle to be stopped in
    return path


@pytest.fixture
def int_handler() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_upload_stopped_by_ctrl_c_leaves_nothing_under_the_key(
    s3: object, local_output: Path, monkeypatch: pytest.MonkeyPatch, int_handler: None
) -> None:
    _disturbed(monkeypatch, _ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        storage.upload(local_output, storage.Url("lake", "out/big.parquet"))
    assert keys(s3) == []  # neither the output nor its temporary key (pyarrow completed that one, we deleted it)


def test_an_output_above_the_copy_limit_goes_straight_to_its_key(
    server: FakeLLMServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above 5 GiB S3 cannot copy an object in one request: such an output is one multipart upload to its
    key (the limit is lowered here to take that path with a small table)."""
    monkeypatch.setattr(storage, "COPY_LIMIT", 0)
    put_table(s3, "in.csv", pl.DataFrame(texts(20)))
    result = run_cli(*args(server, "s3://lake/in.csv", "s3://lake/out/result.parquet"))
    assert result.exit_code == 0, result.output
    assert get_parquet(s3, "out/result.parquet")["id"].to_list() == list(range(20))
    left = [k for k in keys(s3, markers=True) if not k.startswith("out/result.checkpoint/journal/")]
    assert left == ["in.csv", "out/result.metrics.json", "out/result.parquet"]  # no temporary key, no folder marker


def test_ctrl_c_during_an_upload_in_place_waits_for_it_to_complete(
    s3: object, local_output: Path, monkeypatch: pytest.MonkeyPatch, int_handler: None
) -> None:
    """pyarrow completes a multipart upload whenever its stream closes, so an interrupt part-way would
    publish part of the file: it is held until the upload is whole, then raised."""
    monkeypatch.setattr(storage, "COPY_LIMIT", 0)
    _disturbed(monkeypatch, _ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        storage.upload(local_output, storage.Url("lake", "out/big.parquet"))
    body = s3.get_object(Bucket="lake", Key="out/big.parquet")["Body"].read()  # type: ignore[attr-defined]
    assert body == local_output.read_bytes()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_a_disk_failing_during_an_upload_in_place_leaves_nothing_under_the_key(
    s3: object, local_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "COPY_LIMIT", 0)
    _disturbed(monkeypatch, _disk_fails)
    with pytest.raises(OSError, match="reading it failed: Input/output error"):
        storage.upload(local_output, storage.Url("lake", "out/big.parquet"))
    assert keys(s3) == []


def test_a_wrong_region_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    exc = OSError("When getting information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 301) during "
                  "HeadObject operation: No response body.")  # fmt: skip
    error = storage.explain(exc, storage.Url("b", "k"), "read")
    assert isinstance(error, ConfigError)
    assert "s3://b/k" in str(error) and "another region than us-east-1" in str(error) and "AWS_REGION" in str(error)


def test_the_environment_is_left_as_it_was(s3: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK is kept from the cloud metadata address while the filesystem is made, without changing
    the environment of a program that imports us."""
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    storage.filesystem()
    assert "AWS_EC2_METADATA_DISABLED" not in os.environ


def test_a_file_of_batch_requests_in_object_storage_is_recognised(server: FakeLLMServer, s3: object) -> None:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "fake-model", "messages": [{"role": "user", "content": f"question {i}"}]}}
        for i in range(3)
    ]  # fmt: skip
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    s3.put_object(Bucket="lake", Key="batch/requests.jsonl", Body=body)  # type: ignore[attr-defined]
    result = run_cli("run", "-i", "s3://lake/batch/requests.jsonl", "-o", "out/answers.jsonl", "--base-url",
                     f"{server.url}/v1", "--no-progress", "--no-report")  # fmt: skip
    assert result.exit_code == 0, result.output
    answers = [json.loads(x) for x in Path("out/answers.jsonl").read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == ["req-0", "req-1", "req-2"]
    assert [a["response"]["status_code"] for a in answers] == [200] * 3
    assert sorted(r.body["messages"][0]["content"] for r in server.requests) == ["question 0", "question 1", "question 2"]
