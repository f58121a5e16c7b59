"""Input tables: find the files, check them, and stream them in batches.

Only this module and `sink` touch table files. Reading goes through polars'
streaming engine, so memory depends on the batch size, not the table size.
polars reads only UTF-8 text: a CSV or JSONL file in another encoding is
transcoded once, in bounded memory, into a private temporary folder that the
`Table` owns (removed by `Table.close`, when the table is collected, or at
exit) and read from there.
"""

from __future__ import annotations

import codecs
import glob
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from pipeline.errors import ConfigError, InputError
from pipeline.tables import cells, storage
from pipeline.tables.scratch import Scratch

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
NATIVE = ("utf-8", "utf-8-sig")  # codec names polars reads itself (it skips a byte-order mark)
CHUNK = 1 << 20  # bytes decoded at a time when transcoding or looking for a bad byte
SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
# Separators worth suggesting when a CSV's header came out as one column.
CANDIDATES = {";": "';'", "\t": "tab", "|": "'|'", ",": "','"}


@dataclass(frozen=True)
class Part:
    """One input file that has rows: where polars reads it from and how."""

    path: Path | storage.Url  # as the user named it
    read: Path  # the file polars scans: `path`, or its UTF-8 copy
    separator: str  # CSV only
    schema: pl.Schema | None = None  # JSONL: the types read once, so later scans do not infer them again


@dataclass(frozen=True)
class Table:
    """The user's input: one or more files of one format, read as one table."""

    files: tuple[Path | storage.Url, ...]
    fmt: str
    schema: pl.Schema
    parts: tuple[Part, ...] = ()  # the files with rows; empty files are left out
    separator: str | None = None  # CSV: the separator of the first file, for hints
    # Owns the UTF-8 copies; its own finalizer removes them when the table is collected or at exit.
    scratch: tempfile.TemporaryDirectory[str] | None = field(default=None, compare=False, repr=False)
    frame: pl.LazyFrame | None = field(default=None, compare=False, repr=False)  # a table handed over in memory
    # What every read does to the cells as stored (blank lines, null values, types); `schema` is after it.
    reading: cells.Cells | None = field(default=None, compare=False, repr=False)
    rows: int | None = None  # counted when the input was checked (every line parsed then), before any limit

    @property
    def label(self) -> str:
        if self.frame is not None:
            return "the table passed in"
        return str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} {self.fmt} files"

    def close(self) -> None:
        """Remove the transcoded copies now (later reads of this table fail)."""
        if self.scratch is not None:
            self.scratch.cleanup()


def resolve_files(patterns: tuple[str, ...]) -> tuple[Path | storage.Url, ...]:
    """Expand globs, keep the user's order, refuse what is not there."""
    files: list[Path | storage.Url] = []
    for pattern in patterns:
        if storage.is_remote(pattern):
            files.extend(storage.resolve(pattern))
            continue
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern, recursive=True))
            if not matched:
                raise InputError(
                    f"No input file matches {pattern!r}. Check the pattern (quote it so the shell does not expand it)."
                )
            files.extend(Path(m) for m in matched)
            continue
        p = Path(pattern)
        if p.is_dir():
            raise InputError(f"Input {pattern} is a folder, not a file. Give the files, or a glob such as '{pattern}/*.parquet'.")
        if not p.exists():
            raise InputError(f"Input file {pattern} does not exist. Check the path (relative paths are read from {Path.cwd()}).")
        files.append(p)
    return tuple(dict.fromkeys(files))  # a file named twice is read once


def _format_of(path: Path | storage.Url) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"Input file {path} has an extension pipeline does not read ({path.suffix or 'none'}). "
            f"Use CSV (.csv, .tsv), Parquet (.parquet) or JSON Lines (.jsonl, .ndjson)."
        )
    return fmt


