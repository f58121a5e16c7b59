"""The command line: the only module that imports click."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic.fields import FieldInfo

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.outcomes import EXIT_CODES, MEANINGS, of_fatal
from pipeline.settings import build_config, load_yaml

RUN_EXAMPLES = """
\b
Examples:
  pipeline run configs/summarise-reviews.yaml
  pipeline run configs/summarise-reviews.yaml --limit 5 -o out/try.parquet
  pipeline run -i export.csv --encoding cp1252 --separator ';' -p 'Ticket: {subject} {notes:}' \\
      --result-prefix llm_ --base-url http://127.0.0.1:8000/v1 -m my-model --api-key-env MY_KEY -o out/t.csv
  pipeline run --input data/reviews.csv --prompt 'Summarise in one sentence: {text}' \\
      --output out/reviews.parquet --base-url http://127.0.0.1:8080/v1 --model SmolLM2-135M-Instruct
  MODELSLAB_API_KEY=... pipeline run configs/modelslab-llama-3.2-1b.yaml

\b
Exit codes (a scheduler can tell the causes apart; the metrics file's "outcome" says the same):
{exit_codes}
Every run but a refused one writes <output>.metrics.json (and <output>.report.html) beside the
output; a run refused with exit 2 writes the metrics file with outcome usage_error, so nothing
stale is read.
"""


RUN_EXAMPLES = RUN_EXAMPLES.replace("{exit_codes}", "\n".join(f"  {code:>3}  {text}" for code, text in MEANINGS.items()))


class UsageFailure(click.ClickException):
    """A user mistake: one paragraph, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"pipeline: error: {self.format_message()}", err=True)


# How a setting's type looks on the command line; mappings are given as repeated PAIRS.
_PAIR_SEPARATORS = {"headers": ":", "params": "=", "param_columns": "=", "dtypes": "="}


def _option(name: str, field: FieldInfo) -> Callable[..., Any]:
    """One click option for one RunConfig setting, from its type, default and help."""
    extra: dict[str, Any] = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    key = field.alias or name
    flag = str(extra.get("flag") or "--" + key.replace("_", "-"))
    decls = [flag, *([str(extra["short"])] if "short" in extra else []), name]
    kw: dict[str, Any] = {"help": field.description, "default": None}
    if "metavar" in extra:
        kw["metavar"] = extra["metavar"]
    kind = _bare(field.annotation)
    if kind is bool:
        # --no-x for a setting on by default, --x for one off by default; unset stays None (the config decides).
        kw.update(flag_value=not field.default)
    elif get_origin(kind) is Literal:
        kw["type"] = click.Choice([str(a) for a in get_args(kind)])
    elif kind in (int, float) and not extra.get("text"):
        kw["type"] = kind
    elif get_origin(kind) in (tuple, dict) or extra.get("repeatable"):
        kw.update(multiple=True, default=())
    return click.option(*decls, **kw)


