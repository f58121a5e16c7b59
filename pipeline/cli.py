"""The command line: the only module that imports click."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline import errors
from pipeline.config import RunConfig, build_config, load_yaml

RUN_EXAMPLES = """
\b
Examples:
  pipeline run configs/summarise-reviews.yaml
  pipeline run configs/summarise-reviews.yaml --limit 5 --fresh
  pipeline run --input data/reviews.csv --prompt 'Summarise in one sentence: {text}' \\
      --output out/reviews.parquet --base-url http://127.0.0.1:8080/v1 --model SmolLM2-135M-Instruct
  MODELSLAB_API_KEY=... pipeline run configs/modelslab-llama-3.2-1b.yaml

\b
Exit codes: 0 done; 1 error rate above --max-error-rate, or stopped early (bad
key, no quota, server unreachable or 404 before any answer, the same refusal
on every request, a wait longer than --max-wait); 2 bad usage, config or input
(nothing sent); 130 interrupted by Ctrl-C or SIGTERM (the checkpoint is saved;
run again to resume).
"""


class UsageFailure(click.ClickException):
    """A user mistake: one paragraph, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"pipeline: error: {self.format_message()}", err=True)


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--input", "-i", "input", multiple=True, help="Input table: CSV, Parquet or JSONL. Repeat, or give a quoted glob."
        ),
        click.option("--output", "-o", help="Output Parquet file."),
        click.option("--prompt", "-p", help="Prompt template with {column} placeholders."),
        click.option("--prompt-column", help="Column that already holds the whole prompt (instead of --prompt)."),
        click.option("--messages-column", help="Column holding each row's conversation: a list of {role, content}."),
        click.option("--system", help="System prompt sent with every row."),
        click.option("--id-column", help="Column identifying a row; identical prompts on different ids are sent separately."),
        click.option(
            "--provider", type=click.Choice(["openai", "modelslab", "anthropic", "local"]), help="API to speak. Default: openai."
        ),
        click.option("--base-url", help="Server base URL, e.g. http://127.0.0.1:8080/v1."),
        click.option("--model", "-m", help="Model name (model_id for ModelsLab)."),
        click.option("--api-key-env", help="Environment variable holding the API key."),
        click.option("--max-tokens", type=int, help="Most tokens to generate per row. Default: 256."),
        click.option("--temperature", type=float, help="Sampling temperature."),
        click.option("--top-p", type=float, help="Nucleus sampling."),
        click.option(
            "--param-column",
            "param_columns",
            multiple=True,
            metavar="PARAM=COLUMN",
            help="A request parameter taken per row from a column, e.g. max_tokens=budget. Repeatable.",
        ),
        click.option(
            "--schema", "schema_", help="JSON Schema file: replies must be JSON matching it; its fields become typed columns."
        ),
        click.option(
            "--schema-output",
            type=click.Choice(["columns", "struct"]),
            help="Extracted fields as columns (default) or one struct column.",
        ),
        click.option(
            "--rpm", type=float, help="Most requests per minute, paced evenly; a hard cap over what the server announces."
        ),
        click.option("--tpm", type=float, help="Most tokens per minute (prompt estimate + max tokens); a hard cap."),
        click.option(
            "--concurrency",
            "-c",
            type=int,
            help="Most requests in flight. Default: learned up to 256 (ModelsLab 15); 16 (ModelsLab 5) with --no-adapt.",
        ),
        click.option(
            "--no-adapt",
            "adapt",
            flag_value=False,
            default=None,
            help="Do not learn limits from headers, 429s and latency: exactly --rpm, --tpm and --concurrency.",
        ),
        click.option(
            "--max-wait",
            help="Longest wait to sit out (a Retry-After, a daily limit, an outage): seconds or 15m, 1h. Default: 15m.",
        ),
        click.option("--max-attempts", type=int, help="Attempts per row, retries included. Default: 6."),
        click.option("--timeout", type=float, help="Seconds to wait for one answer."),
        click.option("--limit", type=int, help="Only the first N rows (a try-out)."),
        click.option("--checkpoint-dir", help="Checkpoint folder. Default: next to the output."),
        click.option("--max-error-rate", type=float, help="Exit 1 if more than this share of rows fail. Default: 0."),
        click.option("--batch-size", type=int, help="Rows read and written per batch. Default: 5000."),
        click.option("--fresh", is_flag=True, default=None, help="Ignore the checkpoint: send every row again."),
        click.option(
            "--no-progress",
            "progress",
            flag_value=False,
            default=None,
            help="No progress bar (nor, without a terminal, the status line each minute).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Batch LLM inference over tables: one prompt per row in, completions and token counts out, in Parquet."""


@cli.command(epilog=RUN_EXAMPLES)
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
def run(config: str | None, **flags: Any) -> None:
    """Run a job: render a prompt per row, send them all, write the results.

    CONFIG is a YAML file whose keys are the flags' names (max_tokens for
    --max-tokens); flags given on the command line win. Re-running the same
    command resumes: rows already answered are not sent again.
    """
    try:
        from pipeline.run import run_job  # heavy imports (polars, pyarrow, aiohttp) only when running

        code = run_job(_config(config, flags))
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:  # before anything was sent (later ones are handled inside the run)
        click.echo("\npipeline: interrupted before sending anything.", err=True)
        code = 130
    sys.exit(code)


@cli.command(
    epilog="\b\nExamples:\n  pipeline estimate configs/extract-invoices.yaml\n  MODELSLAB_API_KEY=... pipeline estimate configs/modelslab-llama-3.2-1b.yaml --samples 1"
)
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--samples", type=int, default=2, show_default=True, help="How many rendered requests to show.")
@run_options
def estimate(config: str | None, samples: int, **flags: Any) -> None:
    """Price a job without running it: sample requests, tokens in, worst-case tokens out, cost, time.

    Takes the same CONFIG and flags as `pipeline run`. No generation request is
    sent; prompt tokens are counted by the provider's count endpoint where it
    has one (Anthropic, ModelsLab), else estimated, and the report says which.
    """
    from pipeline.estimate import estimate_job

    try:
        cfg = _config(config, flags)
        code = estimate_job(cfg, sys.stdout, samples)
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    sys.exit(code)


@cli.command(
    name="serve-local",
    epilog="\b\nExample:\n  pipeline serve-local --port 8080\n  pipeline run configs/openai-compatible.yaml --base-url http://127.0.0.1:8080/v1",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def serve_local(host: str, port: int) -> None:
    """Serve the embedded model (SmolLM2-135M-Instruct) as an OpenAI-compatible server.

    Runs in the foreground until Ctrl-C or SIGTERM (`kill PID` for one started
    in the background); the llama.cpp process stops with it.
    """
    from pipeline.local_model import MODEL_ALIAS, LocalServer

    try:
        server = LocalServer(host=host, port=port).start()
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(f"Serving {MODEL_ALIAS} at {server.base_url} (model name {MODEL_ALIAS!r}); Ctrl-C to stop.", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@cli.command(epilog="\b\nExample:\n  pipeline show out/reviews-summary.parquet --rows 5")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--rows", "-n", type=int, default=5, show_default=True, help="How many rows to show.")
def show(path: str, rows: int) -> None:
    """Print the first rows of an output file and its status counts."""
    import polars as pl

    try:
        columns = pl.read_parquet_schema(path)
        df = pl.read_parquet(path, n_rows=rows)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UsageFailure(
            f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]}). Give the output of a `pipeline run`."
        ) from None
    if "status" not in columns or "completion" not in columns:
        raise UsageFailure(
            f"{path} is not a pipeline output (it has no 'status' and 'completion' columns). Give the --output of a `pipeline run`."
        )
    names = list(columns)
    # The first input column (often an id), what the model gave (extracted fields if a schema was used), the outcome.
    extracted = names[names.index("tokens_estimated") + 1 :] if "tokens_estimated" in names else []
    shown = [*names[:1], *(extracted or ["completion"]), "status", "error", "total_tokens"]
    counts = pl.scan_parquet(path).group_by("status").len().sort("status").collect()
    with pl.Config(
        tbl_rows=rows, fmt_str_lengths=90, tbl_width_chars=160, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True
    ):
        click.echo(df.select(list(dict.fromkeys(shown))))
    click.echo(f"{path}: " + ", ".join(f"{r['status']}: {r['len']} rows" for r in counts.iter_rows(named=True)))


def _config(config: str | None, flags: dict[str, Any]) -> RunConfig:
    """The config file (if any) with the flags laid over it, validated."""
    flags["input"] = flags["input"] or None
    flags["schema"] = flags.pop("schema_")
    flags["param_columns"] = _pairs(flags["param_columns"])
    values = load_yaml(config) if config else {}
    return build_config(values, flags, source=f"config {config}" if config else "flags")


def _pairs(values: tuple[str, ...]) -> dict[str, str] | None:
    """PARAM=COLUMN flags as a mapping (None when none were given)."""
    if not values:
        return None
    bad = [v for v in values if "=" not in v]
    if bad:
        raise UsageFailure(f"--param-column takes PARAM=COLUMN (e.g. max_tokens=budget), not {bad[0]!r}.")
    return dict(tuple(v.split("=", 1)) for v in values)  # type: ignore[misc]


def main() -> None:
    # From here on SIGTERM is an interrupt like Ctrl-C: flush, say how to resume, exit 130.
    # (Before this line only imports have run, and there is nothing to flush.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli(prog_name="pipeline")
