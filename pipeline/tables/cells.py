"""What a cell of the input says: the text the user wrote, typed only where no text changes.

CSV holds text, not types. Guessing them rewrote what users wrote: "00042" became 42 in the
prompt and in the output, "+44 20 7946 0958" lost its plus, "1e5", "1,000" and "3.10" were
rewritten. The rule here: a CSV column is typed only when every one of its values comes back
unchanged from the type (canonical integers, floats as they are written back, true/false),
so a typed column prints exactly as the file said; every other column stays text. Types
kept where nothing changes mean the jobs that worked keep their typed Parquet outputs and
their numeric --param-column values. JSON Lines and Parquet carry their own types and keep
them (a JSON string stays a string, whatever it looks like).

On top of that, for every input: `--dtype COLUMN=TYPE` types a column on purpose (a value that
does not convert is named, with its row, before anything is sent), and `--null-value TEXT`
names texts that mean a missing cell. A CSV line with nothing in it (blank, whitespace, only
separators) is not a row.

`decide` makes one pass over the input: it settles the types, counts the rows and parses
every line, so a malformed line far down is found before anything is sent. `apply` is what
each later read does with what `decide` found, in polars expressions (no per-row Python).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from pipeline.errors import ConfigError, InputError
from pipeline.requests.fields import did_you_mean

# The types --dtype takes, by the names a user is likely to write.
TYPES: dict[str, pl.DataType] = {
    "str": pl.String(),
    "string": pl.String(),
    "text": pl.String(),
    "int": pl.Int64(),
    "integer": pl.Int64(),
    "int64": pl.Int64(),
    "float": pl.Float64(),
    "float64": pl.Float64(),
    "double": pl.Float64(),
    "number": pl.Float64(),
    "bool": pl.Boolean(),
    "boolean": pl.Boolean(),
    "date": pl.Date(),
    "datetime": pl.Datetime("us"),
}
TYPE_NAMES = "str, int, float, bool, date or datetime (date and datetime may name a format: date:%d/%m/%Y)"
# Texts --dtype bool reads, whatever their case; anything else is a value that does not convert.
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False, "y": True, "n": False}
# The texts a CSV column of booleans is typed from: exactly what polars writes back, so nothing changes.
BOOL_TEXTS = ("true", "false")
SHOWN_VALUE = 60  # characters of a value that does not convert, in the message


@dataclass(frozen=True)
class Dtype:
    """A type asked for with --dtype: its name as given, the polars type, a date format if any."""

    name: str
    dtype: pl.DataType
    fmt: str | None = None


def parse_dtypes(given: Mapping[str, str]) -> dict[str, Dtype]:
    """--dtype COLUMN=TYPE pairs (YAML `dtypes:`) as types; an unknown type is a ConfigError (exit 2)."""
    out: dict[str, Dtype] = {}
    for column, text in given.items():
        name, _, fmt = str(text).strip().partition(":")
        dtype = TYPES.get(name.strip().lower())
        if dtype is None:
            near = difflib.get_close_matches(name.strip().lower(), TYPES, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--dtype {column}={text}: {name!r} is not a type pipeline knows.{hint} Give {TYPE_NAMES}.")
        if fmt and dtype not in (pl.Date(), pl.Datetime("us")):
            raise ConfigError(f"--dtype {column}={text}: only date and datetime take a format after ':'.")
        out[column] = Dtype(str(text).strip(), dtype, fmt.strip() or None)
    return out


@dataclass(frozen=True)
class Cells:
    """How every read of a table turns the cells as stored into the cells the job sees."""

    drop_blank_rows: bool = False  # CSV: a line with nothing in it is not a row
    null_values: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ()  # the String columns that null values apply to
    inferred: dict[str, pl.DataType] = field(default_factory=dict)  # CSV columns typed because nothing changes
    asked: dict[str, tuple[pl.DataType, Dtype]] = field(default_factory=dict)  # column -> (stored type, --dtype)

    @property
    def changes_anything(self) -> bool:
        return bool(self.drop_blank_rows or self.null_values or self.inferred or self.asked)

    def apply(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """The frame as the job sees it: blank rows dropped, null values nulled, columns typed."""
        if self.drop_blank_rows:
            lf = lf.filter(~_blank_row(self.text_columns))
        if self.null_values:
            lf = lf.with_columns(_nulled(c, self.null_values) for c in self.text_columns)
        casts = [_typed(c, t) for c, t in self.inferred.items()]
        casts += [_convert(pl.col(c), stored, want).alias(c) for c, (stored, want) in self.asked.items()]
        return lf.with_columns(casts) if casts else lf

    def schema(self, stored: pl.Schema) -> pl.Schema:
        """The columns' types after `apply`."""
        types = dict(stored)
        types.update(self.inferred)
        types.update({c: want.dtype for c, (_, want) in self.asked.items()})
        return pl.Schema(types)


def _blank_row(columns: Sequence[str]) -> pl.Expr:
    # A blank line parses as a row of nulls, a line of spaces as one cell of spaces; ",,," as nulls too.
    return pl.all_horizontal(pl.col(c).is_null() | pl.col(c).str.contains(r"^\s*$") for c in columns)


def _typed(column: str, dtype: pl.DataType) -> pl.Expr:
    """A text column as the type every one of its values reads back unchanged from (strict: a file
    changed since it was checked fails loudly rather than turning values null)."""
    col = pl.col(column)
    if dtype == pl.Boolean():
        return col.replace_strict({"true": True, "false": False}, return_dtype=pl.Boolean()).alias(column)
    return col.cast(dtype).alias(column)