def _bare(annotation: Any) -> Any:
    """`X | None` as X; unions of other kinds (the schema: a path or a mapping) as str."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Every setting of RunConfig as a flag: the model is the one list of options."""
    for name, field in reversed(RunConfig.model_fields.items()):
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("cli") is False:
            continue  # a config's (and the API's) only: `models:` entries are mappings, repeated --model its flag form
        f = _option(name, field)(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Batch LLM inference over tables: one prompt per row in, completions and token counts out (Parquet, CSV or JSONL)."""


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
        code = _run(_config(config, flags))
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:  # before anything was sent (later ones are handled inside the run)
        click.echo("\npipeline: interrupted before sending anything.", err=True)
        code = 130
    sys.exit(code)


def _run(cfg: RunConfig) -> int:
    """One job on a fresh event loop; the exit code. SIGTERM is an interrupt like Ctrl-C for the whole run
    (a scheduler's kill gets the same flush, message and exit 130), at once: a scheduler's own grace
    before SIGKILL is unknown here. A first Ctrl-C waits a few seconds for the requests in flight, whose
    answers are paid for, then stops; a second stops at once."""
    import asyncio  # with the run's heavy imports (polars, pyarrow, aiohttp): only when running

    from pipeline.job import INTERRUPT_GRACE_S, prepare_job

    job = prepare_job(cfg)

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        winding: list[asyncio.Task[None]] = []

        async def wind_down() -> None:
            await job.wind_down(INTERRUPT_GRACE_S)
            if not task.done():  # every row may have come back in the meantime
                task.cancel()

        def on_ctrl_c() -> None:
            if winding:  # the second Ctrl-C: stop now
                task.cancel()
            else:
                winding.append(loop.create_task(wind_down()))

        loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
        return (await job.execute()).exit_code

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        if job.result is None:  # not yet sending: nothing to save
            raise KeyboardInterrupt from None
        return job.result.exit_code
    finally:
        # Closing the loop resets SIGTERM to the default (die at once); keep it an interrupt.
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@cli.command(
    epilog="\b\nExamples:\n  pipeline estimate configs/extract-invoices.yaml\n  MODELSLAB_API_KEY=... pipeline estimate configs/modelslab-llama-3.2-1b.yaml --samples 1"
)
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--samples", type=int, default=2, show_default=True, help="How many rendered requests to show.")
@click.option("--full", is_flag=True, help="Show the sample requests whole (each text is cut to 400 characters otherwise).")
@run_options
def estimate(config: str | None, samples: int, full: bool, **flags: Any) -> None:
    """Price a job without running it: sample requests, tokens in, worst-case tokens out, cost, time.

    Takes the same CONFIG and flags as `pipeline run`. No generation request is
    sent; prompt tokens are counted by the provider's count endpoint where it
    has one (Anthropic, ModelsLab), else estimated, and the report says which.
    """
    from pipeline.observe.estimate import estimate_job

    try:
        cfg = _config(config, flags)
        code = estimate_job(cfg, sys.stdout, samples, full=full)
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    sys.exit(code)


@cli.command(
    name="serve-local",
    epilog="\b\nExamples:\n  pipeline serve-local --port 8080\n"
    "  pipeline run configs/openai-compatible.yaml --base-url http://127.0.0.1:8080/v1\n"
    "  pipeline serve-local --model-file models/qwen2.5-0.5b-instruct-q4_k_m.gguf --threads 4 --ctx-size 4096",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for generation. Default: llama.cpp's.")
@click.option("--ctx-size", type=click.IntRange(min=64), default=2048, show_default=True, help="Context window in tokens.")
@click.option(
    "--model-file",
    type=click.Path(),  # checked by check_gguf, whose message says what to give
    default=None,
    metavar="PATH.gguf",
    help="Serve this GGUF model instead of the embedded SmolLM2-135M-Instruct.",
)
@click.option(
    "--alias",
    default=None,
    metavar="NAME",
    help="Model name clients ask for. Default: the model file's stem (SmolLM2-135M-Instruct).",
)
def serve_local(host: str, port: int, threads: int | None, ctx_size: int, model_file: str | None, alias: str | None) -> None:
    """Serve the embedded model (SmolLM2-135M-Instruct), or another GGUF, as an OpenAI-compatible server.

    Runs in the foreground until Ctrl-C or SIGTERM (`kill PID` for one started
    in the background); the llama.cpp process stops with it.
    """
    from pipeline.providers.local_model import LocalServer, check_gguf

    try:
        model = check_gguf(model_file) if model_file is not None else None
        server = LocalServer(host=host, port=port, n_ctx=ctx_size, threads=threads, model=model, alias=alias).start()
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(f"Serving {server.alias} at {server.base_url} (model name {server.alias!r}); Ctrl-C to stop.", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@cli.command(
    epilog="\b\nExamples:\n  pipeline show out/reviews-summary.parquet --rows 5\n"
    "  pipeline show out/reviews-summary.parquet --errors --columns review_id,error --full\n"
    "  pipeline show reviews.stdout.checkpoint      # the answers of a run with --output -"
)
@click.argument("path")
@click.option("--rows", "-n", type=click.IntRange(min=0), default=5, show_default=True, help="How many rows to show.")
@click.option("--errors", "errors_only", is_flag=True, help="Only rows whose status is error.")
@click.option("--columns", default=None, metavar="A,B", help="The columns to show, comma-separated.")
@click.option("--full", is_flag=True, help="Every value whole, one per line, instead of a table of shortened text.")
@click.option("--checkpoint-dir", default=None, help="The run's checkpoint folder, if not next to the output.")
@click.option(
    "--result-prefix",
    default=None,
    metavar="PREFIX",
    help="The run's --result-prefix (found from the columns by default); --columns error then means PREFIXerror.",
)
def show(
    path: str,
    rows: int,
    errors_only: bool,
    columns: str | None,
    full: bool,
    checkpoint_dir: str | None,
    result_prefix: str | None,
) -> None:
    """Print the first rows of an output file (Parquet, CSV or JSONL) and its status counts.

    Before its run has finished (running, or stopped), the answers so far are
    shown from its checkpoint. PATH may also be a checkpoint folder.
    """
    from pipeline.observe.show import show as show_output  # polars only when showing

    chosen = [c.strip() for c in columns.split(",") if c.strip()] if columns else []
    try:
        text = show_output(
            path, rows=rows, errors_only=errors_only, columns=chosen, full=full, checkpoint_dir=checkpoint_dir,
            result_prefix=result_prefix,
        )  # fmt: skip
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(text)


@cli.command(
    epilog="\b\nExamples:\n  pipeline report out/reviews-summary.parquet      # writes out/reviews-summary.report.html\n"
    "  pipeline report out/tickets.csv --metrics nightly/tickets.metrics.json -o /srv/www/tickets.html"
)
@click.argument("output")
@click.option(
    "--metrics", default=None, metavar="FILE", help="The run's metrics file. Default: <output stem>.metrics.json beside it."
)
@click.option("--checkpoint-dir", default=None, help="The run's checkpoint folder, if not next to the output.")
@click.option(
    "-o", "--report", "report_file", default=None, metavar="FILE.html", help="Where to write. Default: <output stem>.report.html."
)
def report(output: str, metrics: str | None, checkpoint_dir: str | None, report_file: str | None) -> None:
    """Build the HTML run report of an output again (self-contained, opens offline).

    Charts come from the output (or, before the run has finished, its
    checkpoint) and from the metrics file the run wrote beside it.
    """
    from pipeline.observe import report as run_report  # altair and vl-convert only when drawing
    from pipeline.tables.storage import local_view

    output = local_view(output)  # an s3:// output: its local copy, beside its checkpoint
    target = report_file or str(run_report.default_report_path(output))
    try:
        run_report.write_report(target, run_report.build_report(output, metrics=metrics, checkpoint_dir=checkpoint_dir))
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    except OSError as exc:
        raise UsageFailure(f"Cannot write the report {target}: {exc.strerror}. Choose another path with -o.") from None
    click.echo(f"Report written to {target}")


@cli.group(
    epilog="\b\nExamples:\n  pipeline run nightly.yaml --mode batch      # submit; exit 3 while batches run\n"
    "  pipeline batch status nightly.yaml --mode batch\n  pipeline batch cancel nightly.yaml --mode batch"
)
def batch() -> None:
    """A batch-mode job's batches: their state, or cancelling them. Takes the job's CONFIG and flags."""


def _batch_command(action: str, config: str | None, flags: dict[str, Any]) -> None:
    import asyncio

    from pipeline.job import batch_command

    flags["mode"] = "batch"  # the subcommand is the mode, whatever the config says
    try:
        code = asyncio.run(batch_command(_config(config, flags), action, lambda m: click.echo(m, err=True)))
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    except errors.RequestError as exc:
        outcome = of_fatal(exc) if isinstance(exc, errors.FatalError) else "requests_refused"
        code = EXIT_CODES[outcome]
        click.echo(f"pipeline: the batch API answered {exc.message}: exit {code} ({outcome})", err=True)
    sys.exit(code)


@batch.command(name="status")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
def batch_status(config: str | None, **flags: Any) -> None:
    """Each batch of the job: its state and counts as the provider reports them now. Changes nothing."""
    _batch_command("status", config, flags)


@batch.command(name="cancel")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
def batch_cancel(config: str | None, **flags: Any) -> None:
    """Cancel the job's open batches, wait until they are cancelled, and keep what they had finished."""
    _batch_command("cancel", config, flags)


@cli.group(
    epilog="\b\nExamples:\n  pipeline run configs/summarise-reviews.yaml --cache ~/.cache/pipeline\n"
    "  pipeline cache info ~/.cache/pipeline\n  pipeline cache prune ~/.cache/pipeline --older-than 30d --max-mb 500"
)
def cache() -> None:
    """The answer cache that `run --cache DIR` shares across jobs and outputs: what it holds, and pruning it."""


@cache.command(name="info")
@click.argument("folder", type=click.Path(file_okay=False))
def cache_info(folder: str) -> None:
    """How many answers the cache in FOLDER holds, their size and age."""
    import datetime

    from pipeline.tables.cache import FILE, AnswerCache

    if not (Path(folder) / FILE).exists():
        raise UsageFailure(f"{folder} holds no answer cache ({FILE}). Give the folder a run used with --cache.")
    try:
        with AnswerCache(folder) as store:
            info = store.info()
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None

    def when(t: float | None) -> str:
        return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds") if t else "-"

    click.echo(
        f"{folder}: {info.entries:,} answers, {info.bytes / 1e6:.1f} MB of answers ({info.file_bytes / 1e6:.1f} MB on disk); "
        f"oldest {when(info.oldest)}, newest {when(info.newest)}"
    )


@cache.command(name="prune")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--older-than", metavar="DURATION", default=None, help="Drop answers not used for this long: 30d, 12h, 90m.")
@click.option("--max-mb", type=click.FloatRange(min=0), default=None, help="Then drop the least recently used down to this size.")
def cache_prune(folder: str, older_than: str | None, max_mb: float | None) -> None:
    """Drop answers from the cache in FOLDER and give their space back (safe while jobs use it)."""
    from pipeline.tables.cache import FILE, AnswerCache

    if older_than is None and max_mb is None:
        raise UsageFailure("Say what to drop: --older-than 30d, --max-mb 500, or both.")
    if not (Path(folder) / FILE).exists():
        raise UsageFailure(f"{folder} holds no answer cache ({FILE}). Give the folder a run used with --cache.")
    seconds = None
    if older_than is not None:
        seconds = _age(older_than)
    try:
        with AnswerCache(folder) as store:
            dropped = store.prune(max_mb=max_mb, older_than=seconds)
            store.compact()
            left = store.info()
    except errors.UserError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(f"Dropped {dropped:,} answers; {left.entries:,} remain ({left.file_bytes / 1e6:.1f} MB on disk).")


@cli.group(epilog="\b\nExamples:\n  pipeline state info\n  pipeline state clear\n  pipeline state clear --older-than 30d")
def state() -> None:
    """What pipeline keeps for you outside your folders: complete()'s default answer store, and the local
    side (output copies, reports) of s3:// jobs. PIPELINE_STATE_DIR or XDG_STATE_HOME move it."""


@state.command(name="info")
def state_info() -> None:
    """Where the state folder is and what it holds."""
    from pipeline.tables.cache import FILE, AnswerCache
    from pipeline.tables.statedir import answers_dir, objects_dir, state_dir

    click.echo(f"state folder: {state_dir()}")
    if (answers_dir() / FILE).exists():
        with AnswerCache(answers_dir()) as store:
            info = store.info()
        click.echo(f"  default answer store: {info.entries:,} answers, {info.file_bytes / 1e6:.1f} MB ({answers_dir() / FILE})")
    else:
        click.echo("  default answer store: empty")
    local = sum(f.stat().st_size for f in objects_dir().rglob("*") if f.is_file()) if objects_dir().exists() else 0
    click.echo(f"  s3:// jobs' local copies: {local / 1e6:.1f} MB ({objects_dir()})")


@state.command(name="clear")
@click.option("--older-than", metavar="DURATION", default=None, help="Only answers not used for this long: 30d, 12h.")
def state_clear(older_than: str | None) -> None:
    """Empty complete()'s default answer store (the next call pays for every row again) and remove the
    local copies of s3:// jobs that no run is using (their state is in the bucket)."""
    from pipeline.answers import clear_answers, forget_local_copies

    days = _age(older_than) / 86400 if older_than is not None else None
    dropped = clear_answers(days)
    removed = forget_local_copies() if days is None else []
    click.echo(f"Dropped {dropped:,} answers from the default store" + (f"; removed {removed[0]}" if removed else "") + ".")


def _age(text: str) -> float:
    """30d, 12h, 90m, 45s or plain seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise UsageFailure(f"--older-than takes a duration such as 30d, 12h or 90m, not {text!r}.") from None
    return value * units[unit]


def _config(config: str | None, flags: dict[str, Any]) -> RunConfig:
    """The config file (if any) with the flags laid over it, validated."""
    # A repeatable flag not given comes as (): unset, so that the config's list (image_columns: [...]) stands.
    flags = {k: None if v == () else v for k, v in flags.items()}
    flags["schema"] = flags.pop("schema_")
    names = flags["model"]  # --model repeated: several models in one run
    flags["model"] = None if not names else names[0] if len(names) == 1 else list(names)
    for name, sep in _PAIR_SEPARATORS.items():
        flags[name] = _pairs(name, sep, flags[name])
    values = load_yaml(config) if config else {}
    return build_config(values, flags, source=f"config {config}" if config else "flags")


def _pairs(name: str, sep: str, values: tuple[str, ...]) -> dict[str, Any] | None:
    """Repeated NAME<sep>VALUE flags as a mapping (None when none were given, so the config's stand)."""
    if not values:
        return None
    field = RunConfig.model_fields[name]
    flag = str((field.json_schema_extra or {}).get("flag"))  # type: ignore[union-attr]
    metavar = str((field.json_schema_extra or {}).get("metavar"))  # type: ignore[union-attr]
    pairs: dict[str, Any] = {}
    for v in values:
        left, found, right = v.partition(sep)
        if not found or not left.strip():
            raise UsageFailure(f"{flag} takes {metavar}, not {v!r}.")
        pairs[left.strip()] = _json_or_text(right.strip()) if name == "params" else right.strip()
    return pairs


def _json_or_text(text: str) -> Any:
    """A --param value: JSON where it parses (7, 0.5, true, ["a"]), else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    # From here on SIGTERM is an interrupt like Ctrl-C: flush, say how to resume, exit 130.
    # (Before this line only imports have run, and there is nothing to flush.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli(prog_name="pipeline")
