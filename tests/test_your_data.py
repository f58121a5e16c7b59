"""The user's data as they wrote it: exact text in, no phantom rows, types only where no text changes.

Every test runs `pipeline run` against the fake server and looks at what the server received
and at the output file, byte for byte where the text matters.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import base_args, chat_requests, run_cli, write_table
from tests.fakeserver import FakeLLMServer
from tests.test_bad_input import assert_refused

# An Excel "CSV UTF-8" export as it comes: a byte-order mark, CRLF line ends, quoted cells with line
# breaks and quotes inside, ids with leading zeros, "N/A" and "-" for missing notes, a trailing blank line.
EXPORT = (
    "\ufeffTicket ID,Customer,Body,Notes\r\n"
    '00042,Zoë Ångström,"Printer jams\nevery morning",N/A\r\n'
    '00107,José Müller,"Cannot log in; the ""reset"" link is broken",VIP\r\n'
    "01234,Ana Lúcia,Refund please,N/A\r\n"
    '00999,Björn,"Line one\r\nLine two",\r\n'
    "99,Eve,Plain text,-\r\n"
    "\r\n"
).encode()
IDS = ["00042", "00107", "01234", "00999", "99"]
BODIES = [
    "Printer jams\nevery morning",
    'Cannot log in; the "reset" link is broken',
    "Refund please",
    "Line one\r\nLine two",
    "Plain text",
]
PROMPT = "Ticket {Ticket ID} from {Customer}: {Body} (notes: {Notes:none})"


def run_with(server: FakeLLMServer, prompt: str, *extra: str, inp: str = "in.csv", out: str = "out/result.parquet") -> object:
    args = base_args(server, inp=inp, out=out)
    args[args.index("--prompt") + 1] = prompt
    return run_cli(*args, *extra)


def test_a_spreadsheet_export_runs_end_to_end_with_its_text_intact(server: FakeLLMServer) -> None:
    Path("tickets.csv").write_bytes(EXPORT)
    result = run_with(server, PROMPT, "--null-value", "N/A", "--null-value", "-", inp="tickets.csv", out="out/tickets.csv")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]

    sent = [r.content for r in chat_requests(server)]
    assert len(sent) == 5  # the trailing blank line is no row
    notes = ["none", "VIP", "none", "none", "none"]
    customers = ["Zoë Ångström", "José Müller", "Ana Lúcia", "Björn", "Eve"]
    expected = [f"Ticket {i} from {c}: {b} (notes: {n})" for i, c, b, n in zip(IDS, customers, BODIES, notes, strict=True)]
    assert sorted(sent) == sorted(expected)  # ids with their zeros, cells with their line breaks and quotes
    assert not any("N/A" in s or "notes: -)" in s for s in sent)  # missing means missing: never sent

    # The output: the same ids, byte for byte, in input order, one row per row of the export.
    raw = Path("out/tickets.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")  # no mark unless asked for (--csv-bom)
    out = pl.read_csv("out/tickets.csv", infer_schema=False)
    assert out["Ticket ID"].to_list() == IDS
    assert out["Body"].to_list() == BODIES
    assert out["Customer"].to_list() == customers
    assert out["Notes"].to_list() == [None, "VIP", None, None, None]
    assert out["status"].to_list() == ["ok"] * 5
    for i in IDS:
        assert f"\n{i},".encode() in raw


def test_the_same_export_to_parquet_keeps_ids_as_text(server: FakeLLMServer) -> None:
    Path("tickets.csv").write_bytes(EXPORT)
    result = run_with(server, PROMPT, "--null-value", "N/A", "--null-value", "-", inp="tickets.csv")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    out = pl.read_parquet("out/result.parquet")
    assert out.schema["Ticket ID"] == pl.String and out["Ticket ID"].to_list() == IDS
    assert out.height == 5


def test_csv_bom_for_excel(server: FakeLLMServer) -> None:
    Path("tickets.csv").write_bytes(EXPORT)
    result = run_with(server, PROMPT, "--null-value", "N/A", "--csv-bom", inp="tickets.csv", out="out/t.csv")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    raw = Path("out/t.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfTicket ID,") and raw.count(b"\xef\xbb\xbf") == 1
    assert "Zoë Ångström".encode() in raw
    assert pl.read_csv("out/t.csv", infer_schema=False).columns[0] == "Ticket ID"  # readers skip the mark

    refused = run_with(server, PROMPT, "--csv-bom", inp="tickets.csv", out="out/t.parquet")
    assert refused.exit_code == 2 and "--csv-bom" in refused.output and ".csv output" in refused.output  # type: ignore[attr-defined]


# Types only where no text changes

TYPED = (
    "zip,phone,qty,price,big,sci,thousands,ratio,flag,day,sku\n"
    '02134,+44 20 7946 0958,3,19.99,12345678901234567890,1e5,"1,000",3.10,true,2024-01-05,7\n'
    '10001,555-0100,12,5.0,1,2E3,"2,500",0.5,false,2024-02-01,007\n'
)


def test_csv_columns_are_typed_only_where_every_value_reads_back_unchanged(server: FakeLLMServer) -> None:
    Path("in.csv").write_text(TYPED)
    names = TYPED.splitlines()[0].split(",")
    result = run_with(server, "|".join(f"{{{n}}}" for n in names))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    sent = sorted(r.content for r in chat_requests(server))
    assert sent == sorted(
        [
            "02134|+44 20 7946 0958|3|19.99|12345678901234567890|1e5|1,000|3.10|true|2024-01-05|7",
            "10001|555-0100|12|5.0|1|2E3|2,500|0.5|false|2024-02-01|007",
        ]
    )
    out = pl.read_parquet("out/result.parquet")
    assert {n: out.schema[n] for n in ("qty", "price", "flag")} == {"qty": pl.Int64, "price": pl.Float64, "flag": pl.Boolean}
    text = ("zip", "phone", "big", "sci", "thousands", "ratio", "day", "sku")
    assert all(out.schema[n] == pl.String for n in text), out.schema
    assert out["zip"].to_list() == ["02134", "10001"] and out["sku"].to_list() == ["7", "007"]


def test_dtype_types_a_column_on_purpose_from_flags_or_yaml(server: FakeLLMServer) -> None:
    Path("in.csv").write_text(TYPED)
    result = run_with(server, "{qty} {day}", "--dtype", "qty=float", "--dtype", "day=date", "--dtype", "zip=int")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    out = pl.read_parquet("out/result.parquet")
    assert out.schema["qty"] == pl.Float64 and out.schema["day"] == pl.Date and out.schema["zip"] == pl.Int64
    assert out["day"].to_list() == [datetime.date(2024, 1, 5), datetime.date(2024, 2, 1)]
    assert out["zip"].to_list() == [2134, 10001]
    assert sorted(r.content for r in chat_requests(server)) == ["12.0 2024-02-01", "3.0 2024-01-05"]

    server.reset()
    Path("job.yaml").write_text(
        f"input: in.csv\noutput: out/y.parquet\nprompt: '{{ratio}} {{sku}}'\nmodel: m\nbase_url: {server.url}/v1\n"
        "dtypes:\n  sku: int\n  ratio: float\nnull_values: ['0.5']\nnull_as_empty: true\nprogress: false\n"
    )
    result = run_cli("run", "job.yaml")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/y.parquet")
    assert out["sku"].to_list() == [7, 7] and out["ratio"].to_list() == [3.1, None]
    assert sorted(r.content for r in chat_requests(server)) == [" 7", "3.1 7"]


@pytest.mark.parametrize(
    ("flag", "needles"),
    [
        ("Qty=int", ["--dtype names the column 'Qty'", "Did you mean 'qty'?"]),
        ("qty=integr", ["'integr' is not a type", "Did you mean 'integer'?", "str, int, float"]),
        (
            "thousands=int",
            ["--dtype thousands=int", "row 1 of in.csv", "'1,000'", "does not read as int", "nor does 1 more value"],
        ),
        ("day=date:%d/%m/%Y", ["--dtype day=date:%d/%m/%Y", "'2024-01-05'", "does not read as date"]),
        ("qty=text:x", ["only date and datetime take a format"]),
    ],
)
def test_a_dtype_that_cannot_be_kept_is_refused_before_anything_is_sent(
    server: FakeLLMServer, flag: str, needles: list[str]
) -> None:
    Path("in.csv").write_text(TYPED)
    assert_refused(run_with(server, "{qty}", "--dtype", flag), server, *needles)


# No phantom rows


def test_blank_whitespace_and_empty_lines_are_not_rows_in_csv(server: FakeLLMServer) -> None:
    Path("in.csv").write_text("id,text\n1,first\n\n   \n,\n2,second\n \t \n\n")
    result = run_with(server, "{text}")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    out = pl.read_parquet("out/result.parquet")
    assert out["text"].to_list() == ["first", "second"] and out["id"].to_list() == [1, 2]
    assert "2 rows" in result.output  # type: ignore[attr-defined]


def test_blank_and_whitespace_lines_are_not_rows_in_jsonl_and_null_values_apply(server: FakeLLMServer) -> None:
    Path("in.jsonl").write_text(
        '{"id": "00042", "text": "first", "note": "N/A"}\n\n   \n{"id": "7", "text": "second", "note": "keep"}\n\n'
    )
    result = run_with(server, "{id} {text} {note:-}", "--null-value", "N/A", inp="in.jsonl")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert sorted(r.content for r in chat_requests(server)) == ["00042 first -", "7 second keep"]
    out = pl.read_parquet("out/result.parquet")
    assert out["id"].to_list() == ["00042", "7"] and out["note"].to_list() == [None, "keep"]


def test_null_values_hold_back_a_required_cell_as_a_null_does(server: FakeLLMServer) -> None:
    write_table("in.csv", [{"id": "a", "text": "N/A"}, {"id": "b", "text": "real text"}])
    result = run_with(server, "{text}", "--null-value", "N/A")
    assert result.exit_code == 4  # type: ignore[attr-defined]  # rows not sent: the error rate
    assert [r.content for r in chat_requests(server)] == ["real text"]
    out = pl.read_parquet("out/result.parquet")
    assert out["error"].to_list()[0] == "not sent: column 'text' is null in this row"


def test_parquet_keeps_its_types_exactly(server: FakeLLMServer) -> None:
    df = pl.DataFrame(
        {
            "id": ["00042", "007"],
            "n": pl.Series([1, 2], dtype=pl.Int32),
            "price": pl.Series(["1.50", "2.00"]).str.to_decimal(scale=2),
            "day": [datetime.date(2024, 1, 5), datetime.date(2024, 2, 1)],
            "text": ["a b", "c d"],
        }
    )
    write_table("in.parquet", df)
    result = run_with(server, "{id} {price} {text}", inp="in.parquet")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    out = pl.read_parquet("out/result.parquet")
    assert out.select(df.columns).schema == df.schema and out.select(df.columns).equals(df)
    assert sorted(r.content for r in chat_requests(server)) == ["00042 1.50 a b", "007 2.00 c d"]


# Placeholders


def test_placeholders_reach_into_structs(server: FakeLLMServer) -> None:
    Path("in.jsonl").write_text(
        '{"id": 1, "user": {"plan": "pro", "org": {"name": "Acme"}}, "specs": {"color": "red"}}\n'
        '{"id": 2, "user": {"plan": "free", "org": {"name": "Bolt"}}, "specs": {"color": null}}\n'
    )
    result = run_with(server, "{user.plan} plan at {user.org.name}: {specs.color:unknown}", inp="in.jsonl")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert sorted(r.content for r in chat_requests(server)) == ["free plan at Bolt: unknown", "pro plan at Acme: red"]

    # A Parquet struct too, and a required field that is null holds its row back, named by its path.
    write_table("in.parquet", pl.DataFrame({"specs": [{"color": "blue"}, {"color": None}]}))
    server.reset()
    result = run_with(server, "Paint it {specs.color}", inp="in.parquet", out="out/p.parquet")
    assert result.exit_code == 4  # type: ignore[attr-defined]  # rows not sent: the error rate
    assert [r.content for r in chat_requests(server)] == ["Paint it blue"]
    assert pl.read_parquet("out/p.parquet")["error"][1] == "not sent: column 'specs.color' is null in this row"


def test_a_csv_header_with_a_dot_is_a_column(server: FakeLLMServer) -> None:
    Path("in.csv").write_text("user.plan,text\npro,hello\n")
    result = run_with(server, "{user.plan}: {text}")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert [r.content for r in chat_requests(server)] == ["pro: hello"]


@pytest.mark.parametrize(
    ("template", "needles"),
    [
        ("{body}", ["column 'body'", "Did you mean {Body}?"]),
        ("{BODY}", ["Did you mean {Body}?"]),
        ("{user.plna}", ["column 'user'", "no field 'plna'", "'plan'", "Did you mean {user.plan}?"]),
        ("{usr.plan}", ["column 'usr.plan'", "Did you mean {user.plan}?"]),
        ("{Body.text}", ["column 'Body'", "not a struct", "{Body}"]),
    ],
)
def test_unknown_placeholders_say_what_was_meant(server: FakeLLMServer, template: str, needles: list[str]) -> None:
    Path("in.jsonl").write_text('{"Body": "x", "user": {"plan": "pro"}}\n')
    assert_refused(run_with(server, template, inp="in.jsonl"), server, *needles)


# The first hour's other frictions


def test_estimate_cuts_long_sample_texts_and_full_shows_them(server: FakeLLMServer) -> None:
    big = "word " * 400_000  # a 2 MB cell
    write_table("in.parquet", pl.DataFrame({"id": [1, 2], "text": [big, "short text"]}))
    args = ["estimate", "-i", "in.parquet", "-p", "Summarise: {text}", "--base-url", f"{server.url}/v1", "-m", "m"]
    cut = run_cli(*args)
    assert cut.exit_code == 0, cut.output
    assert len(cut.output) < 5_000
    assert "[1,999,611 more characters; --full shows all]" in cut.output and '"content": "Summarise: short text"' in cut.output
    whole = run_cli(*args, "--full")
    assert whole.exit_code == 0 and len(whole.output) > 2_000_000 and "more characters" not in whole.output
    assert chat_requests(server) == []


def test_show_means_the_result_columns_under_a_result_prefix(server: FakeLLMServer) -> None:
    rows = [
        {"Ticket ID": "00042", "text": "fine", "error": "E-17"},
        {"Ticket ID": "00043", "text": "no [[fault:400]]", "error": ""},
    ]
    write_table("in.csv", rows)
    result = run_with(server, "{text}", "--result-prefix", "llm_", "--max-error-rate", "1")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]

    for extra in ([], ["--result-prefix", "llm_"]):
        shown = run_cli("show", "out/result.parquet", "--errors", "--columns", "Ticket ID,error", *extra)
        assert shown.exit_code == 0, shown.output
        header = [h.strip() for h in shown.output.splitlines()[1].strip("│").split("┆")]
        assert header == ["Ticket ID", "llm_error"]
        assert "00043" in shown.output and "HTTP 400" in shown.output and "00042" not in shown.output

    wrong = run_cli("show", "out/result.parquet", "--result-prefix", "x_")
    assert wrong.exit_code == 2 and "--result-prefix 'x_'" in wrong.output and "prefix 'llm_'" in wrong.output
