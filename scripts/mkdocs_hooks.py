"""MkDocs hook: the reference pages that are generated from the code at build time, never copied by hand.

`docs/reference/cli.md` holds the line `<!-- generated: cli -->`, replaced by the `--help` of every
click command, as a terminal 80 columns wide prints it; `docs/reference/config.md` holds
`<!-- generated: config -->`, replaced by a table of every setting of `RunConfig` (its YAML key,
its flag, type, default and help text), and `<!-- generated: providers -->` by what each provider
fills in for the settings left out; `<!-- generated: make -->` (docs/development.md) lists the
Makefile's targets as `make help` does. A command or a setting added to the code is in the next
build without anyone touching the pages. tests/test_docs.py checks that every command and every
setting is covered.

Loaded by mkdocs.yml's `hooks:`; the functions below also work without MkDocs installed.
"""

from __future__ import annotations

import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.MULTILINE)
WIDTH = 80  # a common terminal; the CLI wraps at up to 100 columns, wider than the docs theme shows unscrolled


def commands() -> list[tuple[str, Any]]:
    """Every command and group under `pipeline`, depth first, as ("pipeline run", command)."""
    import click

    from pipeline.cli import cli

    found: list[tuple[str, Any]] = []

    def walk(path: str, command: click.Command) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=path)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(f"{path} {name}", sub)

    walk("pipeline", cli)
    return found


def help_text(path: str) -> str:
    """What `PATH --help` prints on a terminal WIDTH columns wide (click leaves 2 columns free)."""
    import click

    from pipeline.cli import cli

    name, *rest = path.split()
    ctx = cli.make_context(name, [], resilient_parsing=True, terminal_width=WIDTH - 2)
    command: click.Command = cli
    for part in rest:
        assert isinstance(command, click.Group), f"{path}: {part} is under a command, not a group"
        sub = command.get_command(ctx, part)
        if sub is None:
            raise ValueError(f"no command {path!r}")
        command, ctx = sub, sub.make_context(part, [], parent=ctx, resilient_parsing=True)
    return command.get_help(ctx).rstrip() + "\n"


def cli_reference() -> str:
    """A section per command: its --help in a text block, commands in the order the CLI lists them."""
    parts = []
    for path, command in commands():
        summary = command.get_short_help_str(limit=200)
        parts.append(f"## `{path}`\n\n{summary}\n\n```text\n{help_text(path)}```\n")
    return "\n".join(parts)


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin is tuple:
        return "list of text"
    if origin is dict:
        return "mapping"
    if origin in (Union, UnionType):
        names = [_type_name(a) for a in args]
        return names[0] if len(names) == 1 else " or ".join(names)
    return {str: "text", int: "integer", float: "number", bool: "true/false"}.get(annotation, str(annotation))


def _bounds(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    shown = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                shown.append(f"{symbol} {value:,}" if isinstance(value, int) else f"{symbol} {value}")
    return f" ({', '.join(shown)})" if shown else ""


def _cell(text: str) -> str:
    """Text that stays one table cell and is not read as HTML (`<output>.metrics.json`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def _default(factory: Any, value: Any) -> str:
    from pydantic_core import PydanticUndefined

    if factory is not None:
        return "empty"
    if value is None or value is PydanticUndefined:
        return "unset"  # the provider's default, or none (the help says which)
    if value == ():
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if value != "" else '`""`'


def config_rows() -> list[tuple[str, str, str, str, str]]:
    """(key, flag, type, default, help) per setting, in the model's order."""
    from pipeline.config import RunConfig

    rows = []
    for name, field in RunConfig.model_fields.items():
        extra: dict[str, Any] = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        key = field.alias or name
        flag = str(extra.get("flag") or "--" + key.replace("_", "-"))
        if "short" in extra:
            flag = f"{extra['short']}, {flag}"
        if extra.get("repeatable"):
            flag += " (repeatable)"
        kind = _type_name(field.annotation) + _bounds(field)
        if extra.get("metavar") == "DURATION":
            kind += " or a duration (15m, 1h)"
        default = _default(field.default_factory, field.default)
        shown = f"`{flag}` repeated (mappings: config and API only)" if extra.get("cli") is False else f"`{flag}`"
        rows.append((f"`{key}`", shown, kind, default, _cell(field.description or "")))
    return rows


def config_reference() -> str:
    lines = ["| key | flag | type | default | what it does |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in config_rows()]
    return "\n".join(lines) + "\n"


def provider_defaults() -> str:
    """What each provider means by the settings left out (config.PROVIDER_DEFAULTS)."""
    from pipeline.config import PROVIDER_DEFAULTS

    columns = ("base_url", "api_key_env", "model", "adaptive_concurrency", "concurrency", "timeout", "json_mode")
    heads = (
        "base_url",
        "key variable",
        "model",
        "in flight, learned up to",
        "in flight with --no-adapt",
        "timeout (s)",
        "json_mode",
    )
    lines = [f"| provider | {' | '.join(heads)} |", "|---|" + "---|" * len(heads)]
    for provider, defaults in PROVIDER_DEFAULTS.items():
        cells = [f"`{defaults[c]}`" if c in defaults else "-" for c in columns]
        lines.append(f"| `{provider}` | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def make_targets() -> str:
    """The Makefile's targets and their `## help`, as `make help` lists them."""
    from pathlib import Path

    makefile = Path(__file__).resolve().parent.parent / "Makefile"
    found = re.findall(r"^([a-z-]+):.*?## (.*)$", makefile.read_text(), re.MULTILINE)
    width = max(len(name) for name, _ in found)
    return "```text\n" + "".join(f"make {name:<{width}}  {text}\n" for name, text in found) + "```\n"


def exit_codes() -> str:
    """The outcomes table of pipeline/outcomes.py: exit code, outcome word, meaning, what helps, exception."""
    from pipeline.outcomes import table_markdown

    return table_markdown()


GENERATORS = {
    "cli": cli_reference,
    "config": config_reference,
    "providers": provider_defaults,
    "make": make_targets,
    "exit-codes": exit_codes,
}


def render(markdown: str) -> str:
    """The page with each `<!-- generated: NAME -->` line replaced by what NAME's generator makes."""

    def replace(m: re.Match[str]) -> str:
        if m[1] not in GENERATORS:
            raise ValueError(f"no generator named {m[1]!r}: known ones are {', '.join(GENERATORS)}")
        return GENERATORS[m[1]]()

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return render(markdown)
