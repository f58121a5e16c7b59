"""What a job will send, established before anything is sent: shared by `run`, `estimate` and the API.

Every check that can fail because of the user (settings, files, columns, the
output's place) runs here and raises UserError, so a bad job stops before the
first request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.models import configs as model_configs
from pipeline.requests.media import MediaColumns, rules_for
from pipeline.requests.media.columns import bases_for
from pipeline.requests.prompts import Renderer, RequestSpec, parse_template
from pipeline.requests.structured import Structured, load_schema
from pipeline.requests.tools import check_choice, forced, load_tools, names
from pipeline.tables import source, storage
from pipeline.tables.columns import Layout
from pipeline.tables.sink import STDOUT, check_output

NOWHERE = "http://127.0.0.1:9/v1"  # stands in for a server that no request will reach


@dataclass(frozen=True)
class ModelPlan:
    """One model of a run with several: its own settings (server, parameters, prices) and its requests."""

    name: str
    cfg: RunConfig
    renderer: Renderer


@dataclass(frozen=True)
class Plan:
    """The checked job: how rows become requests, the table they come from, where results go."""

    structured: Structured | None
    renderer: Renderer  # the requests of the first (or only) model
    table: source.Table
    output: Path | storage.Url | None  # None for a job that writes no file (estimate, the API's DataFrame out)
    layout: Layout = field(default_factory=Layout)  # the result columns it writes
    # With several models: each one's plan, in the order given; each input row becomes a row per model.
    models: tuple[ModelPlan, ...] = ()


def layout_for(cfg: RunConfig, structured: Structured | None) -> Layout:
    each = model_configs(cfg)
    return Layout(
        structured=structured,
        cost=any(c.price_in is not None and c.price_out is not None for c in each),
        tools=cfg.tools is not None,
        samples=cfg.samples() > 1,
        explode=cfg.explode,
        models=tuple(c.model or "" for c in each) if len(each) > 1 else (),
    )


def structured_for(cfg: RunConfig) -> Structured | None:
    """What the answers are checked against and typed by: --schema, or the forced tool's parameters (--tool-columns)."""
    layout, name = cfg.schema_output, cfg.schema_column if cfg.schema_output == "struct" else cfg.schema_prefix
    if cfg.tool_columns:
        tool = _forced_tool(cfg)
        try:
            schema = load_schema(tool["parameters"])
        except errors.ConfigError as exc:
            raise errors.ConfigError(f"--tool-columns makes the parameters of tool {tool['name']!r} columns: {exc}") from None
        return Structured(schema=schema, layout=layout, name=name, tool=tool["name"])
    if cfg.schema_ is None:
        return None
    return Structured(schema=load_schema(cfg.schema_), layout=layout, name=name)


def tools_for(cfg: RunConfig) -> tuple[dict[str, Any], ...] | None:
    """The job's tools, read and checked (and its --tool-choice against them); None without --tools."""
    if cfg.tools is None:
        return None
    found = load_tools(cfg.tools if isinstance(cfg.tools, str) else list(cfg.tools))
    check_choice(cfg.tool_choice, found)
    return found


def _forced_tool(cfg: RunConfig) -> dict[str, Any]:
    tools = tools_for(cfg)
    assert tools is not None  # the config refuses --tool-columns without --tools
    fn = forced(tools, cfg.tool_choice)
    if fn is None:
        raise errors.ConfigError(
            "--tool-columns makes one tool's arguments columns, so every answer must call that tool: force it with "
            f"--tool-choice NAME (one of {', '.join(names(tools))}), or --tool-choice required with a single tool."
        )
    return fn


