"""Where a job's settings come from: a YAML file, flags, keyword arguments, laid over each other and
validated once into a RunConfig (pipeline/config.py, the model itself).

Relative paths in a config file are read from the file's folder, so the same config means the same
files from wherever it is run; flags are read from the current folder, as any command's are. A
setting that fails validation is explained in one paragraph that names the key and, for a
misspelt one, the key meant.
"""

from __future__ import annotations

import difflib
import glob
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import _SCHEME, FIELDS, TABLE_SUFFIXES, RunConfig
from pipeline.errors import ConfigError
from pipeline.models import configs as model_configs


def load_yaml(path: str) -> dict[str, Any]:
    """Read a config file into a plain dict, or explain why it cannot be read."""
    p = Path(path)
    if p.suffix.lower() in TABLE_SUFFIXES:
        raise ConfigError(
            f"{path} looks like a table, not a config file. Pass it with --input: "
            f"pipeline run --input {path} --prompt '...{{column}}...' --output out/result.parquet"
        )
    if not p.is_file():
        raise ConfigError(
            f"Config file {path} does not exist. Check the path, or run without a config and give --input/--output/--prompt."
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Config file {path} is not readable YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must be a mapping of settings (key: value), not a {type(data).__name__}.")
    return resolve_paths(data, p.parent)


# Settings that name a file or a folder: relative ones in a config file are read from the config file's folder.
PATH_SETTINGS = ("input", "output", "schema", "tools", "checkpoint_dir", "metrics", "report", "cache_dir")


def resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config's relative paths joined to its folder, so the same config means the same files from
    wherever it is run (cron in $HOME, a scheduler's temporary folder). Flags are not touched: they are
    read from the current folder, as any command's are.

    A path that names something only from the current folder (a config written before this rule, whose
    earlier runs left their output or checkpoint there) keeps that meaning, with a warning that says how
    to write it: a job that ran is never started over by a change of rule."""
    if folder in (Path(""), Path(".")):
        return data
    resolved = dict(data)
    for name in PATH_SETTINGS:
        value = data.get(name)
        if name == "input" and isinstance(value, list | tuple):
            resolved[name] = [_joined(name, v, folder) for v in value]
        elif isinstance(value, str):
            resolved[name] = _joined(name, value, folder)
    return resolved


def _joined(name: str, value: Any, folder: Path) -> Any:
    if not isinstance(value, str) or not _is_relative_path(name, value):
        return value
    joined = os.path.normpath(os.path.join(folder, value))
    if joined == os.path.normpath(value) or _found(name, joined) or not _found(name, value):
        return joined
    logging.getLogger("pipeline").warning(
        "pipeline: %s: %r is read from the current folder, where an earlier run left it; paths in a config file are "
        "read from the config file's folder (%s), where it is not. Write it as %r in the config (or give it as a flag) "
        "to keep this meaning from any folder.",
        name,
        value,
        folder,
        os.path.relpath(value, folder),
    )
    return value


def _is_relative_path(name: str, value: str) -> bool:
    if not value or value == "-" or value.startswith("~") or _SCHEME.match(value) or Path(value).is_absolute():
        return False
    return not (name in ("schema", "tools") and value.lstrip().startswith(("{", "[")))  # inline JSON


def _found(name: str, path: str) -> bool:
    """Whether `path` names something that exists: an input's matches, an output or its checkpoint, a file."""
    if name == "input":
        return bool(glob.glob(path, recursive=True))
    if name == "output":
        out = Path(path)
        return out.exists() or out.with_name(out.stem + ".checkpoint").exists()
    return Path(path).exists()


def build_config(file_values: dict[str, Any], overrides: dict[str, Any], source: str = "config") -> RunConfig:
    """Merge the file with the flags (flags win) and validate the result."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "model" in given or "models" in given:  # the models given here replace the file's, whichever form either takes
        file_values = {k: v for k, v in file_values.items() if k not in ("model", "models")}
    merged = {**file_values, **given}
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None
    if len(cfg.models) == 1:  # a list of one model is a run of that model, exactly as `model:` makes it
        return model_configs(cfg)[0]
    return cfg


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    unknown = False
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, FIELDS, n=1)
            lines.append(f"unknown setting '{key}'." + (f" Did you mean '{near[0]}'?" if near else ""))
            unknown = True
        elif err["type"] == "missing":
            flag = "--" + key.replace("_", "-")
            lines.append(f"'{key}' is required: set it in the config or pass {flag}.")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = "" if err["type"].startswith("value_error") else f" (got {err.get('input')!r})"
            lines.append(f"'{key}': {msg}{shown}." if key != "(config)" else f"{msg}.")
    if unknown:  # once, however many keys were unknown
        lines.append(f"Valid settings: {', '.join(FIELDS)}.")
    return f"Invalid {source}: " + " ".join(lines)


ConfigLike = RunConfig | Mapping[str, Any] | str | Path | None


def settings_config(config: ConfigLike, settings: Mapping[str, Any], *, api: bool) -> RunConfig:
    """The config (a YAML path, a mapping or a RunConfig) with the keyword settings laid over it."""
    if isinstance(config, RunConfig):
        base: dict[str, Any] = config.model_dump(by_alias=True, exclude_unset=True)
    elif isinstance(config, str | Path):
        base = load_yaml(str(config))
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"config must be a YAML file's path, a mapping or a RunConfig, not {type(config).__name__}.")
    if api:
        for name in ("input", "output"):
            if name in settings or name in base:
                raise ConfigError(
                    f"complete() takes its table as the first argument and returns the result: '{name}' is not used. "
                    "For files in and files out, call pipeline.run()."
                )
        base.setdefault("make_report", False)
        # The rows carry their status: a table with failed rows is still the answer, not an error.
        base.setdefault("max_error_rate", 1.0)
    source_name = f"config {config}" if isinstance(config, str | Path) else "settings"
    return build_config(base, dict(settings), source=source_name)
