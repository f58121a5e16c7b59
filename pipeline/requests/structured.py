"""Structured output: a JSON Schema in, validated JSON replies out, typed columns in the output.

The schema shapes three things: the request (OpenAI `response_format`, or an
Anthropic tool whose `input_schema` it is), the check of every reply (invalid
replies are asked again with the validator's message), and the output
columns, whose polars types follow the schema (integers stay integers, arrays
become lists, nested objects become structs) instead of a JSON string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
import polars as pl

from pipeline.errors import ConfigError, InvalidOutput

if TYPE_CHECKING:  # jsonschema is imported only by runs that use a schema: it costs start-up time
    from jsonschema import Draft202012Validator

TOOL_NAME = "record_fields"


def load_schema(value: dict[str, Any] | str) -> dict[str, Any]:
    """A schema given inline (a mapping) or as the path of a .json file."""
    if isinstance(value, str):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"Schema file {path} does not exist. Give the path of a JSON Schema file, or a schema: block in the config."
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"Schema file {path} is not readable JSON: {exc}.") from None
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(value, dict):
        raise ConfigError("The schema must be a JSON object (a JSON Schema with type: object).")
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        raise ConfigError(
            f"The schema is not a valid JSON Schema: {exc.message} (at {'/'.join(map(str, exc.path)) or 'the top'})."
        ) from None
    if value.get("type") != "object" or not isinstance(value.get("properties"), dict) or not value["properties"]:
        raise ConfigError(
            "The schema must describe an object with properties (type: object, properties: {...}); each property becomes an output column."
        )
    return value


def dtype_of(schema: dict[str, Any], where: str = "schema") -> pl.DataType:
    """The polars type a value matching `schema` is stored as."""
    kind = schema.get("type")
    if isinstance(kind, list):  # ["integer", "null"]: nullable, which every column is
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in schema:
        values = schema["enum"]
        kind = "string" if all(isinstance(v, str) for v in values) else None
    if kind == "string":
        return pl.String()
    if kind == "integer":
        return pl.Int64()
    if kind == "number":
        return pl.Float64()
    if kind == "boolean":
        return pl.Boolean()
    if kind == "array":
        return pl.List(dtype_of(schema.get("items", {}), f"{where}[]"))
    if kind == "object":
        props = schema.get("properties") or {}
        if not props:
            return pl.String()  # free-form object: kept as JSON text
        return pl.Struct({name: dtype_of(sub, f"{where}.{name}") for name, sub in props.items()})
    return pl.String()  # anything else (anyOf, mixed types) stays JSON text


@dataclass(frozen=True)
class Structured:
    schema: dict[str, Any]
    layout: Literal["columns", "struct"]
    name: str  # the struct column's name, or the columns' prefix
    tool: str | None = None  # --tool-columns: the forced tool whose call's arguments are the answer (schema: its parameters)

    @property
    def dtype(self) -> pl.Struct:
        dt = dtype_of(self.schema)
        assert isinstance(dt, pl.Struct)
        return dt

    def output_columns(self) -> list[str]:
        if self.layout == "struct":
            return [self.name]
        return [self.name + f.name for f in self.dtype.fields]

    def validator(self) -> Draft202012Validator:
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.schema)

    def add_columns(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Decode the JSON of `ok` rows into typed columns."""
        typed = self._decode(frame)
        if self.layout == "struct":
            return frame.with_columns(typed.alias(self.name))
        return (
            frame.with_columns(typed.alias("__fields"))
            .unnest("__fields")
            .rename({f.name: self.name + f.name for f in self.dtype.fields})
        )

    def _decode(self, frame: pl.DataFrame) -> pl.Series:
        texts = frame.select(pl.when(pl.col("status") == "ok").then(pl.col("completion"))).to_series()
        try:
            return texts.str.json_decode(self.dtype)  # vectorised: the usual case
        except pl.exceptions.PolarsError:
            # A field the schema leaves free-form (anyOf, mixed types, bare
            # objects) is a string column; its value is kept as JSON text.
            values = [None if t is None else _conform(orjson.loads(t), self.dtype) for t in texts]
            return pl.Series(values, dtype=self.dtype, strict=False)


def _conform(value: Any, dtype: Any) -> Any:  # a polars DataType (class or instance)
    """`value` reshaped to `dtype`: JSON text where a string is expected, recursing into structs and lists."""
    if isinstance(dtype, pl.Struct):
        if not isinstance(value, dict):
            return None
        return {f.name: _conform(value.get(f.name), f.dtype) for f in dtype.fields}
    if isinstance(dtype, pl.List):
        return [_conform(v, dtype.inner) for v in value] if isinstance(value, list) else None
    if dtype == pl.String and value is not None and not isinstance(value, str):
        return orjson.dumps(value).decode()
    return value


def schema_instruction(schema: dict[str, Any]) -> str:
    """Told to servers that only know "some JSON" (json_object mode)."""
    return "Reply with only a JSON object that follows this JSON Schema:\n" + orjson.dumps(schema).decode()


def check_reply(text: str, validator: Draft202012Validator, dtype: pl.DataType | None = None) -> str:
    """The reply as canonical JSON, or InvalidOutput saying what is wrong with it."""
    body = text.strip()
    if body.startswith("```"):  # small models like to fence their JSON
        body = body.strip("`").removeprefix("json").strip()
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidOutput(f"reply is not valid JSON ({exc})", raw=text) from None
    if dtype is not None and (big := _too_big(value, dtype)) is not None:
        # Valid JSON Schema, but it would become a silent null in an Int64 column.
        raise InvalidOutput(f"reply has the integer {big}, too large for a 64-bit column", raw=text)
    problems = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if problems:
        first = problems[0]
        at = "/".join(map(str, first.path)) or "the top level"
        raise InvalidOutput(f"reply does not match the schema at {at}: {first.message}", raw=text)
    return orjson.dumps(value).decode()


def _too_big(value: Any, dtype: Any) -> int | float | None:
    """A value bound for an Int64 column that does not fit in one (orjson reads 1e20 for 10^20)."""
    if isinstance(dtype, pl.Struct):
        fields = value if isinstance(value, dict) else {}
        return next((b for f in dtype.fields if (b := _too_big(fields.get(f.name), f.dtype)) is not None), None)
    if isinstance(dtype, pl.List):
        items = value if isinstance(value, list) else []
        return next((b for v in items if (b := _too_big(v, dtype.inner)) is not None), None)
    if dtype == pl.Int64 and isinstance(value, int | float) and not isinstance(value, bool):
        return value if not -(2**63) <= value < 2**63 else None
    return None


def correction(err: InvalidOutput, tool: str | None = None) -> list[dict[str, str]]:
    """The turns appended when a reply was invalid: what it said, and what was wrong (`tool`: the forced
    tool whose arguments did not fit, for --tool-columns)."""
    again = f"Call {tool} again with corrected arguments." if tool else "Answer again with only the corrected JSON object."
    return [
        {"role": "assistant", "content": err.raw},
        {"role": "user", "content": f"That {err.message}. {again}"},
    ]