def _nulled(column: str, values: tuple[str, ...]) -> pl.Expr:
    col = pl.col(column)
    return pl.when(col.is_in(values)).then(None).otherwise(col).alias(column)


def _convert(col: pl.Expr, stored: pl.DataType, want: Dtype) -> pl.Expr:
    """`col` as the type asked for; a value that does not convert becomes null (decide() refuses those first)."""
    target = want.dtype
    if target == stored:
        return col
    if stored != pl.String():
        return col.cast(target, strict=False)
    text = col.str.strip_chars()
    if target == pl.Boolean():
        return text.str.to_lowercase().replace_strict(BOOL_WORDS, default=None, return_dtype=pl.Boolean())
    if target == pl.Date():
        return text.str.to_date(want.fmt, strict=False)
    if isinstance(target, pl.Datetime):
        return text.str.to_datetime(want.fmt, strict=False, time_unit="us")
    if target == pl.String():
        return col
    return text.cast(target, strict=False)


def prepare(
    schema: pl.Schema,
    where: str,
    *,
    csv: bool,
    null_values: Sequence[str] = (),
    dtypes: Mapping[str, str] | None = None,
) -> Cells:
    """What `apply` will do, before the pass that settles the inferred types: checks the --dtype
    columns and types against `schema` (the columns as stored). Raises UserError."""
    asked = parse_dtypes(dtypes or {})
    columns = list(schema.names())
    for column, want in asked.items():
        if column not in columns:
            raise InputError(f"--dtype names the column {column!r}, which {where} does not have.{_near(column, columns)}")
        stored = schema[column]
        if stored.is_nested() or stored in (pl.Binary(), pl.Object()):
            raise InputError(
                f"--dtype {column}={want.name}: column {column!r} of {where} holds {stored} values, which do not convert "
                "to a single value. Leave it out of --dtype."
            )
    text = tuple(c for c, t in schema.items() if t == pl.String())
    return Cells(
        drop_blank_rows=csv and bool(text),
        null_values=tuple(dict.fromkeys(null_values)),
        text_columns=text,
        asked={c: (schema[c], want) for c, want in asked.items()},
    )


def decide(lf: pl.LazyFrame, cells: Cells, where: str, *, infer: bool) -> tuple[Cells, int]:
    """One pass over the input (after blank rows and null values): the CSV columns typed because no
    value changes (`infer`), the rows counted, every --dtype value checked. Returns the settled
    Cells and the row count; raises InputError for a value that does not convert. Polars errors
    (a malformed line) are left to the caller, which knows the files to explain them by."""
    base = Cells(cells.drop_blank_rows, cells.null_values, cells.text_columns)
    frame = base.apply(lf)
    candidates = [c for c in cells.text_columns if c not in cells.asked] if infer else []
    exprs: list[pl.Expr] = [pl.len().alias("__rows")]
    for i, c in enumerate(candidates):
        exprs.extend(_lossless(c, i))
    for i, (c, (stored, want)) in enumerate(cells.asked.items()):
        col = pl.col(c)
        bad = col.is_not_null() & _convert(col, stored, want).is_null()
        exprs.append(bad.sum().alias(f"bad{i}"))
        exprs.append(col.filter(bad).first().cast(pl.String).alias(f"value{i}"))
        exprs.append(pl.int_range(pl.len()).filter(bad).first().alias(f"at{i}"))
    found = frame.select(exprs).collect(engine="streaming").row(0, named=True)
    for i, (c, (_, want)) in enumerate(cells.asked.items()):
        if found[f"bad{i}"]:
            value = str(found[f"value{i}"])
            shown = value if len(value) <= SHOWN_VALUE else value[: SHOWN_VALUE - 3] + "..."
            others = found[f"bad{i}"] - 1
            raise InputError(
                f"--dtype {c}={want.name}: row {found[f'at{i}'] + 1:,} of {where} (not counting the header) has {shown!r} in "
                f"column {c!r}, which does not read as {want.name}"
                + (f", nor {'does 1 more value' if others == 1 else f'do {others:,} more values'}" if others else "")
                + ". Fix the values, name the "
                "texts that mean missing with --null-value, or leave the column out of --dtype (it is then read as written)."
            )
    inferred: dict[str, pl.DataType] = {}
    for i, c in enumerate(candidates):
        if not found[f"any{i}"]:
            continue  # an empty column stays text: nothing says what it holds
        for kind, dtype in (("int", pl.Int64()), ("float", pl.Float64()), ("bool", pl.Boolean())):
            if found[f"{kind}{i}"]:
                inferred[c] = dtype
                break
    settled = Cells(cells.drop_blank_rows, cells.null_values, cells.text_columns, inferred, cells.asked)
    return settled, int(found["__rows"])


def _lossless(column: str, i: int) -> list[pl.Expr]:
    """Whether every value of a text column reads back unchanged as an integer, a float, a boolean."""
    col = pl.col(column)

    def unchanged(dtype: pl.DataType) -> pl.Expr:
        return (col.is_null() | (col.cast(dtype, strict=False).cast(pl.String) == col).fill_null(False)).all()

    return [
        unchanged(pl.Int64()).alias(f"int{i}"),
        unchanged(pl.Float64()).alias(f"float{i}"),
        (col.is_null() | col.is_in(BOOL_TEXTS)).all().alias(f"bool{i}"),
        col.is_not_null().any().alias(f"any{i}"),
    ]


def _near(name: str, columns: Sequence[str]) -> str:
    """' Did you mean 'Body'?' for a name that differs in case or spelling, then the columns there are."""
    near = did_you_mean(name, list(columns))
    listed = f" Its columns are: {', '.join(repr(c) for c in columns)}."
    return f" Did you mean {near!r}?{listed}" if near else listed
