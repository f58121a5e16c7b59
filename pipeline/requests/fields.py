"""What a placeholder names: a column, or a field inside a struct column, and what it probably meant.

`{user.plan}` reaches into the struct column `user` (JSON Lines objects, Parquet structs), at any
depth; a column whose own name has a dot (a CSV header "user.plan") is taken first. A name that is
not there gets a suggestion: the same name in another case ({body} for a column Body) before the
closest spelling.
"""

from __future__ import annotations

import difflib

import polars as pl


def field_of(name: str, schema: pl.Schema) -> tuple[pl.Expr, pl.DataType] | None:
    """What a placeholder names: a column, or a field of a struct column ({user.plan}, {a.b.c}), as an
    expression and its type; None when there is no such thing. A column whose own name has a dot wins."""
    if name in schema:
        return pl.col(name), schema[name]
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest column name first: 'a.b' before 'a'
        root = ".".join(parts[:i])
        if root not in schema:
            continue
        expr, dtype = pl.col(root), schema[root]
        for part in parts[i:]:
            inner = fields_of(dtype)
            if part not in inner:
                return None
            expr, dtype = expr.struct.field(part), inner[part]
        return expr, dtype
    return None


def fields_of(dtype: pl.DataType) -> dict[str, pl.DataType]:
    """A struct's fields by name ({} for any other type)."""
    if not isinstance(dtype, pl.Struct):
        return {}
    return {f.name: f.dtype if isinstance(f.dtype, pl.DataType) else f.dtype() for f in dtype.fields}


def dtype_of(name: str, schema: pl.Schema) -> pl.DataType:
    found = field_of(name, schema)
    assert found is not None
    return found[1]


def field_names(schema: pl.Schema, depth: int = 3) -> list[str]:
    """Every name a placeholder may use: the columns, and the fields of struct columns, dotted."""
    names: list[str] = []

    def walk(prefix: str, dtype: pl.DataType, left: int) -> None:
        names.append(prefix)
        if isinstance(dtype, pl.Struct) and left:
            for name, inner in fields_of(dtype).items():
                walk(f"{prefix}.{name}", inner, left - 1)

    for column, dtype in schema.items():
        walk(column, dtype, depth)
    return names


def did_you_mean(name: str, candidates: list[str]) -> str | None:
    """The candidate a misspelt name most likely meant: the same but for case first, then the closest."""
    same = [c for c in candidates if c.lower() == name.lower()]
    if same:
        return same[0]
    near = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    if near:
        return near[0]
    lowered = {c.lower(): c for c in candidates}
    near = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[near[0]] if near else None


def struct_problem(name: str, schema: pl.Schema, where: str) -> str | None:
    """Why {a.b} names nothing when `a` is a column: `a` is no struct, or has no field `b`; else None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        root = ".".join(parts[:i])
        if root not in schema:
            continue
        dtype, path = schema[root], root
        for part in parts[i:]:
            if not isinstance(dtype, pl.Struct):
                return (
                    f"The prompt template uses {{{name}}}, but column {path!r} of {where} holds {dtype} values, not a struct "
                    f"with fields: write {{{path}}} for the whole value."
                )
            inner = fields_of(dtype)
            if part not in inner:
                near = did_you_mean(part, list(inner))
                hint = f" Did you mean {{{path}.{near}}}?" if near else ""
                return (
                    f"The prompt template uses {{{name}}}, but {'column' if path == root else 'field'} {path!r} of {where} "
                    f"has no field {part!r}; its fields are: {', '.join(repr(f) for f in inner)}.{hint}"
                )
            dtype, path = inner[part], f"{path}.{part}"
    return None