def codec_name(encoding: str) -> str:
    """Python's canonical name for a text encoding ('latin-1' -> 'iso8859-1'), or a ConfigError."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    # bytes-to-bytes codecs (base64, zlib...) are found by lookup but are no text encoding.
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise ConfigError(
            f"The input encoding {encoding!r} (--encoding) is not a text encoding Python knows. "
            "Give the file's encoding, e.g. --encoding utf-8, --encoding cp1252 (Excel on Windows), "
            "--encoding latin-1 or --encoding utf-16."
        )
    return info.name


def parse_separator(value: str | None) -> str | None:
    """The one-byte separator polars needs, from ';', tab, '\\t' or a name such as semicolon."""
    if value is None:
        return None
    sep = SEPARATOR_NAMES.get(value.lower(), value)
    if len(sep) != 1 or not sep.isascii() or sep in '"\r\n':
        raise ConfigError(
            f"The CSV separator {value!r} (--separator) should be one character, e.g. --separator ';', "
            "--separator '|' or --separator tab."
        )
    return sep


def _scan(path: Path, fmt: str, separator: str = ",", schema: pl.Schema | None = None) -> pl.LazyFrame:
    if fmt == "csv":
        # As text: the cells as the user wrote them; cells.decide types a column only where no value changes.
        return pl.scan_csv(path, separator=separator, infer_schema=False)
    if fmt == "parquet":
        return pl.scan_parquet(path)
    if schema is not None:
        return pl.scan_ndjson(path, schema=schema)
    # Whole-file type inference: a key that holds numbers for 100 lines and text later must not fail half-way through a paid run.
    return pl.scan_ndjson(path, infer_schema_length=None)


def _transcode(src: Path, codec: str, dest: Path, name: Path | storage.Url | None = None) -> None:
    """Copy `src` to `dest` as UTF-8, a chunk at a time (a bounded amount of memory whatever the size).
    `name` is the input as the user named it, for messages (`src` may be a local copy of an object)."""
    name = name or src
    decoder = codecs.getincrementaldecoder(codec)(errors="strict")
    offset = 0
    try:
        with src.open("rb") as fin, dest.open("w", encoding="utf-8", newline="") as fout:
            while chunk := fin.read(CHUNK):
                try:
                    fout.write(decoder.decode(chunk))
                except UnicodeDecodeError as exc:
                    at = offset + exc.start - (len(exc.object) - len(chunk))  # the decoder prepends bytes it held back
                    raise InputError(
                        f"Input file {name} is not valid {codec} text: the byte 0x{exc.object[exc.start]:02X} at offset "
                        f"{at:,} has no meaning in that encoding. Check the file's encoding and give it with --encoding "
                        "(latin-1 accepts any byte; files from Excel on Windows are usually cp1252)."
                    ) from None
                offset += len(chunk)
            fout.write(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise InputError(
            f"Input file {name} ends in the middle of a {codec} character. Check the file's encoding (--encoding)."
        ) from None
    except OSError as exc:
        raise InputError(
            f"Input file {name} could not be converted from {codec} to UTF-8 in {dest.parent}: {exc.strerror or exc}. "
            "Free some space there or point TMPDIR at a folder with room."
        ) from None


def _blank(path: Path) -> bool:
    """No header and no rows: nothing but whitespace (and perhaps a byte-order mark)."""
    if path.stat().st_size > 4096:
        return False
    return not path.read_bytes().removeprefix(codecs.BOM_UTF8).strip()


def open_table(
    patterns: tuple[str, ...],
    *,
    encoding: str = "utf-8",
    separator: str | None = None,
    headerless: Sequence[str] = (),
    null_values: Sequence[str] = (),
    dtypes: Mapping[str, str] | None = None,
) -> Table:
    """Resolve and check every input file before anything is sent.

    `encoding` applies to CSV and JSONL, `separator` to CSV. A file with no rows
    is left out (its header, if it has one, must match the others); when no file
    has even a header, the table has the `headerless` columns, as text.
    `null_values` and `dtypes` are --null-value and --dtype (see `cells`).
    """
    codec = codec_name(encoding)
    sep = parse_separator(separator)
    files = resolve_files(patterns)
    fmts = {_format_of(f) for f in files}
    if len(fmts) > 1:
        raise InputError(f"Inputs mix formats ({', '.join(sorted(fmts))}). Give files of one format per run.")
    fmt = fmts.pop()
    scratch = None
    parts: list[Part] = []
    schema: pl.Schema | None = None  # of the first file with rows: its types are the table's
    header: tuple[Path | storage.Url, pl.Schema] | None = None  # the first file with columns: the others must match it
    for i, f in enumerate(files):
        read = f if isinstance(f, Path) else Path()
        if isinstance(f, storage.Url):  # a local copy, read from here on as any local file is
            scratch = scratch or Scratch("pipeline-input-")
            read = Path(scratch.name) / f"{i}-object-{f.name}"
            storage.download(f, read)
        if fmt != "parquet" and codec not in NATIVE:
            scratch = scratch or Scratch("pipeline-input-")
            utf8 = Path(scratch.name) / f"{i}-{f.name}"
            _transcode(read, codec, utf8, name=f)
            read = utf8
        file_sep = sep or ("\t" if f.suffix.lower() == ".tsv" else ",")
        this: pl.Schema | None = None
        try:
            if fmt != "parquet" and _blank(read):
                continue
            this = _scan(read, fmt, file_sep).collect_schema()
            has_rows = _scan(read, fmt, file_sep, this if fmt == "jsonl" else None).head(1).collect().height > 0
        except (pl.exceptions.PolarsError, OSError) as exc:
            native = [f] if codec in NATIVE and isinstance(f, Path) else []
            hint = _explain(exc, native, this, file_sep if fmt == "csv" else None)
            raise InputError(
                f"Input file {f} could not be read as {fmt}: {_short(exc)}.{hint or f' Check that the file is a valid {fmt} file.'}"
            ) from None
        if header is None:
            header = (f, this)
        elif list(this.names()) != list(header[1].names()):
            raise InputError(
                f"Input file {f} has columns {list(this.names())}, but {header[0]} has {list(header[1].names())}. "
                f"All inputs of one run must have the same columns."
            )
        if has_rows:
            parts.append(Part(path=f, read=read, separator=file_sep, schema=this if fmt == "jsonl" else None))
            schema = schema or this
    if schema is None:
        schema = header[1] if header else pl.Schema(dict.fromkeys(headerless, pl.String()))
    first_sep = (sep or ("\t" if files[0].suffix.lower() == ".tsv" else ",")) if fmt == "csv" else None
    table = Table(files=files, fmt=fmt, schema=schema, parts=tuple(parts), separator=first_sep, scratch=scratch)
    return _settle(table, null_values, dtypes or {})


def _settle(table: Table, null_values: Sequence[str], dtypes: Mapping[str, str]) -> Table:
    """The table with its cells settled (see `cells`): one pass that types, counts and parses every line,
    for CSV and JSONL always (it is the check that finds a malformed line before anything is sent), for
    Parquet and tables in memory only when --null-value or --dtype asks for something."""
    text = table.fmt in ("csv", "jsonl")
    plan = cells.prepare(table.schema, table.label, csv=table.fmt == "csv", null_values=null_values, dtypes=dtypes)
    if not (text or plan.changes_anything):
        return table
    table = replace(table, reading=plan)
    if not table.parts and table.frame is None:  # no rows: nothing to look at, the header decides
        return replace(table, schema=plan.schema(table.schema), rows=0)
    try:
        settled, rows = cells.decide(_stored(table), plan, table.label, infer=table.fmt == "csv")
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(table, exc) from None
    return replace(table, reading=settled, schema=settled.schema(table.schema), rows=rows)


def _unreadable(table: Table, exc: BaseException) -> InputError:
    hint = _explain(exc, _native_files(table), table.schema, table.separator)
    if not hint and table.fmt == "csv":
        hint = " Look for a line with extra separators or an unclosed quote."
    return InputError(f"Input {table.label} could not be read in full: {_short(exc)}.{hint}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def separator_hint(table: Table) -> str:
    """A sentence suggesting --separator when a CSV's header came out as a single column, else ''."""
    if table.separator is None:
        return ""
    return _separator_hint(table.schema, table.separator)


