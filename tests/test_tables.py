"""A data engineer's own tables, from flags alone: encodings, separators, empty and nested cells, empty inputs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from pipeline.tables.checkpoint import RESULT_COLUMNS
from tests.conftest import base_args, chat_requests, run_cli, spawn, texts, write_table
from tests.fakeserver import FakeLLMServer
from tests.test_bad_input import assert_refused

# An export from Excel on Windows: cp1252, where é is 0xE9, è 0xE8, ï 0xEF and € 0x80.
CP1252_CSV = b"id,text\r\n1,Caf\xe9 cr\xe8me \x80 5\r\n2,na\xefve\r\n"
CP1252_TEXTS = ["Café crème € 5", "naïve"]


def args_with(server: FakeLLMServer, prompt: str, *, inp: str = "in.csv") -> list[str]:
    args = base_args(server, inp=inp)
    args[args.index("--prompt") + 1] = prompt
    return args


def contents(server: FakeLLMServer) -> list[str]:
    return sorted(r.content for r in chat_requests(server))


# Encodings


def test_cp1252_file_with_encoding_flag_sends_the_right_characters(server: FakeLLMServer) -> None:
    Path("in.csv").write_bytes(CP1252_CSV)
    result = run_cli(*base_args(server), "--encoding", "cp1252")
    assert result.exit_code == 0, result.output
    assert contents(server) == sorted(f"Summarise: {t}" for t in CP1252_TEXTS)
    out = pl.read_parquet("out/result.parquet")
    assert out["text"].to_list() == CP1252_TEXTS
    assert out["completion"].to_list() == [f"echo: Summarise: {t}" for t in CP1252_TEXTS]


def test_cp1252_file_without_the_flag_names_the_encoding_to_use(server: FakeLLMServer) -> None:
    Path("in.csv").write_bytes(CP1252_CSV)
    result = run_cli(*base_args(server))
    assert_refused(result, server, "in.csv", "not UTF-8", "line 2", "--encoding cp1252 (or latin-1)", "'1,Café crème € 5'")


def test_a_bad_byte_far_down_the_file_is_found_before_sending(server: FakeLLMServer) -> None:
    lines = [b"id,text", *(f"{i},row {i}".encode() for i in range(5000)), b"5000,d\xe9j\xe0 vu"]
    Path("in.csv").write_bytes(b"\n".join(lines) + b"\n")
    result = run_cli(*base_args(server), "--batch-size", "100")
    assert_refused(result, server, "in.csv", "line 5002", "--encoding cp1252")


def test_bytes_cp1252_cannot_read_suggest_latin1(server: FakeLLMServer) -> None:
    Path("in.csv").write_bytes(b"id,text\n1,Stra\xdfe \x81\n")  # 0x81 has no character in cp1252
    assert_refused(run_cli(*base_args(server)), server, "in.csv", "encoding", "--encoding latin-1")


def test_a_file_not_in_the_named_encoding_is_refused(server: FakeLLMServer) -> None:
    Path("in.csv").write_bytes(b"id,text\n1,Stra\xdfe \x81\n")
    result = run_cli(*base_args(server), "--encoding", "cp1252")
    assert_refused(result, server, "in.csv", "not valid cp1252", "0x81", "--encoding", "latin-1")


def test_utf16_from_excel_is_recognised(server: FakeLLMServer) -> None:
    Path("in.csv").write_bytes("id,text\n1,Crème\n".encode("utf-16"))
    assert_refused(run_cli(*base_args(server)), server, "in.csv", "UTF-16", "--encoding utf-16")
    result = run_cli(*base_args(server), "--encoding", "utf-16")
    assert result.exit_code == 0, result.output
    assert contents(server) == ["Summarise: Crème"]


def test_unknown_encoding_name_is_refused_before_anything_is_sent(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    result = run_cli(*base_args(server), "--encoding", "foo")
    assert_refused(result, server, "'foo'", "--encoding", "not a text encoding", "cp1252")


@pytest.mark.parametrize("flag", [[], ["--encoding", "utf-8-sig"], ["--encoding", "UTF8"]])
def test_utf8_with_a_byte_order_mark_just_works(server: FakeLLMServer, flag: list[str]) -> None:
    Path("in.csv").write_bytes(b"\xef\xbb\xbfid,text\n1,Cr\xc3\xa8me\n")
    result = run_cli(*base_args(server), *flag)
    assert result.exit_code == 0, result.output
    assert contents(server) == ["Summarise: Crème"]
    assert pl.read_parquet("out/result.parquet").columns[:2] == ["id", "text"]  # no BOM in the first name


def test_jsonl_in_latin1(server: FakeLLMServer) -> None:
    Path("in.jsonl").write_bytes(b'{"id": 1, "text": "Cr\xe8me"}\n')
    result = run_cli(*base_args(server, inp="in.jsonl"), "--encoding", "latin-1")
    assert result.exit_code == 0, result.output
    assert contents(server) == ["Summarise: Crème"]


def test_the_utf8_copy_is_removed_after_the_run(server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # what TMPDIR sets
    Path("in.csv").write_bytes(CP1252_CSV)
    result = run_cli(*base_args(server), "--encoding", "cp1252")
    assert result.exit_code == 0, result.output
    assert list(scratch.iterdir()) == []


# Separators


def test_semicolon_csv_suggests_the_separator_then_works_with_it(server: FakeLLMServer) -> None:
    Path("in.csv").write_text("id;text\n1;Good value\n2;Broke after a week\n")
    assert_refused(run_cli(*base_args(server)), server, "'text'", "'id;text'", "--separator ';'")
    result = run_cli(*base_args(server), "--separator", ";")
    assert result.exit_code == 0, result.output
    assert contents(server) == ["Summarise: Broke after a week", "Summarise: Good value"]
    assert pl.read_parquet("out/result.parquet").columns[:2] == ["id", "text"]


def test_semicolon_csv_with_commas_in_cells_suggests_the_separator(server: FakeLLMServer) -> None:
    # The commas make polars see more fields than the one-column header: a read error, not a missing column.
    Path("in.csv").write_text("id;text\n1;Good, cheap, works\n")
    assert_refused(run_cli(*base_args(server)), server, "in.csv", "--separator ';'")


@pytest.mark.parametrize("sep", ["tab", "\\t", "\t"])
def test_tab_separated_csv(server: FakeLLMServer, sep: str) -> None:
    Path("in.csv").write_text("id\ttext\n1\tGood value\n")
    assert_refused(run_cli(*base_args(server)), server, "--separator tab")
    result = run_cli(*base_args(server), "--separator", sep)
    assert result.exit_code == 0, result.output
    assert contents(server) == ["Summarise: Good value"]


def test_a_separator_of_more_than_one_character_is_refused(server: FakeLLMServer) -> None:
    write_table("in.csv", texts(2))
    assert_refused(run_cli(*base_args(server), "--separator", ";;"), server, "';;'", "--separator", "one character")


# Null and empty cells


def latin1_export() -> None:
    """A European export: latin-1, semicolons, and a notes column often left empty."""
    Path("in.csv").write_bytes(b"id;text;notes\n1;Cr\xe8me br\xfbl\xe9e;\n2;Tarte;sans gluten\n3;G\xe2teau;   \n")


def test_a_default_fills_empty_cells_and_the_row_is_sent(server: FakeLLMServer) -> None:
    latin1_export()
    args = args_with(server, "{text} [{notes:}] ({notes:n/a})")
    result = run_cli(*args, "--encoding", "latin-1", "--separator", ";")
    assert result.exit_code == 0, result.output
    assert contents(server) == sorted(["Crème brûlée [] (n/a)", "Tarte [sans gluten] (sans gluten)", "Gâteau [] (n/a)"])
    assert pl.read_parquet("out/result.parquet")["status"].to_list() == ["ok", "ok", "ok"]


def test_without_a_default_an_empty_cell_holds_the_row_back(server: FakeLLMServer) -> None:
    latin1_export()
    result = run_cli(*args_with(server, "{text} ({notes})"), "--encoding", "latin-1", "--separator", ";")
    assert result.exit_code == 4
    assert "2 rows were not sent because a prompt cell is null or empty" in result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["error"].to_list() == [
        "not sent: column 'notes' is null in this row",
        None,
        "not sent: column 'notes' is empty in this row",
    ]
    assert contents(server) == ["Tarte (sans gluten)"]


def test_null_as_empty_renders_nulls_as_empty_text_but_never_sends_a_blank_prompt(server: FakeLLMServer) -> None:
    write_table(
        "in.parquet", [{"title": "Late", "body": None}, {"title": None, "body": "Cold food"}, {"title": None, "body": " "}]
    )
    result = run_cli(*args_with(server, "{title} {body}", inp="in.parquet"), "--null-as-empty")
    assert result.exit_code == 4
    assert "1 row was not sent" in result.output and "--null-as-empty" in result.output
    assert contents(server) == [" Cold food", "Late "]
    out = pl.read_parquet("out/result.parquet")
    assert out["status"].to_list() == ["ok", "ok", "error"]
    assert out["error"][2] == "not sent: the prompt is empty in this row"


def test_the_new_syntax_keeps_the_request_keys_of_filled_rows(server: FakeLLMServer) -> None:
    """A job that adds a default or --null-as-empty resumes from its old checkpoint: filled rows are not sent again."""
    write_table("in.csv", [{"id": 1, "text": "fine", "notes": "a"}, {"id": 2, "text": "bad", "notes": None}])
    first = run_cli(*args_with(server, "{text}: {notes}"))
    assert first.exit_code == 4 and contents(server) == ["fine: a"]
    server.reset()
    second = run_cli(*args_with(server, "{text}: {notes:}"))
    assert second.exit_code == 0, second.output
    assert "resuming" in second.output
    assert contents(server) == ["bad: "]  # only the row the default made sendable
    server.reset()
    third = run_cli(*args_with(server, "{text}: {notes}"), "--null-as-empty")
    assert third.exit_code == 0 and contents(server) == []


# Nested cells


def nested_table() -> None:
    write_table(
        "in.parquet",
        pl.DataFrame(
            {
                "id": [1, 2, 3],
                "tags": [["fast", "cheap"], [], None],
                "meta": [{"stars": 5, "src": "wéb"}, {"stars": None, "src": "app"}, {"stars": 1, "src": "x"}],
                "scores": [[1.5, 2.0], [3.0], [4.0]],
            }
        ),
    )


def test_list_and_struct_cells_are_sent_as_json(server: FakeLLMServer) -> None:
    nested_table()
    result = run_cli(*args_with(server, "{tags} {meta} {scores}", inp="in.parquet"))
    assert result.exit_code == 4
    assert contents(server) == sorted(
        ['["fast","cheap"] {"stars":5,"src":"wéb"} [1.5,2.0]', '[] {"stars":null,"src":"app"} [3.0]']
    )
    assert pl.read_parquet("out/result.parquet")["error"][2] == "not sent: column 'tags' is null in this row"


def test_list_join_joins_lists_and_keeps_structs_as_json(server: FakeLLMServer) -> None:
    nested_table()
    result = run_cli(*args_with(server, "{tags:none} | {meta} | {scores}", inp="in.parquet"), "--list-join", ", ")
    assert result.exit_code == 0, result.output
    assert contents(server) == sorted(
        [
            'fast, cheap | {"stars":5,"src":"wéb"} | 1.5, 2.0',
            'none | {"stars":null,"src":"app"} | 3.0',
            'none | {"stars":1,"src":"x"} | 4.0',
        ]
    )


def test_nested_lists_from_jsonl(server: FakeLLMServer) -> None:
    Path("in.jsonl").write_text('{"id": 1, "items": [{"sku": "A1", "qty": 2}], "matrix": [[1, 2], [3]]}\n')
    result = run_cli(*args_with(server, "{items} {matrix}", inp="in.jsonl"), "--list-join", "; ")
    assert result.exit_code == 0, result.output
    assert contents(server) == ['[{"sku":"A1","qty":2}] [[1,2],[3]]']  # lists of lists or structs stay JSON


def test_binary_cells_are_still_refused(server: FakeLLMServer) -> None:
    write_table("in.parquet", pl.DataFrame({"id": [1], "blob": [b"\x00\x01"]}))
    assert_refused(run_cli(*args_with(server, "{blob}", inp="in.parquet")), server, "'blob'", "Binary", "string column")


# Braces


def test_json_braces_in_a_prompt_say_how_to_write_them(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": 1, "review": "ok"}])
    result = run_cli(*args_with(server, 'Return {"summary": "..."} for {review}'))
    assert_refused(
        result, server, "contains JSON braces", "write {{ and }} for literal braces", 'Return {{"summary": "..."}} for {review}'
    )
    fixed = run_cli(*args_with(server, 'Return {{"summary": "..."}} for {review}'))
    assert fixed.exit_code == 0 and contents(server) == ['Return {"summary": "..."} for ok']


@pytest.mark.parametrize(
    ("template", "needles"),
    [
        ("{text!r}", ["conversion (!r)", "{text}"]),
        ("{text:.2f}", ["format spec", "{text:n/a}"]),
        ('{"a": {"b": 1}} {text}', ["JSON braces", '{{"a": {{"b": 1}}}} {text}']),
        ("{score: 1, b: 2} {text}", ["column 'score'", "If {score:...} is meant as literal text, write {{ and }}"]),
    ],
)
def test_placeholders_that_are_not_column_or_default(server: FakeLLMServer, template: str, needles: list[str]) -> None:
    write_table("in.csv", texts(1))
    assert_refused(run_cli(*args_with(server, template)), server, *needles)


# Empty inputs


@pytest.mark.parametrize(
    ("name", "make", "columns"),
    [
        ("in.csv", lambda p: p.write_bytes(b""), ["text"]),
        ("in.csv", lambda p: p.write_text("id,text\n"), ["id", "text"]),
        ("in.jsonl", lambda p: p.write_bytes(b""), ["text"]),
        ("in.parquet", lambda p: pl.DataFrame({"id": [1], "text": ["x"]}).clear().write_parquet(p), ["id", "text"]),
    ],
    ids=["zero-byte-csv", "header-only-csv", "empty-jsonl", "empty-parquet"],
)
def test_an_empty_input_gives_an_empty_output_and_success(
    server: FakeLLMServer, name: str, make: Callable[[Path], object], columns: list[str]
) -> None:
    make(Path(name))
    result = run_cli(*base_args(server, inp=name))
    assert result.exit_code == 0, result.output
    assert "0 rows" in result.output and "nothing was sent" in result.output
    out = pl.read_parquet("out/result.parquet")
    assert out.height == 0 and out.columns == [*columns, *RESULT_COLUMNS]
    assert out.schema["completion"] == pl.String and out.schema["prompt_tokens"] == pl.Int64
    assert server.requests == []
    assert not Path("out/result.checkpoint").exists()


def test_an_empty_parquet_keeps_its_column_types(server: FakeLLMServer) -> None:
    pl.DataFrame({"id": [1], "text": ["x"]}).clear().write_parquet("in.parquet")
    assert run_cli(*base_args(server, inp="in.parquet")).exit_code == 0
    assert pl.read_parquet("out/result.parquet").schema["id"] == pl.Int64


def test_empty_files_among_others_are_skipped(server: FakeLLMServer) -> None:
    write_table("parts/a.csv", texts(2))
    Path("parts/b.csv").write_text("id,text\n")
    Path("parts/c.csv").write_bytes(b"")
    write_table("parts/d.csv", texts(1, prefix="last"))
    result = run_cli(*base_args(server, inp="parts/*.csv"))
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/result.parquet")
    assert out["text"].to_list() == [t["text"] for t in texts(2)] + [texts(1, prefix="last")[0]["text"]]
    assert out.schema["id"] == pl.Int64  # the header-only file does not turn ids into text
    assert len(chat_requests(server)) == 3


def test_an_empty_input_starts_no_local_model(server: FakeLLMServer) -> None:
    pytest.importorskip("llama_cpp")
    Path("in.csv").write_text("id,text\n")
    result = run_cli("run", "-i", "in.csv", "-o", "out/result.parquet", "-p", "{text}", "--provider", "local", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "0 rows" in result.output and "embedded model" not in result.output
    assert pl.read_parquet("out/result.parquet").height == 0


def test_estimate_of_an_empty_input(server: FakeLLMServer) -> None:
    Path("in.csv").write_text("id,text\n")
    result = run_cli("estimate", "-i", "in.csv", "-p", "{text}", "--base-url", f"{server.url}/v1", "-m", "m")
    assert result.exit_code == 0, result.output
    assert "in.csv (0 rows)" in result.output and "requests to send: 0" in result.output
    assert server.requests == []


# The whole first-hour case, as a real process


def test_a_cp1252_semicolon_export_from_flags_alone_in_a_child_process(server: FakeLLMServer, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    Path("in.csv").write_bytes(b"id;text;notes\r\n1;Caf\xe9 \x80 5;\r\n2;Cr\xe8me;fresh\r\n")
    args = args_with(server, "Review: {text}. Notes: {notes:none}")
    proc = spawn(*args, "--encoding", "cp1252", "--separator", ";", env={"TMPDIR": str(scratch)})
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "2 rows" in stderr and "2 ok" in stderr
    assert contents(server) == ["Review: Café € 5. Notes: none", "Review: Crème. Notes: fresh"]
    out = pl.read_parquet("out/result.parquet")
    assert out.columns[:3] == ["id", "text", "notes"] and out["text"].to_list() == ["Café € 5", "Crème"]
    assert list(scratch.iterdir()) == []  # the UTF-8 copy went with the process