def renderer_for(cfg: RunConfig, structured: Structured | None = None) -> Renderer:
    model = cfg.setting("model")
    if not model:
        raise errors.ConfigError(
            f"No model given. The {cfg.provider} provider needs one: set 'model' in the config or pass --model."
        )
    params = dict(cfg.params)
    if cfg.n is not None and cfg.n > 1:  # as --param n=N: the same request, the same key
        params["n"] = cfg.n
    spec = RequestSpec(
        model=model,
        system=cfg.system,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        params=params,
        conversation=cfg.messages_column is not None,
        schema=structured.schema if structured and structured.tool is None else None,
        json_mode=cfg.setting("json_mode"),
        image_detail=cfg.image_detail,
        tools=tools_for(cfg),
        tool_choice=cfg.tool_choice,
        tool_columns=cfg.tool_columns,
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


def media_for(cfg: RunConfig, files: Sequence[object], model: str) -> MediaColumns:
    """The job's image columns: the provider's rules, and where relative paths are read from (the folder
    of the input's `files`, then the current one)."""
    return MediaColumns(
        columns=cfg.image_columns,
        rules=rules_for(cfg.provider, model, cfg.image_detail),
        bases=bases_for(files),
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
    several = _several_refusal(cfg)
    models = tuple(ModelPlan(c.model or "", c, renderer_for(c, structured)) for c in model_configs(cfg)) if several else ()
    renderer = models[0].renderer if models else renderer_for(cfg, structured)
    if table is None:
        table = source.open_table(
            cfg.input, encoding=cfg.encoding, separator=cfg.separator, headerless=renderer.needed_columns(),
            null_values=cfg.null_values, dtypes=cfg.dtypes,
        )  # fmt: skip
    elif cfg.null_values or cfg.dtypes:  # a table in memory (the API): the same reading of its cells
        table = source.in_memory(table.frame if table.frame is not None else source.lazy(table), cfg.null_values, cfg.dtypes)
    if cfg.image_columns:
        renderer = replace(renderer, media=media_for(cfg, table.files, renderer.spec.model))
    for r in [m.renderer for m in models] or [renderer]:
        r.check(table.schema, table.label, hint=source.separator_hint(table))
    if renderer.media is not None:
        first = next(source.batches(table, FIRST_ROWS, min(FIRST_ROWS, cfg.limit or FIRST_ROWS)), None)
        if first is not None:
            renderer.media.check_first(first, table.label)
    output = storage.location(cfg.output) if cfg.output is not None else None
    layout = layout_for(cfg, structured)
    # With no file to write, only the column checks apply: they are the ones an output to stdout gets.
    check_output(
        output or Path(STDOUT), table.files, list(table.schema.names()), layout.extracted, cfg.result_prefix, layout.added
    )
    return Plan(structured=structured, renderer=renderer, table=table, output=output, layout=layout, models=models)


def _several_refusal(cfg: RunConfig) -> bool:
    """Whether the run asks several models; refuses (exit 2, before anything is sent) what cannot run them yet."""
    if len(cfg.models) < 2:
        return False
    fix = "run one model per invocation (the same command with one --model, or one models entry) and compare the outputs"
    if cfg.mode == "batch":
        raise errors.ConfigError(f"--mode batch takes one model per run, and this run asks {len(cfg.models)}: {fix}.")
    if cfg.engine == "ray":
        raise errors.ConfigError(f"--engine ray takes one model per run, and this run asks {len(cfg.models)}: {fix}.")
    if cfg.image_columns:  # each model's rules (limits, tokens) and content parts would differ per lane: not yet
        raise errors.ConfigError(f"--image-column takes one model per run, and this run asks {len(cfg.models)}: {fix}.")
    return True


def _requests_plan(cfg: RunConfig, structured: Structured | None) -> Plan:
    """An input of OpenAI batch requests: each line's body is the request, sent as it is."""
    from pipeline.tables import interchange

    if cfg.models:
        raise errors.ConfigError(
            f"{cfg.input[0]} holds whole requests, each naming its model in its body, so --model cannot be repeated "
            "for it: give one model, or a table and a prompt."
        )
    if cfg.provider not in ("openai", "local"):
        raise errors.ConfigError(
            f"{cfg.input[0]} holds OpenAI batch requests (chat completions bodies), which the {cfg.provider} provider "
            "does not speak. Use --provider openai (any OpenAI-compatible server) for this file."
        )
    if structured is not None or cfg.tools is not None or cfg.samples() > 1:
        given = "--schema" if cfg.schema_ is not None else "--tools" if cfg.tools is not None else "--n"
        raise errors.ConfigError(
            f"{cfg.input[0]} holds whole requests, so {given} cannot be added to them: put response_format, tools "
            "or n in the bodies."
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
    layout = layout_for(cfg, None)
    check_output(output or Path(STDOUT), table.files, list(table.schema.names()), [], cfg.result_prefix, layout.added)
    return Plan(structured=None, renderer=renderer, table=table, output=output, layout=layout)