def _separator_hint(schema: pl.Schema | None, used: str) -> str:
    if schema is None or len(schema) != 1:
        return ""
    (name,) = schema.names()
    counts = {c: name.count(c) for c in CANDIDATES if c != used}
    found = max(counts, key=lambda c: counts[c])
    if not counts[found]:
        return ""
    return (
        f" Its header was read as the single column {name!r}: the file seems to separate fields with "
        f"{CANDIDATES[found]}, not {CANDIDATES.get(used, repr(used))}. Pass --separator {CANDIDATES[found]}."
    )


def _explain(exc: BaseException, utf8_files: Sequence[Path], schema: pl.Schema | None, separator: str | None) -> str:
    """What to do about a polars read error: a file in another encoding, or the wrong separator."""
    text = str(exc).lower()
    if "utf-8" in text or "utf8" in text:
        for f in utf8_files:
            found = _not_utf8(f)
            if found:
                return " " + found
    return _separator_hint(schema, separator) if separator else ""


def _not_utf8(path: Path) -> str:
    """Where `path` stops being UTF-8 and which encoding reads it, as advice; '' if it is all UTF-8.

    Only called after polars refused a file, so a pass over it here costs nothing on the happy path."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                data, bad = exc.object, exc.start
                break
            if not chunk:
                return ""
            lines += chunk.count(b"\n")
    line_no = lines + data.count(b"\n", 0, bad) + 1
    start = data.rfind(b"\n", 0, bad) + 1
    end = data.find(b"\n", bad)
    line = data[start : end if end >= 0 else len(data)].rstrip(b"\r")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not lines:
        return (
            "The file is not UTF-8 but UTF-16 (it starts with a UTF-16 byte-order mark, as Excel's 'Unicode text' does): "
            "give its encoding with --encoding utf-16, or save it as UTF-8."
        )
    try:
        line.decode("cp1252")
        guess, also = "cp1252", " (or latin-1)"
    except UnicodeDecodeError:
        guess, also = "latin-1", ""
    shown = line.decode(guess)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return (
        f"The file is not UTF-8 text: line {line_no} has the byte 0x{data[bad]:02X}, which UTF-8 does not allow. "
        f"Give the file's encoding with --encoding {guess}{also}, which reads that line as {shown!r}, "
        "or save the file as UTF-8."
    )


def in_memory(
    frame: pl.DataFrame | pl.LazyFrame,
    null_values: Sequence[str] = (),
    dtypes: Mapping[str, str] | None = None,
) -> Table:
    """A table the caller already holds (the Python API): read in batches like a file, never copied."""
    lf = frame.lazy()
    return _settle(Table(files=(), fmt="frame", schema=lf.collect_schema(), frame=lf), null_values, dtypes or {})


def _stored(table: Table) -> pl.LazyFrame:
    """The rows as stored, before `table.reading` (the whole table: no limit)."""
    if table.frame is not None:
        return table.frame
    frames = [_scan(p.read, table.fmt, p.separator, p.schema) for p in table.parts]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")


def lazy(table: Table, limit: int | None = None) -> pl.LazyFrame:
    if not table.parts and table.frame is None:  # every file empty: no rows, the table's columns
        return pl.LazyFrame(schema=table.schema)
    lf = _stored(table)
    if table.reading is not None:
        lf = table.reading.apply(lf)
    return lf.head(limit) if limit is not None else lf


def _native_files(table: Table) -> list[Path]:
    """The files polars reads as they are (not a UTF-8 copy): the only ones that can hold bad UTF-8."""
    return [p.path for p in table.parts if p.read == p.path and table.fmt != "parquet"]


def count_rows(table: Table, limit: int | None = None) -> int:
    """Rows to process. CSV and JSONL were parsed in full when the table was opened (every column, so
    that a malformed line far down the file is reported before any request is sent), and counted then."""
    if table.rows is not None:
        return table.rows if limit is None else min(table.rows, limit)
    try:  # Parquet: row counts come from the footer; pages were checksummed on write
        return int(lazy(table, limit).select(pl.len()).collect().item())
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(table, exc) from None


def batches(table: Table, batch_size: int, limit: int | None = None) -> Iterator[pl.DataFrame]:
    """Stream the table in input order, `batch_size` rows at a time."""
    try:
        for df in lazy(table, limit).collect_batches(chunk_size=batch_size, maintain_order=True):
            if df.height:
                yield df
    except pl.exceptions.PolarsError as exc:
        hint = _explain(exc, _native_files(table), table.schema, table.separator)
        raise InputError(f"Input {table.label} could not be read part-way through: {_short(exc)}.{hint}") from None
