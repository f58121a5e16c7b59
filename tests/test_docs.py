"""The documentation's reference pages cover what the code has: every command, setting, column, field and exit code.

The CLI and config reference are generated at build time by scripts/mkdocs_hooks.py; these tests
check the generator walks everything (a new command or setting appears without anyone editing a
page) and that the hand-written reference tables name every output column, metrics field and
exit code the code has. No MkDocs needed: `make docs` builds the site itself, strictly.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import RunConfig
from pipeline.tables.checkpoint import RESULT_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def _all_commands(group: click.Group, path: str = "pipeline") -> set[str]:
    """Every command path under the group, found independently of the generator's own walk."""
    found = {path}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= _all_commands(command, f"{path} {name}")
        else:
            found.add(f"{path} {name}")
    return found


def test_the_cli_reference_has_a_section_per_command_with_its_real_help() -> None:
    page = hooks.render((DOCS / "reference" / "cli.md").read_text())
    sections = set(re.findall(r"^## `(pipeline[^`]*)`$", page, re.MULTILINE))
    assert sections == _all_commands(cli)
    assert "<!-- generated" not in page
    # What the page shows is what the command prints on a terminal WIDTH columns wide, through the real entry point.
    printed = CliRunner().invoke(cli, ["batch", "status", "--help"], prog_name="pipeline", terminal_width=hooks.WIDTH - 2)
    assert printed.exit_code == 0
    assert hooks.help_text("pipeline batch status") == printed.output.rstrip() + "\n"
    assert "--max-tokens INTEGER" in page and "Exit codes (a scheduler can tell the causes apart" in page


def test_the_config_reference_has_a_row_per_setting() -> None:
    page = hooks.render((DOCS / "reference" / "config.md").read_text())
    rows = set(re.findall(r"^\| `([a-z_]+)` \| `", page, re.MULTILINE))
    keys = {field.alias or name for name, field in RunConfig.model_fields.items()}
    assert keys <= rows, f"settings missing from the config reference: {sorted(keys - rows)}"
    assert "| `max_tokens` | `--max-tokens` | integer (≥ 1) | `256` |" in page
    assert "| `adapt` | `--no-adapt` | true/false | `true` |" in page
    assert "&lt;output&gt;.metrics.json" in page  # help text with <...> is escaped, not swallowed as HTML


def test_an_unknown_generator_fails_the_build() -> None:
    with pytest.raises(ValueError, match="no generator named 'nonsense'"):
        hooks.render("<!-- generated: nonsense -->\n")


def test_the_output_reference_names_every_result_column() -> None:
    page = (DOCS / "reference" / "output.md").read_text()
    named = re.findall(r"^\| `(\w+)` \|", page, re.MULTILINE)
    assert [c for c in named if c in RESULT_COLUMNS] == list(RESULT_COLUMNS)  # all of them, in output order


def test_the_metrics_reference_names_every_field_and_outcome() -> None:
    schema = json.loads((ROOT / "pipeline" / "observe" / "metrics.schema.json").read_text())
    page = (DOCS / "reference" / "metrics.md").read_text()
    for field in schema["properties"]:
        assert f"`{field}`" in page, field
    for outcome in schema["properties"]["run"]["properties"]["outcome"]["enum"]:
        assert f"`{outcome}`" in page, outcome
    assert '--8<-- "pipeline/observe/metrics.schema.json"' in page  # the schema itself, included at build time


def test_the_exit_code_reference_names_every_code_and_outcome() -> None:
    from pipeline.outcomes import EXIT_CODES

    schema = json.loads((ROOT / "pipeline" / "observe" / "metrics.schema.json").read_text())
    page = hooks.render((DOCS / "reference" / "exit-codes.md").read_text())
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", page, re.MULTILINE)}
    assert set(EXIT_CODES.values()) == codes
    for outcome in schema["properties"]["run"]["properties"]["outcome"]["enum"]:
        assert f"`{outcome}`" in page, outcome
    assert set(EXIT_CODES) <= set(schema["properties"]["run"]["properties"]["outcome"]["enum"])


def test_every_page_in_the_navigation_exists_and_every_page_is_in_it() -> None:
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert set(nav) == pages


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_lists_docs() -> None:
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\s+make docs\s+build the documentation site", out, re.MULTILINE)


def test_the_output_reference_names_every_column_a_setting_adds() -> None:
    from pipeline.tables.columns import ADDED

    page = (DOCS / "reference" / "output.md").read_text()
    named = re.findall(r"^\| `(\w+)` \|", page, re.MULTILINE)
    assert [c for c in named if c in ADDED] == list(ADDED)  # after the base columns, in the order they are written
