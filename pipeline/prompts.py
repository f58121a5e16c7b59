"""Turn table rows into requests: the template, the checks, the request key.

Rendering is vectorised with polars expressions; only the request-key hash is
a Python loop (hashlib has no bulk interface and polars' hash is not stable
across versions, while request keys must be stable across runs).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import orjson
import polars as pl

from pipeline.errors import ConfigError, InputError

# Column names the pipeline adds to every row; the sink relies on them being free.
PROMPT, EXTRA, SKIP_REASON, KEY, EST_TOKENS = "__prompt", "__extra", "__skip_reason", "__request_key", "__est_tokens"


@dataclass(frozen=True)
class Template:
    text: str
    literals: tuple[str, ...]
    fields: tuple[str, ...]  # fields[i] sits between literals[i] and literals[i + 1]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.fields))


def parse_template(text: str) -> Template:
    """Parse `{column}` placeholders; `{{` and `}}` are literal braces."""
    literals: list[str] = []
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(
            f"The prompt template is not valid: {exc}. Placeholders look like {{column}}; write {{{{ and }}}} for literal braces."
        ) from None
    pending = ""  # the parser splits literal text at escaped braces; join it up
    for literal, name, spec, conversion in parsed:
        pending += literal
        if name is None:
            continue
        if not name:
            raise ConfigError("The prompt template has an empty placeholder {}. Name a column inside the braces, e.g. {text}.")
        if spec or conversion:
            raise ConfigError(
                f"Placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} uses a format spec; placeholders take a bare column name, e.g. {{{name}}}."
            )
        literals.append(pending)
        fields.append(name)
        pending = ""
    literals.append(pending)
    if not fields:
        raise ConfigError(
            f"The prompt template {text!r} names no column, so every row would send the same prompt. Add a placeholder such as {{text}}."
        )
    return Template(text=text, literals=tuple(literals), fields=tuple(fields))


@dataclass(frozen=True)
class RequestSpec:
    """What is the same for every row of a run: model, system prompt, parameters, output shape."""

    model: str
    system: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    params: dict[str, Any] = field(default_factory=dict)
    conversation: bool = False  # each row's payload is a JSON list of messages, not one prompt
    schema: dict[str, Any] | None = None  # JSON Schema the reply must follow
    json_mode: str = "json_schema"

    def fingerprint(self) -> bytes:
        """Canonical bytes of the shared part; any change re-keys every row."""
        shared: dict[str, Any] = {
            "model": self.model,
            "system": self.system,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "params": self.params,
        }
        # Only when used, so that plain jobs keep their keys (and checkpoints) across versions.
        if self.conversation:
            shared["conversation"] = True
        if self.schema is not None:
            shared["schema"], shared["json_mode"] = self.schema, self.json_mode
        return orjson.dumps(shared, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Renderer:
    """Builds each row's payload (prompt or conversation), per-row parameters, skip reason, key and token estimate."""

    spec: RequestSpec
    template: Template | None
    prompt_column: str | None
    id_column: str | None
    messages_column: str | None = None
    param_columns: dict[str, str] = field(default_factory=dict)

    def _source_columns(self) -> tuple[str, ...]:
        if self.template is not None:
            return self.template.columns
        return tuple(c for c in (self.prompt_column, self.messages_column) if c)

    def needed_columns(self) -> tuple[str, ...]:
        extra = (self.id_column,) if self.id_column else ()
        return tuple(dict.fromkeys(self._source_columns() + extra + tuple(self.param_columns.values())))

    def check(self, schema: pl.Schema, where: str) -> None:
        columns = list(schema.names())
        missing = [c for c in self.needed_columns() if c not in columns]
        if missing:
            what = "The prompt template uses" if self.template else "The settings name the"
            raise InputError(
                f"{what} column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}, "
                f"which {where} does not have. Its columns are: {', '.join(repr(c) for c in columns)}."
            )
        if self.messages_column:
            dtype = schema[self.messages_column]
            inner = dtype.inner if isinstance(dtype, pl.List) else None
            names = {f.name for f in inner.fields} if isinstance(inner, pl.Struct) else set()
            if dtype != pl.String and not {"role", "content"} <= names:
                raise InputError(
                    f"Column {self.messages_column!r} of {where} should hold a list of messages with 'role' and 'content' "
                    f'(as in JSONL: [{{"role": "user", "content": "..."}}]), or their JSON text; it is {dtype}.'
                )
        text_columns = self.template.columns if self.template else tuple(c for c in (self.prompt_column,) if c)
        nested = [c for c in text_columns if schema[c].is_nested() or schema[c] in (pl.Binary, pl.Object)]
        if nested:
            c = nested[0]
            raise InputError(
                f"Column {c!r} of {where} holds {schema[c]} values, which a prompt cannot show faithfully. "
                f"Templates take text, numbers, dates and the like: turn {c!r} into a string column first"
                + (", or give conversations with --messages-column." if schema[c].is_nested() else ".")
            )

    def _payload_expr(self, schema: pl.Schema) -> pl.Expr:
        if self.messages_column is not None:
            col = pl.col(self.messages_column)
            if schema[self.messages_column] == pl.String:
                return col
            encoded = col.list.eval(pl.element().struct.json_encode()).list.join(",")
            return pl.when(col.list.len() > 0).then(pl.concat_str([pl.lit("["), encoded, pl.lit("]")]))
        if self.template is None:
            assert self.prompt_column is not None
            return pl.col(self.prompt_column).cast(pl.String)
        parts: list[pl.Expr] = []
        for i, lit in enumerate(self.template.literals):
            if lit:
                parts.append(pl.lit(lit))
            if i < len(self.template.fields):
                parts.append(pl.col(self.template.fields[i]).cast(pl.String))
        return pl.concat_str(parts)

    def _skip_expr(self, schema: pl.Schema) -> pl.Expr:
        checks = []
        for c in self._source_columns():
            if schema[c] != pl.String and c == self.messages_column:
                checks.append(
                    pl.when(pl.col(c).is_null() | (pl.col(c).list.len() == 0)).then(
                        pl.lit(f"not sent: column '{c}' has no messages in this row")
                    )
                )
                continue
            cell = pl.col(c).cast(pl.String)
            checks.append(pl.when(cell.is_null()).then(pl.lit(f"not sent: column '{c}' is null in this row")))
            checks.append(pl.when(cell.str.strip_chars() == "").then(pl.lit(f"not sent: column '{c}' is empty in this row")))
        return pl.coalesce(checks)

    def render(self, df: pl.DataFrame) -> pl.DataFrame:
        """Return `df` plus payload, per-row parameters, skip reason, request key and token estimate."""
        out = df.with_columns(self._payload_expr(df.schema).alias(PROMPT), self._skip_expr(df.schema).alias(SKIP_REASON))
        if self.messages_column is not None and df.schema[self.messages_column] == pl.String:
            # Conversations given as JSON text: a cell that is not one is not sent (checked here, not at send time).
            bad = [_conversation_problem(t) for t in out.get_column(PROMPT).to_list()]
            reason = [None if b is None else f"not sent: column '{self.messages_column}' {b}" for b in bad]
            out = out.with_columns(pl.coalesce(pl.col(SKIP_REASON), pl.Series(reason, dtype=pl.String)).alias(SKIP_REASON))
            out = out.with_columns(pl.when(pl.col(SKIP_REASON).is_null()).then(pl.col(PROMPT)).alias(PROMPT))
        if self.param_columns:
            fields = [pl.col(col).alias(param) for param, col in sorted(self.param_columns.items())]
            out = out.with_columns(pl.struct(fields).struct.json_encode().alias(EXTRA))
        else:
            out = out.with_columns(pl.lit(None, dtype=pl.String).alias(EXTRA))
        prefix = blake2b(self.spec.fingerprint(), digest_size=16).digest()
        # What identifies a request besides the shared part: the id (if any), the payload, per-row parameters.
        material = [pl.col(PROMPT)]
        if self.id_column:
            # With an id column, identical prompts on different rows stay separate requests.
            material.insert(0, pl.col(self.id_column).cast(pl.String).fill_null(""))
        if self.param_columns:
            material.append(pl.col(EXTRA))
        joined = out.select(pl.concat_str(material, separator="\x1f")).to_series().to_list()
        keys = [None if m is None else blake2b(prefix + m.encode(), digest_size=16).hexdigest() for m in joined]
        # Roughly four bytes a token for English text; only used to pace --tpm.
        system_tokens = len((self.spec.system or "").encode()) // 4
        return out.with_columns(
            pl.Series(KEY, keys, dtype=pl.String),
            (pl.col(PROMPT).str.len_bytes() // 4 + system_tokens + 8 + (self.spec.max_tokens or 256)).alias(EST_TOKENS),
        )


def _conversation_problem(text: str | None) -> str | None:
    """Why a JSON cell is not a conversation (a non-empty list of {role, content}), or None if it is."""
    if text is None:
        return None  # reported as null by the skip expression
    try:
        turns = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "is not valid JSON in this row"
    if not isinstance(turns, list) or not turns:
        return "is not a non-empty JSON list of messages in this row"
    if not all(isinstance(t, dict) and isinstance(t.get("role"), str) and "content" in t for t in turns):
        return "has a message without 'role' and 'content' in this row"
    return None


def estimate_tokens(text: str) -> int:
    """A labelled estimate (about four bytes a token) for servers that send no usage."""
    return max(1, (len(text.encode()) + 3) // 4)
