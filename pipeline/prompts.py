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
PROMPT, SKIP_REASON, KEY, EST_TOKENS = "__prompt", "__skip_reason", "__request_key", "__est_tokens"


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
    """What is the same for every row of a run: model, system prompt, parameters."""

    model: str
    system: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    params: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> bytes:
        """Canonical bytes of the shared part; any change re-keys every row."""
        shared = {
            "model": self.model,
            "system": self.system,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "params": self.params,
        }
        return orjson.dumps(shared, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Renderer:
    """Builds the per-row prompt, its skip reason, request key and token estimate."""

    spec: RequestSpec
    template: Template | None
    prompt_column: str | None
    id_column: str | None

    def needed_columns(self) -> tuple[str, ...]:
        cols = self.template.columns if self.template else (self.prompt_column,)
        extra = (self.id_column,) if self.id_column else ()
        return tuple(c for c in cols + extra if c is not None)

    def check(self, columns: list[str], where: str) -> None:
        missing = [c for c in self.needed_columns() if c not in columns]
        if missing:
            what = "The prompt template uses" if self.template else "The settings name"
            raise InputError(
                f"{what} column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}, "
                f"which {where} does not have. Its columns are: {', '.join(repr(c) for c in columns)}."
            )

    def _prompt_expr(self) -> pl.Expr:
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

    def _skip_expr(self) -> pl.Expr:
        cols = self.template.columns if self.template else (self.prompt_column or "",)
        checks = []
        for c in cols:
            cell = pl.col(c).cast(pl.String)
            checks.append(pl.when(cell.is_null()).then(pl.lit(f"not sent: column '{c}' is null in this row")))
            checks.append(pl.when(cell.str.strip_chars() == "").then(pl.lit(f"not sent: column '{c}' is empty in this row")))
        return pl.coalesce(checks)

    def render(self, df: pl.DataFrame) -> pl.DataFrame:
        """Return `df` plus the prompt, skip reason, request key and token estimate."""
        out = df.with_columns(self._prompt_expr().alias(PROMPT), self._skip_expr().alias(SKIP_REASON))
        prefix = blake2b(self.spec.fingerprint(), digest_size=16).digest()
        prompts = out.get_column(PROMPT).to_list()
        ids = out.get_column(self.id_column).cast(pl.String).to_list() if self.id_column else None
        if ids is None:
            keys = [None if p is None else blake2b(prefix + p.encode(), digest_size=16).hexdigest() for p in prompts]
        else:
            # With an id column, identical prompts on different rows stay separate requests.
            keys = [
                None if p is None else blake2b(prefix + (i or "").encode() + b"\x1f" + p.encode(), digest_size=16).hexdigest()
                for i, p in zip(ids, prompts, strict=True)
            ]
        # Roughly four bytes a token for English text; only used to pace --tpm.
        system_tokens = len((self.spec.system or "").encode()) // 4
        return out.with_columns(
            pl.Series(KEY, keys, dtype=pl.String),
            (pl.col(PROMPT).str.len_bytes() // 4 + system_tokens + 8 + (self.spec.max_tokens or 256)).alias(EST_TOKENS),
        )


def estimate_tokens(text: str) -> int:
    """A labelled estimate (about four bytes a token) for servers that send no usage."""
    return max(1, (len(text.encode()) + 3) // 4)
