"""The output: input columns, then result columns, one row per input row, in order.

The format follows the output's extension: Parquet (.parquet, .pq), CSV (.csv)
or JSON Lines (.jsonl, .ndjson); `-` streams JSON Lines to stdout. Batches are
appended to a temporary file as they complete (so memory does not grow with
the table) and the file is renamed into place only when every row is in it: a
reader never sees a half-written output. Stdout cannot be taken back, so there
each batch goes out as soon as it is in order.
"""

from __future__ import annotations

import codecs
import io
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import polars as pl
import pyarrow.parquet as pq

from pipeline.errors import FatalError, InputError
from pipeline.tables import storage
from pipeline.tables.checkpoint import RESULT_COLUMNS, STORED_SCHEMA
from pipeline.tables.columns import ADDED

STDOUT = "-"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def is_stdout(path: Path | str | storage.Url) -> bool:
    return str(path) == STDOUT


def describe(path: Path | storage.Url) -> str:
    """The output as the summary names it."""
    if isinstance(path, storage.Folder):
        return f"{path}/ (Parquet parts, part-00000.parquet ... in input order)"
    if isinstance(path, storage.Url):
        return f"{path} (a local copy in {storage.local_copy(path)})"
    return "stdout (JSON Lines)" if is_stdout(path) else str(path)


def result_names(prefix: str, added: Sequence[str] = ()) -> list[str]:
    """The result columns as written to the output: the base ones and those the job's settings add."""
    return [prefix + c for c in (*RESULT_COLUMNS, *added)]


def check_output(
    path: Path | storage.Url,
    inputs: Sequence[Path | storage.Url],
    input_columns: list[str],
    extracted: Sequence[str] = (),
    result_prefix: str = "",
    added: Sequence[str] = (),
) -> None:
    """Refuse, before any request, an output we could not write, one that is an input, or columns that clash.
    `added` are the result columns the job's settings add (cost_usd, tool_calls...)."""
    results = result_names(result_prefix, added)
    clash = [c for c in input_columns if c in results]
    if clash:
        several = len(clash) > 1
        named = ", ".join(repr(c) for c in clash)
        if result_prefix:
            fix = f"Choose another --result-prefix (now {result_prefix!r}), or rename {'them' if several else 'it'} in the input."
        else:
            fix = (
                f"Rename {'them' if several else 'it'} in the input, or, simpler, pass --result-prefix llm_ to write "
                "the result columns as llm_completion, llm_status..."
            )
        raise InputError(
            f"Input column{'s' if several else ''} {named} would clash with the output's result columns "
            f"({', '.join(results)}). {fix}"
        )
    # The extracted columns are made beside the unprefixed result columns, so those names are taken too.
    taken = [c for c in extracted if c in input_columns or c in results or c in (*RESULT_COLUMNS, *added)]
    if taken:
        raise InputError(
            f"The schema's output column{'s' if len(taken) > 1 else ''} {', '.join(repr(c) for c in taken)} would clash with "
            f"an input or result column. Pass --schema-prefix x_ (schema_prefix in YAML) or --schema-output struct."
        )
    if is_stdout(path):
        return
    if isinstance(path, storage.Folder):
        _check_folder(path, inputs)
        return
    if isinstance(path, storage.Url):
        if any(str(path) == str(f) for f in inputs):
            raise InputError(f"Output {path} is also an input: the run would overwrite its own input. Choose another --output.")
        if path.suffix.lower() not in FORMATS:
            raise InputError(f"Output {path} has no output format's extension: end it in .parquet, .csv or .jsonl.")
        storage.check_writable(path)  # the bucket is there and we may write to it, before anything is sent
        return
    if any(not isinstance(f, storage.Url) and path.resolve() == f.resolve() for f in inputs):
        raise InputError(f"Output {path} is also an input: the run would overwrite its own input. Choose another --output.")
    if path.suffix.lower() not in FORMATS:
        raise InputError(
            f"Output {path} has no output format's extension: end it in .parquet, .csv or .jsonl "
            f"(or give --output - for JSON Lines on stdout)."
        )
    # Check without creating anything: `pipeline estimate` runs this too.
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"Cannot write the output {path}: {existing} is not a folder we may write to. Choose another --output.")


