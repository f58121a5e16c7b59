"""Input tables: find the files, check them, and stream them in batches.

Only this module and `sink` touch table files. Reading goes through polars'
streaming engine, so memory depends on the batch size, not the table size.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import InputError

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class Table:
    """The user's input: one or more files of one format, read as one table."""

    files: tuple[Path, ...]
    fmt: str
    schema: pl.Schema

    @property
    def label(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} {self.fmt} files"


def resolve_files(patterns: tuple[str, ...]) -> tuple[Path, ...]:
    """Expand globs, keep the user's order, refuse what is not there."""
    files: list[Path] = []
    for pattern in patterns:
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


def _format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"Input file {path} has an extension pipeline does not read ({path.suffix or 'none'}). "
            f"Use CSV (.csv, .tsv), Parquet (.parquet) or JSON Lines (.jsonl, .ndjson)."
        )
    return fmt


def _scan(path: Path, fmt: str) -> pl.LazyFrame:
    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        # Whole-file type inference: a column that is numeric for 100 rows and
        # text later must not fail half-way through a paid run.
        return pl.scan_csv(path, separator=sep, infer_schema_length=None)
    if fmt == "parquet":
        return pl.scan_parquet(path)
    return pl.scan_ndjson(path, infer_schema_length=None)


def open_table(patterns: tuple[str, ...]) -> Table:
    """Resolve and check every input file before anything is sent."""
    files = resolve_files(patterns)
    fmts = {_format_of(f) for f in files}
    if len(fmts) > 1:
        raise InputError(f"Inputs mix formats ({', '.join(sorted(fmts))}). Give files of one format per run.")
    fmt = fmts.pop()
    schema: pl.Schema | None = None
    for f in files:
        try:
            this = _scan(f, fmt).collect_schema()
            first = _scan(f, fmt).head(1).collect()
        except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
            raise InputError(
                f"Input file {f} could not be read as {fmt}: {_short(exc)}. Check that the file is a valid {fmt} file."
            ) from None
        if not this or first.height == 0:
            raise InputError(f"Input file {f} is empty (no rows). Give a table with at least one row.")
        if schema is None:
            schema = this
        elif list(this.names()) != list(schema.names()):
            raise InputError(
                f"Input file {f} has columns {list(this.names())}, but {files[0]} has {list(schema.names())}. "
                f"All inputs of one run must have the same columns."
            )
    assert schema is not None
    return Table(files=files, fmt=fmt, schema=schema)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def lazy(table: Table, limit: int | None = None) -> pl.LazyFrame:
    frames = [_scan(f, table.fmt) for f in table.files]
    lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")
    return lf.head(limit) if limit is not None else lf


def count_rows(table: Table, limit: int | None = None) -> int:
    """Rows to process. CSV and JSONL are parsed in full here, every column, so that a
    malformed line far down the file is reported now, before any request is sent."""
    query = lazy(table, limit)
    try:
        if table.fmt == "parquet":  # row counts come from the footer; pages were checksummed on write
            return int(query.select(pl.len()).collect().item())
        return int(query.select(pl.len().alias("__rows"), pl.all().null_count()).collect().get_column("__rows").item())
    except pl.exceptions.PolarsError as exc:
        hint = " Look for a line with extra separators or an unclosed quote." if table.fmt == "csv" else ""
        raise InputError(f"Input {table.label} could not be read in full: {_short(exc)}.{hint}") from None


def batches(table: Table, batch_size: int, limit: int | None = None) -> Iterator[pl.DataFrame]:
    """Stream the table in input order, `batch_size` rows at a time."""
    try:
        for df in lazy(table, limit).collect_batches(chunk_size=batch_size, maintain_order=True):
            if df.height:
                yield df
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"Input {table.label} could not be read part-way through: {_short(exc)}.") from None
