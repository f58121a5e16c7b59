"""Turn table rows into requests: the template, the checks, the request key.

Rendering is vectorised with polars expressions; only the request-key hash is
a Python loop (hashlib has no bulk interface and polars' hash is not stable
across versions, while request keys must be stable across runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import orjson
import polars as pl

from pipeline.errors import ConfigError, InputError
from pipeline.requests.fields import did_you_mean, dtype_of, field_names, field_of, struct_problem
from pipeline.requests.media import MEDIA_KEY, MEDIA_SKIP, MEDIA_TOKENS, MediaColumns

# Column names the pipeline adds to every row; the sink relies on them being free.
PROMPT, EXTRA, SKIP_REASON, KEY, EST_TOKENS = "__prompt", "__extra", "__skip_reason", "__request_key", "__est_tokens"


# Placeholders kept as they are when showing a JSON template fixed; every other brace is doubled
# (JSON's "}}" closes two objects: it is not an escape there).
_KEEP = re.compile(r"\{[^{}\"'\s][^{}\"']*\}|[{}]")
# A default that is really a Python format spec ({price:.2f}, {name:>10}): it would be sent as text when the
# cell is empty. Only specs with an alignment width or a typed precision: "0", "-" or "0.5" are plausible defaults.
_FORMAT_SPEC = re.compile(r"(.?[<>=^])?[+\- ]?z?#?0?\d*[,_]?(\.\d+)?[bcdeEfFgGnosxX%]?")
_FORMAT_SIGN = re.compile(r"[<>=^]\d|\.\d+[a-zA-Z%]")


@dataclass(frozen=True)
class Template:
    text: str
    literals: tuple[str, ...]
    fields: tuple[str, ...]  # fields[i] sits between literals[i] and literals[i + 1]
    defaults: tuple[str | None, ...] = ()  # defaults[i] for fields[i] ({notes:n/a}); None: the cell is required

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.fields))

    def default_of(self, i: int) -> str | None:
        return self.defaults[i] if self.defaults else None

    @property
    def required(self) -> tuple[str, ...]:
        """Columns used at least once without a default: a null or empty cell there means the row is not sent."""
        return tuple(dict.fromkeys(f for i, f in enumerate(self.fields) if self.default_of(i) is None))


def _escape_json(text: str) -> str:
    return _KEEP.sub(lambda m: m.group() if len(m.group()) > 1 else m.group() * 2, text)


def _json_error(text: str, at: int) -> ConfigError:
    depth, end = 0, len(text)
    for j in range(at, len(text)):  # the whole JSON object, nested ones included
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            end = j + 1
            break
    fragment = text[at:end]
    fixed = _escape_json(text)
    # One paragraph: a long or multi-line template is shown by its JSON part alone, on one line.
    example = fixed if len(fixed) <= 300 and "\n" not in fixed else " ".join(_escape_json(fragment).split())
    fragment = " ".join(fragment.split())
    fragment = fragment if len(fragment) <= 40 else fragment[:37] + "..."
    return ConfigError(
        f"The prompt template contains JSON braces ({fragment}), which would be read as a placeholder. "
        f"Placeholders name a column, as in {{text}}; write {{{{ and }}}} for literal braces, e.g.: {example}"
    )


def parse_template(text: str) -> Template:
    """Parse `{column}` and `{column:default}` placeholders; `{{` and `}}` are literal braces.

    `{notes:}` renders an empty or null cell as empty text, `{notes:n/a}` as n/a; a plain
    `{notes}` needs the cell filled in, else the row is not sent.
    """
    literals: list[str] = []
    fields: list[str] = []
    defaults: list[str | None] = []
    pending: list[str] = []
    i, n = 0, len(text)
    while i < n:
        brace = min((j for j in (text.find("{", i), text.find("}", i)) if j >= 0), default=n)
        pending.append(text[i:brace])
        i = brace
        if i >= n:
            break
        if text.startswith(("{{", "}}"), i):
            pending.append(text[i])
            i += 2
            continue
        if text[i] == "}":
            raise ConfigError(
                f"The prompt template is not valid: it has a }} with no {{ before it (at {text[max(0, i - 20) : i + 1]!r}). "
                "Placeholders look like {column}; write }} for a literal brace."
            )
        end = text.find("}", i + 1)
        inner = text[i + 1 : end] if end >= 0 else text[i + 1 :]
        # JSON in a prompt ({"summary": ...}) is the usual cause of a brace that is not a placeholder.
        if inner.lstrip().startswith(('"', "'")) or "{" in inner:
            raise _json_error(text, i)
        if end < 0:
            raise ConfigError(
                f"The prompt template is not valid: it has a {{ that is never closed (at {text[i : i + 20]!r}). "
                "Placeholders look like {column}; write {{ for a literal brace."
            )
        name, colon, default = inner.partition(":")
        if "!" in name:
            raise ConfigError(
                f"Placeholder {{{inner}}} uses a conversion ({name[name.index('!') :]}); placeholders take a column name, "
                f"e.g. {{{name.split('!')[0]}}}, or a default for empty cells, e.g. {{{name.split('!')[0]}:n/a}}."
            )
        if not name.strip():
            raise ConfigError("The prompt template has an empty placeholder {}. Name a column inside the braces, e.g. {text}.")
        if colon and _FORMAT_SPEC.fullmatch(default) and _FORMAT_SIGN.search(default):
            raise ConfigError(
                f"Placeholder {{{inner}}} looks like a Python format spec, but after ':' comes the text used when "
                f"{name!r} is empty (e.g. {{{name}:n/a}}). Format the column before the run and write {{{name}}}."
            )
        literals.append("".join(pending))
        fields.append(name)
        defaults.append(default if colon else None)
        pending = []
        i = end + 1
    literals.append("".join(pending))
    if not fields:
        raise ConfigError(
            f"The prompt template {text!r} names no column, so every row would send the same prompt. Add a placeholder such as {{text}}."
        )
    return Template(text=text, literals=tuple(literals), fields=tuple(fields), defaults=tuple(defaults))


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
    verbatim: bool = False  # each row's payload is a whole request body (an OpenAI batch-request line's), sent as it is
    image_detail: str | None = None  # OpenAI's image detail (low, high, auto); None: not sent
    tools: tuple[dict[str, Any], ...] | None = None  # OpenAI tool definitions offered with every request
    tool_choice: str | None = None  # auto, none, required or a tool's name; None: the server's default
    tool_columns: bool = False  # the forced tool's arguments are the answer (checked, typed columns)

    @property
    def n(self) -> int:
        """Answers asked per request."""
        n = self.params.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1

    def fingerprint(self) -> bytes:
        """Canonical bytes of the shared part; any change re-keys every row."""
        if self.verbatim:  # the body is the whole request: nothing else of the run's goes out with it
            return b'{"verbatim":true}'
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
        if self.image_detail is not None:
            shared["image_detail"] = self.image_detail
        if self.tools is not None:
            shared["tools"], shared["tool_choice"] = list(self.tools), self.tool_choice
            if self.tool_columns:  # the answer kept is the call's arguments, checked: not what a plain run keeps
                shared["tool_columns"] = True
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
    null_as_empty: bool = False  # a null or empty template cell renders as empty text instead of holding the row back
    list_join: str | None = None  # list cells of scalars joined with this text; None: as JSON
    media: MediaColumns | None = None  # image and document columns (--image-column), sent with each row's prompt

    def _source_columns(self) -> tuple[str, ...]:
        if self.template is not None:
            return self.template.columns
        return tuple(c for c in (self.prompt_column, self.messages_column) if c)

    def needed_columns(self) -> tuple[str, ...]:
        extra = (self.id_column,) if self.id_column else ()
        images = self.media.columns if self.media else ()
        return tuple(dict.fromkeys(self._source_columns() + extra + tuple(self.param_columns.values()) + images))

    def check(self, schema: pl.Schema, where: str, hint: str = "") -> None:
        """Refuse, before anything is sent, columns that are not there or cannot be shown; `hint` ends the missing-column message."""
        columns = list(schema.names())
        absent = [c for c in (self.media.columns if self.media else ()) if c not in columns]
        if absent:
            near = did_you_mean(absent[0], columns)
            raise InputError(
                f"The image column{'s' if len(absent) > 1 else ''} {', '.join(repr(c) for c in absent)} (--image-column) "
                f"{'are' if len(absent) > 1 else 'is'} not in {where}. Its columns are: {', '.join(repr(c) for c in columns)}."
                + (f" Did you mean {near!r}?" if near else hint)
            )
        fields = self.template.columns if self.template else ()
        # A template's {user.plan} reaches into a struct column; the other settings name whole columns.
        missing = [c for c in self.needed_columns() if c not in columns and not (c in fields and field_of(c, schema))]
        if missing:
            inside = next((why for c in missing if (why := struct_problem(c, schema, where))), None)
            if inside is not None:
                raise InputError(inside)
            what = "The prompt template uses" if self.template else "The settings name the"
            t = self.template
            braced = [f for i, f in enumerate(t.fields) if f in missing and t.default_of(i) is not None] if t else []
            if braced and not hint:  # {key: value} that was meant as literal text, not column:default
                hint = f" If {{{braced[0]}:...}} is meant as literal text, write {{{{ and }}}} for its braces."
            near = did_you_mean(missing[0], field_names(schema) if t else columns)
            if near and not hint:
                hint = f" Did you mean {{{near}}}?" if t else f" Did you mean {near!r}?"
            raise InputError(
                f"{what} column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}, "
                f"which {where} does not have. Its columns are: {', '.join(repr(c) for c in columns)}.{hint}"
            )
        if self.media is not None and (why := self.media.check(schema, where)) is not None:
            raise InputError(why)
        if self.messages_column:
            dtype = schema[self.messages_column]
            inner = dtype.inner if isinstance(dtype, pl.List) else None
            names = {f.name for f in inner.fields} if isinstance(inner, pl.Struct) else set()
            if dtype != pl.String and not {"role", "content"} <= names:
                raise InputError(
                    f"Column {self.messages_column!r} of {where} should hold a list of messages with 'role' and 'content' "
                    f'(as in JSONL: [{{"role": "user", "content": "..."}}]), or their JSON text; it is {dtype}.'
                )
        # Templates show lists and structs as JSON; a whole prompt must already be text.
        if self.template:
            shown = [c for c in self.template.columns if dtype_of(c, schema) in (pl.Binary, pl.Object)]
        else:
            shown = [c for c in (self.prompt_column,) if c and (schema[c].is_nested() or schema[c] in (pl.Binary, pl.Object))]
        if shown:
            c = shown[0]
            raise InputError(
                f"Column {c!r} of {where} holds {dtype_of(c, schema)} values, which a prompt cannot show faithfully. "
                + (
                    f"Templates take text, numbers, dates, lists and structs: turn {c!r} into a string column first."
                    if self.template
                    else f"Use --prompt with a template such as '{{{c}}}' (lists and structs are shown as JSON), "
                    "or give conversations with --messages-column."
                )
            )

    def _payload_expr(self, schema: pl.Schema) -> pl.Expr:
        if self.messages_column is not None:
            col = pl.col(self.messages_column)
            if schema[self.messages_column] == pl.String:
                return col  # null members are dropped in render()
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
                parts.append(self._field_expr(self.template.fields[i], self.template.default_of(i), schema))
        return pl.concat_str(parts)  # a null part (a required cell) makes the whole prompt null

    def _cell_expr(self, c: str, schema: pl.Schema) -> pl.Expr:
        """A template cell as text: scalars cast, lists joined (--list-join) or JSON, structs JSON."""
        found = field_of(c, schema)
        assert found is not None  # check() refused the job otherwise
        col, dtype = found
        if isinstance(dtype, pl.Array):
            col, dtype = col.arr.to_list(), pl.List(dtype.inner)
        if isinstance(dtype, pl.List) and self.list_join is not None and not dtype.inner.is_nested():
            return col.cast(pl.List(pl.String)).list.join(self.list_join)
        if dtype.is_nested():
            # polars JSON-encodes structs only: wrap the cell in one and cut the wrapper off again.
            wrapped = pl.struct(col.alias("v")).struct.json_encode()
            return pl.when(col.is_not_null()).then(wrapped.str.strip_prefix('{"v":').str.strip_suffix("}"))
        return col.cast(pl.String)

    def _field_expr(self, c: str, default: str | None, schema: pl.Schema) -> pl.Expr:
        cell = self._cell_expr(c, schema)
        if default is not None:
            return pl.when(cell.is_null() | (cell.str.strip_chars() == "")).then(pl.lit(default)).otherwise(cell)
        # Exactly the cast of earlier versions when no option is used: the prompt, hence the request key, is unchanged.
        return cell.fill_null("") if self.null_as_empty else cell

    def _skip_expr(self, schema: pl.Schema) -> pl.Expr:
        checks = []
        if self.template is not None:
            required = () if self.null_as_empty else self.template.required
            for c in required:
                cell = self._cell_expr(c, schema)
                checks.append(pl.when(cell.is_null()).then(pl.lit(f"not sent: column '{c}' is null in this row")))
                checks.append(pl.when(cell.str.strip_chars() == "").then(pl.lit(f"not sent: column '{c}' is empty in this row")))
            if self.null_as_empty or len(required) < len(self.template.columns):
                # Defaults and --null-as-empty can leave nothing to ask; without them a filled cell means a non-blank prompt.
                checks.append(
                    pl.when(pl.col(PROMPT).str.strip_chars() == "").then(pl.lit("not sent: the prompt is empty in this row"))
                )
            return pl.coalesce(checks)
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
        out = df.with_columns(self._payload_expr(df.schema).alias(PROMPT))
        if self.messages_column is not None:
            # Before the key: a conversation is keyed as it is sent.
            out = out.with_columns(_without_nulls(out.get_column(PROMPT)))
        out = out.with_columns(self._skip_expr(df.schema).alias(SKIP_REASON))
        if self.messages_column is not None and df.schema[self.messages_column] == pl.String:
            # Conversations given as JSON text: a cell that is not one is not sent (checked here, not at send time).
            bad = [_conversation_problem(t) for t in out.get_column(PROMPT).to_list()]
            reason = [None if b is None else f"not sent: column '{self.messages_column}' {b}" for b in bad]
            out = out.with_columns(pl.coalesce(pl.col(SKIP_REASON), pl.Series(reason, dtype=pl.String)).alias(SKIP_REASON))
            out = out.with_columns(pl.when(pl.col(SKIP_REASON).is_null()).then(pl.col(PROMPT)).alias(PROMPT))
        if self.media is not None:
            # Images are read for the rows still to send: their reasons come after the prompt's.
            media = self.media.render(df, out.get_column(SKIP_REASON).to_list())
            out = pl.concat([out, media], how="horizontal")
            out = out.with_columns(pl.coalesce(SKIP_REASON, MEDIA_SKIP).alias(SKIP_REASON))
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
        if self.media is not None:  # each image's bytes by their hash (a URL sent unfetched by itself)
            material.append(pl.col(MEDIA_KEY))
        joined = out.select(pl.concat_str(material, separator="\x1f")).to_series().to_list()
        keys = [None if m is None else blake2b(prefix + m.encode(), digest_size=16).hexdigest() for m in joined]
        # Roughly four bytes a token for English text; only used to pace --tpm.
        system_tokens = len((self.spec.system or "").encode()) // 4
        estimate = pl.col(PROMPT).str.len_bytes() // 4 + system_tokens + 8 + (self.spec.max_tokens or 256)
        if self.media is not None:
            estimate = estimate + pl.col(MEDIA_TOKENS)
        return out.with_columns(pl.Series(KEY, keys, dtype=pl.String), estimate.alias(EST_TOKENS))


# A JSON string, escapes included; a member whose value is null.
_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_NULL_MEMBER = _STRING + r"\s*:\s*null\b"
# A string whose text begins like a null member's tail (["x,", ": null"]): the only way the patterns
# of _without_nulls can start inside a string and cut it. Rows that have one are done exactly.
_LOOKS_LIKE_A_TAIL = r'[,:\[{]\s*"\s*:\s*null\b'


def _without_nulls(texts: pl.Series) -> pl.Series:
    """Conversations as JSON text with every null-valued member removed, at any depth.

    polars writes "name": null for every field a message lacks that another message of the column
    has, and APIs refuse a null where a field is optional. Vectorised: three regex passes (a later
    member with the comma before it, a first one with the comma after it, an only one). They match
    JSON structure as long as no string's text begins with ': null' (a string that ends with a comma
    or a brace would otherwise look like the start of a member); the rare rows that have one are
    parsed and written again instead. Nulls that are list items, not members, stay."""
    name = texts.name
    stripped = (
        texts.to_frame()
        .select(
            pl.col(name)
            .str.replace_all(r",\s*" + _NULL_MEMBER, "")
            .str.replace_all(r"\{\s*" + _NULL_MEMBER + r"\s*,\s*", "{")
            .str.replace_all(r"\{\s*" + _NULL_MEMBER + r"\s*\}", "{}")
        )
        .to_series()
    )
    risky = texts.str.contains(_LOOKS_LIKE_A_TAIL).fill_null(False).arg_true()
    if len(risky):
        stripped = stripped.scatter(risky, [_exactly_without_nulls(t) for t in texts.gather(risky).to_list()])
    return stripped


def _exactly_without_nulls(text: str) -> str:
    try:
        return orjson.dumps(_drop_nulls(orjson.loads(text))).decode()
    except orjson.JSONDecodeError:
        return text  # not sent: render() says why


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


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