def _check_folder(path: Path, inputs: Sequence[Path | storage.Url]) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(f"Output {path}/ names a folder, but {path} is a file. Choose another --output.")
    if any(not isinstance(f, storage.Url) and path.resolve() in f.resolve().parents for f in inputs):
        raise InputError(
            f"Output folder {path}/ holds an input of this run: its parts would be written beside it. Choose another --output."
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(
            f"Cannot write the output folder {path}/: {existing} is not a folder we may write to. Choose another --output."
        )


def open_sink(path: Path | storage.Url, result_prefix: str = "", *, bom: bool = False) -> Sink:
    """The sink for an output checked by `check_output`; `bom` starts a CSV with a UTF-8 byte-order mark."""
    if is_stdout(path):
        return StdoutSink(result_prefix)
    if isinstance(path, storage.Folder):
        return PartsSink(Path(path), result_prefix)
    kind = FORMATS[path.suffix.lower()]
    if kind == "csv":
        return CsvSink(path, result_prefix, bom=bom)
    if kind == "jsonl":
        return JsonLinesSink(path, result_prefix)
    return ParquetSink(path, result_prefix)


class Sink:
    """Where finished batches go, in input order: `write` each, then `commit`, or `abort` on failure."""

    def __init__(self, result_prefix: str = "") -> None:
        # The checkpoint and the engine know the result columns by their own names;
        # the prefix exists only in what the user reads.
        self._rename = {c: result_prefix + c for c in (*RESULT_COLUMNS, *ADDED)} if result_prefix else {}

    def write(self, inputs: pl.DataFrame, results: pl.DataFrame) -> None:
        """Append rows: the input's columns and their results (result columns by their own names,
        then any extracted by a schema)."""
        self._append(inputs.hstack(results.rename(self._rename, strict=False) if self._rename else results))

    def _append(self, frame: pl.DataFrame) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Everything is written: make the output whole."""

    def abort(self) -> None:
        """Drop what is not committed; a no-op after `commit`."""


class _FileSink(Sink):
    """A file written under a temporary name and renamed into place by `commit`; for an object
    output, the file is its local copy, uploaded by `commit` once it is whole."""

    def __init__(self, path: Path | storage.Url, result_prefix: str = "") -> None:
        super().__init__(result_prefix)
        self.remote = path if isinstance(path, storage.Url) else None
        path = storage.local_copy(path) if isinstance(path, storage.Url) else path
        self.path = path
        # A run killed mid-write leaves its temporary file; the checkpoint lock
        # means no other run is writing this output, so old ones can go.
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def _close(self) -> bool:
        """Close the temporary file; whether there is one to move into place."""
        raise NotImplementedError

    def commit(self) -> None:
        if not self._close():
            return
        fd = os.open(self._tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)
        if self.remote is not None:
            storage.upload(self.path, self.remote)

    def abort(self) -> None:
        self._close()
        self._tmp.unlink(missing_ok=True)


# Rows per Parquet row group: readers scan and skip whole groups, so groups
# of one 5,000-row batch each are needlessly small (2,000 groups for 10M
# rows). Measured over a 10M-row stream, 25,000 costs about 6 MB more peak
# memory than writing each batch at once; 100,000 cost 75 MB more.
ROW_GROUP = 25_000


class ParquetSink(_FileSink):
    def __init__(self, path: Path | storage.Url, result_prefix: str = "") -> None:
        super().__init__(path, result_prefix)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    def _append(self, frame: pl.DataFrame) -> None:
        """Rows reach the file in row groups of about ROW_GROUP rows."""
        self._pending.append(frame)
        self._pending_rows += frame.height
        if self._pending_rows >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pl.concat(self._pending, how="vertical_relaxed").to_arrow()
        self._pending, self._pending_rows = [], 0
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="zstd")
        elif table.schema != self._writer.schema:
            table = table.cast(self._writer.schema)
        self._writer.write_table(table)

    def commit(self) -> None:
        self._flush()
        super().commit()

    def _close(self) -> bool:
        if self._writer is None:
            return False
        self._writer.close()
        self._writer = None
        return True

    def abort(self) -> None:
        self._pending = []
        super().abort()


PART = "part-{:05d}.parquet"  # parts sort by name in input order (a 6th digit after 99,999 parts still sorts after)


class PartsSink(Sink):
    """A folder of Parquet parts: each batch a part, named in input order, readable as one table by
    polars, pyarrow, DuckDB and Ray. Parts are written into a hidden folder beside it (not inside: polars
    reads a folder's hidden subfolders too) and moved into place by `commit`, where they replace the
    folder's old parts (other files in it are left alone): a reader never sees a part half written,
    nor parts of a run that did not finish."""

    def __init__(self, folder: Path, result_prefix: str = "", tag: str | None = None) -> None:
        super().__init__(result_prefix)
        self.folder = folder
        # The checkpoint lock means no other run writes this output: pending parts left by a killed one can go.
        for stale in folder.parent.glob(f".{folder.name}.pending-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.pending = folder.parent / f".{folder.name}.pending-{tag or os.getpid()}"
        self.pending.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def _append(self, frame: pl.DataFrame) -> None:
        write_part(frame, self.pending / PART.format(self.written))
        self.written += 1

    def commit(self) -> None:
        """Move the new parts into place; old parts beyond the new ones go."""
        new = sorted(self.pending.glob("part-*.parquet"))
        names = {p.name for p in new}
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("part-*.parquet"):
            if old.name not in names:
                old.unlink()
        for part in new:
            os.replace(part, self.folder / part.name)
        _fsync_dir(self.folder)
        self.pending.rmdir()

    def abort(self) -> None:
        shutil.rmtree(self.pending, ignore_errors=True)


def write_part(frame: pl.DataFrame, path: Path) -> None:
    """One part, flushed to disk (its folder is fsynced when the parts are moved into place)."""
    with open(path, "wb") as f:
        frame.write_parquet(f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _StreamSink(_FileSink):
    """A text format appended batch by batch: nothing is held back."""

    def __init__(self, path: Path | storage.Url, result_prefix: str = "") -> None:
        super().__init__(path, result_prefix)
        self._file: BinaryIO | None = None
        self._first = True

    def _append(self, frame: pl.DataFrame) -> None:
        if self._file is None:
            self._file = open(self._tmp, "wb")  # noqa: SIM115  # held open across batches, closed by commit/abort
        self._encode(frame, self._file)
        self._first = False

    def _encode(self, frame: pl.DataFrame, out: BinaryIO) -> None:
        raise NotImplementedError

    def _close(self) -> bool:
        if self._file is None:
            return False
        self._file.close()
        self._file = None
        return True


class CsvSink(_StreamSink):
    def __init__(self, path: Path | storage.Url, result_prefix: str = "", *, bom: bool = False) -> None:
        super().__init__(path, result_prefix)
        # Excel reads a CSV without the mark in the machine's legacy code page: "JosÃ©" for "José".
        self._bom = bom

    def _encode(self, frame: pl.DataFrame, out: BinaryIO) -> None:
        if self._first and self._bom:
            out.write(codecs.BOM_UTF8)
        frame.pipe(as_flat).write_csv(out, include_header=self._first)


class JsonLinesSink(_StreamSink):
    def _encode(self, frame: pl.DataFrame, out: BinaryIO) -> None:
        frame.write_ndjson(out)


class StdoutSink(Sink):
    """JSON Lines on stdout, each batch flushed as soon as it is in order, for a pipe to read as they come."""

    def __init__(self, result_prefix: str = "") -> None:
        super().__init__(result_prefix)
        self._out = sys.stdout.buffer

    def _append(self, frame: pl.DataFrame) -> None:
        # Encoded here, one batch at a time: polars writing to the pipe itself would hide a broken pipe in an OSError.
        data = io.BytesIO()
        frame.write_ndjson(data)
        try:
            self._out.write(data.getbuffer())
            self._out.flush()
        except BrokenPipeError:
            raise self._closed() from None

    def _closed(self) -> FatalError:
        # The reader is gone (`| head`): later writes, and the flush at exit, would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._out.fileno())
        return FatalError(
            "stdout was closed by its reader before every row was written (--output - piped into a command that stopped reading)",
            kind="broken_pipe",
        )

    def commit(self) -> None:
        try:
            self._out.flush()
        except BrokenPipeError:
            raise self._closed() from None


def as_flat(frame: pl.DataFrame) -> pl.DataFrame:
    """List, array and struct columns as JSON text, for a format of flat cells (CSV)."""
    nested = [c for c, t in frame.schema.items() if t.is_nested()]
    if not nested:
        return frame
    # json_encode takes a struct: wrap each value as {"v": value} and cut the wrapper off the text.
    return frame.with_columns(
        pl.when(pl.col(c).is_not_null())
        .then(pl.struct(pl.col(c).alias("v")).struct.json_encode().str.slice(5).str.strip_suffix("}"))
        .alias(c)
        for c in nested
    )


def result_frame(results: list[tuple[object, ...]]) -> pl.DataFrame:
    return pl.DataFrame(results, schema=STORED_SCHEMA, orient="row")
