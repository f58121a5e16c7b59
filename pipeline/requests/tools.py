"""Tool calls: the definitions read and checked, translated for each provider, and the calls read back.

`--tools FILE` (JSON or YAML) or a `tools:` list in the config holds OpenAI tool definitions,
`{"type": "function", "function": {"name", "description", "parameters"}}` (a bare function, or a
file whose top level is `tools: [...]`, is taken too). `--tool-choice` is `auto`, `none`,
`required` or a tool's name. OpenAI-compatible servers get both as they are; Anthropic gets its
own form: each tool's `parameters` as `input_schema`, and `tool_choice` as `{"type": "auto"}`,
`{"type": "any"}` (required), `{"type": "none"}` or `{"type": "tool", "name": ...}`.

An answer's calls are read back provider-neutral, as `{"name", "arguments"}` with the arguments an
object (OpenAI sends them as JSON text; text that is not JSON is kept as the string). With one
tool forced (`--tool-choice NAME`, or `required` with a single tool) and `--tool-columns`, that
call's arguments are the structured answer: checked against the tool's parameters and made typed
columns exactly as `--schema`'s fields are (pipeline/requests/structured.py).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import ConfigError, InvalidOutput

CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI and Anthropic both accept as a tool's name
_EMPTY = {"type": "object", "properties": {}}


def load_tools(value: Any) -> tuple[dict[str, Any], ...]:
    """The tools of a file's path (JSON or YAML) or of a list from the config, as OpenAI definitions."""
    where = "the tools setting"
    if isinstance(value, str):
        where = f"the tools file {value}"
        value = _read(Path(value))
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(
            f"{where.capitalize()} must be a non-empty list of OpenAI tool definitions "
            '([{"type": "function", "function": {"name": ..., "parameters": {...}}}]), or {tools: [...]}.'
        )
    tools = tuple(_tool(item, i, where) for i, item in enumerate(value))
    names = [t["function"]["name"] for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where.capitalize()} defines the tool {twice[0]!r} twice; give each tool a name of its own.")
    return tools


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"Tools file {path} does not exist. Give the path of a JSON or YAML file of tool definitions, or a "
            "tools: list in the config."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Tools file {path} cannot be read: {exc}.") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Tools file {path} is not valid JSON: {exc}.") from None
    import yaml  # YAML is a superset of JSON: any other file is read as YAML

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Tools file {path} is not valid YAML (nor JSON): {' '.join(str(exc).split())}.") from None


def _tool(item: Any, i: int, where: str) -> dict[str, Any]:
    """One definition, checked: OpenAI's form, or a bare function taken as one."""
    if isinstance(item, dict) and "function" not in item and "name" in item:
        item = {"type": "function", "function": item}  # a bare function: {name, description, parameters}
    fn = item.get("function") if isinstance(item, dict) else None
    if not isinstance(fn, dict) or item.get("type", "function") != "function":
        raise ConfigError(
            f"Tool {i + 1} of {where} is not an OpenAI tool definition: give "
            '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}.'
        )
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"Tool {i + 1} of {where} has the name {name!r}: a tool's name is 1 to 64 letters, digits, _ or -.")
    params = fn.get("parameters", _EMPTY)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ConfigError(f"The parameters of tool {name!r} must be a JSON Schema of an object (type: object).")
    try:
        Draft202012Validator.check_schema(params)
    except SchemaError as exc:
        at = "/".join(map(str, exc.path)) or "the top"
        raise ConfigError(f"The parameters of tool {name!r} are not a valid JSON Schema: {exc.message} (at {at}).") from None
    out: dict[str, Any] = {"name": name, "parameters": params}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    if isinstance(fn.get("strict"), bool):
        out["strict"] = fn["strict"]
    return {"type": "function", "function": out}


def names(tools: tuple[dict[str, Any], ...]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def check_choice(choice: str | None, tools: tuple[dict[str, Any], ...]) -> None:
    if choice is None or choice in CHOICES or choice in names(tools):
        return
    raise ConfigError(
        f"--tool-choice {choice!r} is neither auto, none, required nor one of the tools ({', '.join(names(tools))})."
    )


def forced(tools: tuple[dict[str, Any], ...], choice: str | None) -> dict[str, Any] | None:
    """The one function every answer must call: the tool `choice` names, or the only tool with `required`."""
    if choice in CHOICES and not (choice == "required" and len(tools) == 1):
        return None
    if choice is None:
        return None
    found = tools[0] if choice == "required" else next(t for t in tools if t["function"]["name"] == choice)
    fn: dict[str, Any] = found["function"]
    return fn


# ---- the wire forms ------------------------------------------------------------------------------


def openai_choice(choice: str) -> Any:
    return choice if choice in CHOICES else {"type": "function", "function": {"name": choice}}


def anthropic_tools(tools: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        fn = t["function"]
        tool = {"name": fn["name"], "input_schema": fn["parameters"]}
        if "description" in fn:
            tool["description"] = fn["description"]
        out.append(tool)
    return out


def anthropic_choice(choice: str) -> dict[str, str]:
    if choice == "required":
        return {"type": "any"}
    if choice in CHOICES:
        return {"type": choice}
    return {"type": "tool", "name": choice}


def openai_calls(message: Any) -> tuple[dict[str, Any], ...]:
    """The calls of an OpenAI-shaped assistant message, arguments parsed (kept as text when not JSON)."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    out = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        arguments = fn.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(orjson.JSONDecodeError):  # else the text, for a look; --tool-columns asks again
                arguments = orjson.loads(arguments) if arguments.strip() else {}
        out.append({"name": fn["name"], "arguments": arguments})
    return tuple(out)


def anthropic_calls(blocks: list[Any]) -> tuple[dict[str, Any], ...]:
    return tuple(
        {"name": b.get("name"), "arguments": b.get("input")}
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "tool_use" and isinstance(b.get("name"), str)
    )


def arguments_text(calls: tuple[dict[str, Any], ...] | None, name: str, text: str) -> str:
    """The forced call's arguments as JSON text (the answer --tool-columns checks and types), or InvalidOutput
    when the answer has no call to it: asked again, as a reply that does not match a schema is."""
    for call in calls or ():
        if call["name"] == name:
            args = call["arguments"]
            return args if isinstance(args, str) else orjson.dumps(args).decode()
    said = f": {text.strip()[:200]}" if text.strip() else ""
    raise InvalidOutput(f"reply does not call the tool {name}{said}", raw=text or "(no call)")
