"""What a job will send, established before anything is sent: shared by `run`, `estimate` and the API.

Every check that can fail because of the user (settings, files, columns, the
output's place) runs here and raises UserError, so a bad job stops before the
first request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.requests.media import MediaColumns, rules_for
from pipeline.requests.media.columns import bases_for
from pipeline.requests.prompts import Renderer, RequestSpec, parse_template
from pipeline.requests.structured import Structured, load_schema
from pipeline.tables import source, storage
from pipeline.tables.sink import STDOUT, check_output

NOWHERE = "http://127.0.0.1:9/v1"  # stands in for a server that no request will reach


@dataclass(frozen=True)
class Plan:
    """The checked job: how rows become requests, the table they come from, where results go."""

    structured: Structured | None
    renderer: Renderer
    table: source.Table
    output: Path | storage.Url | None  # None for a job that writes no file (estimate, the API's DataFrame out)


def structured_for(cfg: RunConfig) -> Structured | None:
    if cfg.schema_ is None:
        return None
    layout = cfg.schema_output
    return Structured(
        schema=load_schema(cfg.schema_), layout=layout, name=cfg.schema_column if layout == "struct" else cfg.schema_prefix
    )


def renderer_for(cfg: RunConfig, structured: Structured | None = None) -> Renderer:
    model = cfg.setting("model")
    if not model:
        raise errors.ConfigError(
            f"No model given. The {cfg.provider} provider needs one: set 'model' in the config or pass --model."
        )
    spec = RequestSpec(
        model=model,
        system=cfg.system,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        params=dict(cfg.params),
        conversation=cfg.messages_column is not None,
        schema=structured.schema if structured else None,
        json_mode=cfg.setting("json_mode"),
        image_detail=cfg.image_detail,
    )
    template = parse_template(cfg.prompt) if cfg.prompt is not None else None
    return Renderer(
        spec=spec,
        template=template,
        prompt_column=cfg.prompt_column,
        id_column=cfg.id_column,
        messages_column=cfg.messages_column,
        param_columns=dict(cfg.param_columns),
        null_as_empty=cfg.null_as_empty,
        list_join=cfg.list_join,
    )


FIRST_ROWS = 20  # rows whose images are read before anything is sent: not one readable means a wrong setting


def media_for(cfg: RunConfig, table: source.Table, model: str) -> MediaColumns:
    """The job's image columns: the provider's rules, and where relative paths are read from."""
    return MediaColumns(
        columns=cfg.image_columns,
        rules=rules_for(cfg.provider, model, cfg.image_detail),
        bases=bases_for(table.files),
        inline=cfg.inline_images,
        null_as_empty=cfg.null_as_empty,
    )


def preflight(cfg: RunConfig, *, writes: bool = True, table: source.Table | None = None) -> Plan:
    """Every check of the settings, the input and (when the job `writes` a file) the output; raises UserError.

    `table` is a table already in memory (the API's DataFrame); otherwise `cfg.input` is opened.
    `pipeline estimate` and the API's DataFrame out write no file, so they need no output; `run` does."""
    if writes and cfg.output is None:
        raise errors.ConfigError(
            "'output' is required: set it in the config or pass --output (a .parquet, .csv or .jsonl file, or - for stdout)."
        )
    if table is None and not cfg.input:
        raise errors.ConfigError("'input' is required: set it in the config or pass --input.")
    structured = structured_for(cfg)
    if table is None and cfg.input_is_requests():
        return _requests_plan(cfg, structured)
    if cfg.output_format == "openai-batch":
        raise errors.ConfigError(
            "--output-format openai-batch writes answers to OpenAI batch requests: give an --input of such requests "
            "(JSONL lines with custom_id, method, url and body)."
        )
    renderer = renderer_for(cfg, structured)
    if table is None:
        table = source.open_table(
            cfg.input, encoding=cfg.encoding, separator=cfg.separator, headerless=renderer.needed_columns(),
            null_values=cfg.null_values, dtypes=cfg.dtypes,
        )  # fmt: skip
    elif cfg.null_values or cfg.dtypes:  # a table in memory (the API): the same reading of its cells
        table = source.in_memory(table.frame if table.frame is not None else source.lazy(table), cfg.null_values, cfg.dtypes)
    if cfg.image_columns:
        renderer = replace(renderer, media=media_for(cfg, table, renderer.spec.model))
    renderer.check(table.schema, table.label, hint=source.separator_hint(table))
    if renderer.media is not None:
        first = next(source.batches(table, FIRST_ROWS, min(FIRST_ROWS, cfg.limit or FIRST_ROWS)), None)
        if first is not None:
            renderer.media.check_first(first, table.label)
    output = storage.location(cfg.output) if cfg.output is not None else None
    extracted = structured.output_columns() if structured else []
    # With no file to write, only the column checks apply: they are the ones an output to stdout gets.
    check_output(output or Path(STDOUT), table.files, list(table.schema.names()), extracted, cfg.result_prefix)
    return Plan(structured=structured, renderer=renderer, table=table, output=output)


def _requests_plan(cfg: RunConfig, structured: Structured | None) -> Plan:
    """An input of OpenAI batch requests: each line's body is the request, sent as it is."""
    from pipeline.tables import interchange

    if cfg.provider not in ("openai", "local"):
        raise errors.ConfigError(
            f"{cfg.input[0]} holds OpenAI batch requests (chat completions bodies), which the {cfg.provider} provider "
            "does not speak. Use --provider openai (any OpenAI-compatible server) for this file."
        )
    if structured is not None:
        raise errors.ConfigError(
            f"{cfg.input[0]} holds whole requests, so --schema cannot be added to them: put response_format in the bodies."
        )
    if cfg.image_columns:
        raise errors.ConfigError(
            f"{cfg.input[0]} holds whole requests, so --image-column cannot add images to them: put image_url parts in "
            "the bodies' messages."
        )
    table = interchange.open_requests(cfg.input[0])
    spec = RequestSpec(
        model=cfg.setting("model") or "(each request's own)",
        system=None,
        max_tokens=None,
        temperature=None,
        top_p=None,
        verbatim=True,
    )
    renderer = Renderer(spec=spec, template=None, prompt_column=interchange.BODY, id_column=None)
    output = storage.location(cfg.output) if cfg.output is not None else None
    check_output(output or Path(STDOUT), table.files, list(table.schema.names()), [], cfg.result_prefix)
    return Plan(structured=None, renderer=renderer, table=table, output=output)
