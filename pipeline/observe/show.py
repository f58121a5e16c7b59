"""`pipeline show`: the first rows of a run's output and its status counts.

The output may be Parquet, CSV or JSON Lines, with or without a result prefix.
Before a run has finished (it is running, or was stopped) there is no output
yet, but there are answers in its checkpoint: those are shown instead, read
without the run's lock and without compacting, so a running job is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline.errors import InputError
from pipeline.tables.checkpoint import RESULT_COLUMNS, read_results
from pipeline.tables.columns import ADDED, MODEL
from pipeline.tables.sink import FORMATS, is_stdout

ROW = "__row"  # the position in the output, kept through filters to number the rows shown


@dataclass(frozen=True)
class View:
    """What is shown: rows to read lazily, which columns by default, and how to name it."""

    frame: pl.LazyFrame
    names: list[str]
    prefix: str
    default: list[str]
    label: str  # for the counts line
    unit: str  # "row" of an output, "answer" of a checkpoint
    note: str = ""  # said before the rows


def show(
    path: str,
    *,
    rows: int = 5,
    errors_only: bool = False,
    columns: Sequence[str] = (),
    full: bool = False,
    checkpoint_dir: str | None = None,
    result_prefix: str | None = None,
) -> str:
    """The text `pipeline show` prints; raises InputError (exit 2) for a path it cannot show.
    `result_prefix` is the run's --result-prefix; by default it is found from the output's columns."""
    from pipeline.tables.storage import local_view

    path = local_view(path)  # an s3:// output: its local copy, from the folder the run started in
    view = _view(path, checkpoint_dir, result_prefix)
    status = view.prefix + "status"
    shown = [_column(c, view) for c in columns] if columns else view.default
    frame = view.frame.with_row_index(ROW)
    if errors_only:
        frame = frame.filter(pl.col(status) == "error")
    try:
        head = frame.select(ROW, *dict.fromkeys(shown)).head(rows).collect()
        counts = view.frame.group_by(status).len().sort(status).collect()
        model = view.prefix + MODEL
        by_model = view.frame.group_by(model, status, maintain_order=True).len().collect() if model in view.names else None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"Cannot read {path}: {str(exc).splitlines()[0]}. Give the --output of a `pipeline run`.") from None
    parts = [view.note] if view.note else []
    if errors_only and head.height == 0:
        parts.append(f"No {view.unit}s with status error.")
    elif full:
        parts.append(_records(head, view.unit))
    elif head.height or not errors_only:
        with pl.Config(
            tbl_rows=rows,
            fmt_str_lengths=90,
            tbl_width_chars=160,
            tbl_hide_dataframe_shape=True,
            tbl_hide_column_data_types=True,
        ):
            parts.append(str(head.drop(ROW)))
    tally = ", ".join(f"{status}: {n:,} {view.unit}{'s' if n != 1 else ''}" for status, n in counts.iter_rows())
    parts.append(f"{view.label}: {tally or f'no {view.unit}s'}")
    if by_model is not None:  # several models: the counts of each, in the order the rows give them
        for name in by_model.get_column(model).unique(maintain_order=True).to_list():
            mine = by_model.filter(pl.col(model) == name)
            each = ", ".join(f"{st}: {n:,}" for _, st, n in mine.sort(status).iter_rows())
            parts.append(f"  {name}: {each}")
    return "\n".join(parts)


def _view(path: str, checkpoint_dir: str | None, result_prefix: str | None = None) -> View:
    if is_stdout(path):
        if checkpoint_dir is None:
            found = sorted(str(p) for p in Path().glob("*.stdout.checkpoint"))
            hint = f" (here: {', '.join(found)})" if found else ""
            raise InputError(
                "An output written to stdout (--output -) is not kept; its answers are in its checkpoint folder, "
                f"<input name>.stdout.checkpoint in the folder it ran from{hint}. Show that: pipeline show FOLDER."
            )
        return _checkpoint_view(Path(checkpoint_dir), path)
    p = Path(path)
    if p.is_dir() and any(p.glob("part-*.parquet")):  # an output folder of parts (--output DIR/)
        return _output_view(p, result_prefix)
    if p.is_dir():
        if not _has_answers(p):
            raise InputError(
                f"{path} is a folder, not an output. Give the --output of a `pipeline run`, or its checkpoint folder."
            )
        return _checkpoint_view(p, None)
    if p.exists():
        return _output_view(p, result_prefix)
    folder = Path(checkpoint_dir) if checkpoint_dir else p.with_name(p.stem + ".checkpoint")
    if _has_answers(folder):
        return _checkpoint_view(folder, path)
    where = f"the checkpoint folder {folder} has no answers" if folder.is_dir() else f"there is no checkpoint {folder}"
    raise InputError(
        f"{path} does not exist, and {where}: no run has written it or answered anything for it yet. Give the "
        "--output of a `pipeline run` (a .parquet, .csv or .jsonl file), or --checkpoint-dir for a checkpoint kept elsewhere."
    )


def _output_view(path: Path, result_prefix: str | None = None) -> View:
    kind = "parquet" if path.is_dir() else FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path} is not a pipeline output: give a .parquet, .csv or .jsonl file written by `pipeline run`.")
    try:
        if kind == "parquet":
            frame = pl.scan_parquet(path / "part-*.parquet" if path.is_dir() else path)
        elif kind == "csv":
            # As text: the answers' types need not guess right on a sample to be shown.
            frame = pl.scan_csv(path, infer_schema=False)
        else:
            # Every line for the types: a result column is null for many rows before its first value.
            frame = pl.scan_ndjson(path, infer_schema_length=None)
        names = frame.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(
            f"{path} is not a readable {kind} file ({str(exc).splitlines()[0]}). Give the output of a `pipeline run`."
        ) from None
    prefix = find_prefix(names)
    if result_prefix is not None and result_prefix != prefix:
        if result_prefix + "status" not in names or result_prefix + "completion" not in names:
            found = f"; its result columns have the prefix {prefix!r}" if prefix is not None else ""
            raise InputError(
                f"{path} has no {result_prefix}status and {result_prefix}completion columns, so its results were not "
                f"written with --result-prefix {result_prefix!r}{found}. Leave --result-prefix out: it is found by itself."
            )
        prefix = result_prefix
    if prefix is None:
        raise InputError(
            f"{path} is not a pipeline output (it has no 'status' and 'completion' columns, with or without a "
            "result prefix). Give the --output of a `pipeline run`."
        )
    # The first input column (often an id), what the model gave (extracted fields if a schema was used), the outcome.
    last = prefix + RESULT_COLUMNS[-1]
    added = {prefix + c for c in ADDED}  # cost_usd, tool_calls...: result columns too, not extracted fields
    extracted = [n for n in names[names.index(last) + 1 :] if n not in added] if last in names else []
    first = [names[0]] if names[0] != prefix + "completion" else []
    asked = [prefix + MODEL] if prefix + MODEL in names else []  # several models: which one each row asked
    default = [
        *first,
        *asked,
        *(extracted or [prefix + "completion"]),
        *(prefix + c for c in ("status", "error", "total_tokens")),
    ]
    return View(frame, names, prefix, [c for c in dict.fromkeys(default) if c in names], str(path), "row")


def _checkpoint_view(folder: Path, output: str | None) -> View:
    answers = read_results(folder)
    note = (
        f"{output} does not exist yet: its run has not finished (it is running, or was stopped). "
        if output is not None and not is_stdout(output)
        else ""
    )
    note += (
        f"These are the {answers.height:,} answers so far in its checkpoint {folder}, not in input order and without "
        "the input columns; the output gets every row when the run finishes (run the same command again to resume "
        "a stopped one)."
    )
    default = ["completion", "status", "error", "total_tokens"]
    return View(answers.lazy(), answers.columns, "", default, f"{folder} (checkpoint of an unfinished run)", "answer", note)


def _has_answers(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "results.parquet").exists() or any(folder.glob("journal-*.jsonl")))


def find_prefix(names: Sequence[str]) -> str | None:
    """The result prefix of an output: p such that p+'status' and p+'completion' are columns.

    An input may have its own 'status' and 'completion' (the reason for a prefix): the
    candidate with the most result columns wins, and on a tie the later one, as the
    result columns come after the input's."""
    best: tuple[int, int, str] | None = None
    for i, name in enumerate(names):
        if name.endswith("status") and (p := name[: -len("status")]) + "completion" in names:
            score = (sum(p + c in names for c in RESULT_COLUMNS), i, p)
            best = max(best, score) if best else score
    return best[2] if best else None


def _column(name: str, view: View) -> str:
    """A --columns entry as a column of the view. A result column may be named without its prefix, and
    then means the result even when the input has a column of that name (the reason for the prefix)."""
    bare = name in RESULT_COLUMNS and view.prefix + name in view.names
    for candidate in (view.prefix + name, name) if bare else (name, view.prefix + name):
        if candidate in view.names:
            return candidate
    raise InputError(f"--columns: there is no column {name!r} in these {view.unit}s. They have: {', '.join(view.names)}.")


def _records(head: pl.DataFrame, unit: str) -> str:
    """Every value whole, one per line: long text does not fit a table."""
    lines = []
    for row in head.iter_rows(named=True):
        lines.append(f"-- {unit} {row.pop(ROW) + 1}")
        for name, value in row.items():
            text = _text(value).replace("\n", "\n    ")
            lines.append(f"  {name}: {text}")
    return "\n".join(lines)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()
