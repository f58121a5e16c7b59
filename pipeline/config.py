"""The run configuration: read once from YAML and flags, validated, frozen.

A config file and command-line flags use the same names (``max_tokens`` in
YAML is ``--max-tokens`` on the command line); flags win. Everything below
the CLI receives one `RunConfig` and never looks at flags or files again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.models import ModelEntry, parse_entries
from pipeline.models import configs as model_configs
from pipeline.rules import answers_refusal, ceiling_refusal, image_refusal

Provider = Literal["openai", "modelslab", "anthropic", "local"]

# What each provider means when the user leaves a setting out. `concurrency` is the
# fixed number in flight with --no-adapt; `adaptive_concurrency` the ceiling under
# which the gate learns the server's real capacity (it starts at 1).
PROVIDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "openai": {"base_url": "https://api.openai.com/v1", "concurrency": 16, "adaptive_concurrency": 256, "timeout": 60.0},
    "modelslab": {
        "base_url": "https://modelslab.com/api/v7/llm",
        "api_key_env": "MODELSLAB_API_KEY",
        "model": "meta-llama-Llama-3.2-1B",
        # ModelsLab limits requests in flight per account: 5, 10 or 15 by plan. Learning
        # starts low and stops where its 429 names the plan's number.
        "concurrency": 5,
        "adaptive_concurrency": 15,
        "timeout": 120.0,
    },
    "anthropic": {
        "base_url": "https://api.anthropic.com",
        "api_key_env": "ANTHROPIC_API_KEY",
        "concurrency": 16,
        "adaptive_concurrency": 256,
        "timeout": 120.0,
    },
    # The embedded llama.cpp server answers one request at a time; more in
    # flight would only queue there and hit the timeout.
    # llama.cpp constrains decoding to a schema given as response_format
    # {"type": "json_object", "schema": ...}; it ignores OpenAI's json_schema form.
    "local": {
        "model": "SmolLM2-135M-Instruct",
        "concurrency": 1,
        "adaptive_concurrency": 1,
        "timeout": 300.0,
        "json_mode": "json_object",
    },
}
OPENAI_DEFAULT_BASE = PROVIDER_DEFAULTS["openai"]["base_url"]
# Providers whose batch API `--mode batch` speaks: OpenAI's files + batches (and servers that copy them),
# Anthropic's Message Batches.
BATCH_PROVIDERS = ("openai", "anthropic")
BATCH_DISCOUNT = 0.5  # what batch mode costs against online, on input and output tokens alike


def opt(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A setting: its default, the help shown by `--help`, and how it looks as a flag.

    `cli` holds what the command line needs beyond the name and type: `short`
    ("-i"), `flag` (a flag name other than --the-name), `metavar`, `text` (taken as text
    and parsed by the model, as "15m" is).
    The CLI generates its options from these, so a setting is a flag by construction.
    """
    factory = {"default_factory": dict} if default is dict else {"default": default}
    return Field(**factory, description=help, json_schema_extra=cli or None)


class RunConfig(BaseModel):
    """Every setting of one `pipeline run`. Paths are as the user wrote them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Required by `run` and `estimate` (the plan says so); the API's complete() passes its table instead.
    input: tuple[str, ...] = Field(
        default=(),
        description="Input table: CSV, Parquet or JSONL. Repeat, or give a quoted glob.",
        json_schema_extra={"short": "-i"},
    )
    output: str | None = opt(None, "Output file: .parquet, .csv or .jsonl; - writes JSON Lines to stdout.", short="-o")
    prompt: str | None = opt(
        None, "Prompt template with {column} placeholders; {column:default} for a column that may be empty.", short="-p"
    )
    prompt_column: str | None = opt(None, "Column that already holds the whole prompt (instead of --prompt).")
    messages_column: str | None = opt(None, "Column holding each row's conversation: a list of {role, content}.")
    system: str | None = opt(None, "System prompt sent with every row.")
    id_column: str | None = opt(None, "Column identifying a row; identical prompts on different ids are sent separately.")
    image_columns: tuple[str, ...] = opt(
        (),
        "Column holding an image or a PDF per row, sent with the prompt: a file's path (relative to the input's "
        "folder, else the current one), an http(s):// URL, an s3:// address, a data: URL or bytes. Repeatable.",
        flag="--image-column",
        metavar="COLUMN",
    )
    inline_images: bool = opt(
        False, "Fetch http(s) images and send their bytes, keyed by them, instead of sending the URL for the provider to fetch."
    )
    image_detail: Literal["low", "high", "auto"] | None = opt(
        None, "OpenAI's image detail: low (a flat 85 tokens an image), high or auto. Default: not sent (the model's auto)."
    )
    provider: Provider = opt("openai", "API to speak. Default: openai.")
    base_url: str | None = opt(None, "Server base URL, e.g. http://127.0.0.1:8080/v1.")
    model: str | None = opt(
        None,
        "Model name (model_id for ModelsLab). Repeat for several models in one run: one output row per row and model.",
        short="-m",
        repeatable=True,
    )
    # Several models in one run (pipeline/models.py): names, or mappings with their own server, parameters, prices.
    models: tuple[ModelEntry, ...] = Field(
        default=(),
        description="Several models in one run, each a name or a mapping with its own provider, base_url, "
        "api_key_env, parameters, prices and limits: one output row per input row and model, in a requested_model "
        "column. In a config or the Python API; on the command line, repeat --model.",
        # Its flag form is the repeated --model (names only); mappings are for a config and the API.
        json_schema_extra={"cli": False, "flag": "--model"},
    )
    api_key_env: str | None = opt(None, "Environment variable holding the API key.")
    headers: dict[str, str] = opt(
        dict,
        "An HTTP header sent with every request, 'Name: value'; $VAR in the value reads an environment "
        "variable (keys stay out of configs). Repeatable.",
        flag="--header",
        metavar="'NAME: VALUE'",
    )
    max_tokens: int | None = Field(default=256, ge=1, description="Most tokens to generate per row. Default: 256.")
    temperature: float | None = Field(default=None, ge=0, description="Sampling temperature.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling.")
    params: dict[str, Any] = opt(
        dict,
        "Another request parameter, KEY=VALUE (VALUE is read as JSON where it parses: seed=7, stop='[\"\\n\"]'). Repeatable.",
        flag="--param",
        metavar="KEY=VALUE",
    )
    param_columns: dict[str, str] = opt(
        dict,
        "A request parameter taken per row from a column, e.g. max_tokens=budget. Repeatable.",
        flag="--param-column",
        metavar="PARAM=COLUMN",
    )
    schema_: dict[str, Any] | str | None = Field(
        default=None,
        alias="schema",
        description="JSON Schema, a file or inline JSON: replies must be JSON matching it; its fields become typed columns.",
    )
    schema_output: Literal["columns", "struct"] = opt("columns", "Extracted fields as columns (default) or one struct column.")
    schema_column: str = opt("extracted", "Name of the struct column with --schema-output struct. Default: extracted.")
    schema_prefix: str = opt("", "Prefix for the extracted columns (e.g. x_), when their names clash with others.")
    json_mode: Literal["json_schema", "json_object"] | None = opt(
        None,
        "How the schema is asked for: json_schema (OpenAI's response_format) or json_object (llama.cpp, and servers "
        "that refuse json_schema; chosen by itself when a server refuses json_schema).",
    )
    # Tools, and several answers per row (pipeline/requests/tools.py, pipeline/tables/columns.py).
    tools: tuple[dict[str, Any], ...] | str | None = Field(
        default=None,
        description="OpenAI tool definitions: a JSON or YAML file, inline JSON, or a tools: list in the config. "
        "Each answer's calls go in a tool_calls column.",
        json_schema_extra={"metavar": "FILE"},
    )
    tool_choice: str | None = opt(
        None,
        "auto, none, required, or a tool's name (that tool must be called). Default: the server's (auto).",
        metavar="CHOICE",
    )
    tool_columns: bool = opt(
        False,
        "With one tool forced (--tool-choice NAME): its arguments become typed columns, as --schema's fields do "
        "(--schema-output, --schema-prefix and --schema-column apply).",
    )
    n: int | None = Field(
        default=None,
        ge=1,
        le=128,
        description="Answers per row, samples of one model (OpenAI's n): every answer in a completions list column, "
        "or one row each with --explode. Tokens and cost count once per request.",
    )
    explode: bool = opt(
        False, "With --n: one output row per answer (sample_index 0..n-1) instead of lists; rows out are rows in times n."
    )
    rpm: float | None = Field(
        default=None, gt=0, description="Most requests per minute, paced evenly; a hard cap over what the server announces."
    )
    tpm: float | None = Field(
        default=None, gt=0, description="Most tokens per minute (prompt estimate + max tokens); a hard cap."
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Most requests in flight. Default: learned up to 256 (ModelsLab 15); 16 (ModelsLab 5) with --no-adapt.",
        json_schema_extra={"short": "-c"},
    )
    max_attempts: int = Field(default=6, ge=1, le=100, description="Attempts per row, retries included. Default: 6.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds to wait for one answer.")
    # Learn the server's limits (rate-limit headers, 429s, latency); off: exactly --rpm/--tpm/--concurrency.
    adapt: bool = opt(
        True, "Do not learn limits from headers, 429s and latency: exactly --rpm, --tpm and --concurrency.", flag="--no-adapt"
    )
    # The longest single wait sat out (a Retry-After, a daily limit, an outage); longer stops the run.
    max_wait: float = Field(
        default=900.0,
        gt=0,
        description="Longest wait to sit out (a Retry-After, a daily limit, an outage): seconds or 15m, 1h. Default: 15m.",
        json_schema_extra={"metavar": "DURATION", "text": True},
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first N rows (a try-out).")
    checkpoint_dir: str | None = opt(
        None, "Checkpoint folder, local or s3://bucket/folder/. Default: next to the output (in its bucket for s3://)."
    )
    max_error_rate: float = Field(default=0.0, ge=0, le=1, description="Exit 1 if more than this share of rows fail. Default: 0.")
    # Prices in currency units per million tokens, for `pipeline estimate`.
    price_in: float | None = Field(default=None, ge=0, description="Price per million prompt tokens, for the cost in estimate.")
    price_out: float | None = Field(
        default=None, ge=0, description="Price per million completion tokens, for the cost in estimate."
    )
    # Spend, and what a run leaves behind for whoever reads it the next morning.
    max_cost: float | None = Field(
        default=None,
        gt=0,
        description="Most this run may spend, in the prices' currency (needs --price-in and --price-out): "
        "no request is sent whose worst case would pass it.",
    )
    max_tokens_total: int | None = Field(
        default=None, ge=1, description="Most tokens (in + out, worst case) this run may use, for servers with no price."
    )
    metrics: str | None = opt(None, "Metrics JSON file, local or s3://. Default: next to the output, <output>.metrics.json.")
    report: str | None = opt(None, "Run report HTML file, local or s3://. Default: next to the output, <output>.report.html.")
    make_report: bool = opt(True, "Write no HTML report.", flag="--no-report")
    # Reading the input.
    encoding: str = opt("utf-8", "Text encoding of CSV and JSONL input, e.g. cp1252, latin-1. Default: utf-8.")
    separator: str | None = opt(None, "CSV field separator, e.g. ';' or tab. Default: ',' (tab for .tsv).")
    null_as_empty: bool = opt(False, "Render null cells as empty text instead of not sending the row.")
    null_values: tuple[str, ...] = opt(
        (),
        "A cell text that means missing, e.g. N/A, - or NULL (the whole cell, exactly): such cells are null. Repeatable.",
        flag="--null-value",
        metavar="TEXT",
    )
    dtypes: dict[str, str] = opt(
        dict,
        "Read COLUMN as TYPE: str, int, float, bool, date, datetime (date:%d/%m/%Y names a format). Without it a CSV "
        "column is text unless every value reads back unchanged as a number (or true/false). Repeatable.",
        flag="--dtype",
        metavar="COLUMN=TYPE",
    )
    list_join: str | None = opt(
        None, "Render list cells joined with this text instead of as JSON (struct cells are always JSON).", metavar="TEXT"
    )
    # Writing the output.
    result_prefix: str = opt(
        "", "Prefix for the result columns (llm_ gives llm_completion, llm_status...), when the input has such columns."
    )
    csv_bom: bool = opt(False, "Start a .csv output with a UTF-8 byte-order mark, so that Excel shows accented text right.")
    batch_size: int = Field(default=5000, ge=1, description="Rows read and written per batch. Default: 5000.")
    progress: bool = opt(True, "No progress bar (nor, without a terminal, the status line each minute).", flag="--no-progress")
    fresh: bool = opt(False, "Ignore the checkpoint: send every row again.")
    # Batch mode: the provider's batch API, half the price, answers within 24 hours.
    mode: Literal["online", "batch"] = opt(
        "online",
        "online sends each row now; batch submits them to the provider's batch API (half the price, within 24 h): "
        "exit 3 while batches run, and the same command collects them. Default: online.",
    )
    wait: bool = opt(False, "Batch mode: wait here until every batch has finished, instead of exiting 3.")
    batch_max_requests: int = Field(
        default=50_000, ge=1, le=50_000, description="Batch mode: most requests per batch (OpenAI's limit: 50,000)."
    )
    fallback: Literal["none", "online"] = opt(
        "none", "Batch mode: send lines that failed in a batch (expired, 5xx) online instead of in a new batch."
    )
    output_format: Literal["auto", "openai-batch"] = opt(
        "auto",
        "auto follows the output's extension; openai-batch writes OpenAI batch-output lines (the default for a "
        ".jsonl output when the input is a file of OpenAI batch requests).",
    )
    # Where the engine runs: this process, or a pool of Ray actors sharing one rate budget (the ray extra).
    engine: Literal["local", "ray"] = opt(
        "local",
        "local runs the engine in this process; ray runs one engine per Ray actor with one shared rate budget "
        "(needs Ray: pip install -e '.[ray]' in the checkout, or make setup). Default: local.",
    )
    ray_address: str | None = opt(
        None,
        "With --engine ray: the cluster to join (auto, ray://host:10001); default: a Ray started here for this run.",
        metavar="ADDRESS",
    )
    workers: int | None = Field(
        default=None, ge=1, le=1024, description="With --engine ray: engine actors (default: the cluster's CPUs, at most 8)."
    )
    verbose: bool = opt(False, "Show the engine's own log lines (Ray's workers and warnings); also PIPELINE_VERBOSE=1.")
    # Answers shared across outputs, jobs and calls; off unless asked for (sampling users may want fresh ones).
    cache_dir: str | None = opt(
        None,
        "Answer cache folder shared by jobs and outputs: a request answered before (same server, same request) "
        "is not sent again. Default: none.",
        flag="--cache",
        metavar="DIR",
    )
    cache_max_mb: float = Field(
        default=1024, gt=0, description="Most answers the cache keeps, in MB; the least recently used go first. Default: 1024."
    )

    @model_validator(mode="before")
    @classmethod
    def _model_list(cls, data: Any) -> Any:
        """`model: [a, b]` (a repeated --model, the API's model=[...]) means `models: [a, b]`; a list of one, `model: a`."""
        if isinstance(data, dict) and isinstance(data.get("model"), list | tuple):
            names, data = list(data["model"]), dict(data)
            if data.get("models"):
                raise ValueError("give the models once: a list in 'model' or in 'models', not both")
            data["model"] = names[0] if len(names) == 1 else None
            if len(names) > 1:
                data["models"] = names
        return data

    @field_validator("models", mode="before")
    @classmethod
    def _model_entries(cls, value: Any) -> Any:
        return parse_entries(value, tuple(PROVIDER_DEFAULTS))

    @model_validator(mode="after")
    def _each_model_holds(self) -> RunConfig:
        if self.models:
            if self.model is not None:
                raise ValueError(f"give 'model' ({self.model}) or 'models', not both: put it in the models list")
            model_configs(self)  # each model's settings, validated as a run's
        return self

    @field_validator("input", "null_values", "image_columns", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("max_wait", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            from pipeline.providers.ratelimit import parse_duration  # here: the providers package is heavy to import

            seconds = parse_duration(value.strip())
            if seconds is None:
                raise ValueError(f"{value!r} is not a duration: give seconds (900) or a unit (15m, 1h, 90s)")
            return seconds
        return value

    @field_validator("schema_", mode="before")
    @classmethod
    def _inline_schema(cls, value: Any) -> Any:
        """A schema given as JSON text on the command line (--schema '{"type": "object", ...}')."""
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"the inline schema is not valid JSON ({exc}); give JSON text or a .json file") from None
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _inline_tools(cls, value: Any) -> Any:
        """Tools given as JSON text on the command line, or as {tools: [...]} (a file's top level, pasted)."""
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"the inline tools are not valid JSON ({exc}); give JSON text or a file") from None
        if isinstance(value, dict):
            value = value.get("tools", [value])
        return value

    @model_validator(mode="after")
    def _tools_and_samples(self) -> RunConfig:
        if (why := answers_refusal(self)) is not None:
            raise ValueError(why)
        return self

    def samples(self) -> int:
        """Answers asked per request: --n, or an n given with --param."""
        n = self.n if self.n is not None else self.params.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1

    @field_validator("api_key_env")
    @classmethod
    def _names_a_variable(cls, value: str | None) -> str | None:
        # The value itself is never echoed: given by mistake, it is the key.
        looks_like_key = (
            value is not None and len(value) >= 32 and any(ch.isdigit() for ch in value) and any(ch.islower() for ch in value)
        )  # a name of 32+ characters mixing lower case and digits: a key that happens to have no dash
        if value is not None and (not _ENV_NAME.fullmatch(value) or looks_like_key):
            raise ValueError(
                "api_key_env takes the name of an environment variable (letters, digits and _, e.g. MY_API_KEY), and "
                "the value given is not one; if it is the key itself, it is not shown here. Put the key in a variable "
                "(export MY_API_KEY=...) and give its name: --api-key-env MY_API_KEY"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _url_has_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not a URL: start it with http:// or https://, e.g. http://{value}")
        return value

    @field_validator("params", "param_columns")
    @classmethod
    def _params_not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"messages", "model", "model_id", "key", "stream", "system", "response_format", "tools", "tool_choice"}
        clash = sorted(reserved & value.keys())
        if clash:
            raise ValueError(f"params may not set {', '.join(clash)}: the pipeline builds these itself")
        return value

    @model_validator(mode="after")
    def _prompt_source(self) -> RunConfig:
        given = [k for k in ("prompt", "prompt_column", "messages_column") if getattr(self, k) is not None]
        if len(given) > 1 or (not given and not self.input_is_requests()):
            raise ValueError(
                "give exactly one of 'prompt' (a template such as 'Summarise: {text}'), "
                "'prompt_column' (a column that already holds the prompt) or 'messages_column' "
                "(a column holding each row's conversation as a list of {role, content})"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self

    @model_validator(mode="after")
    def _images_have_a_way_in(self) -> RunConfig:
        if (why := image_refusal(self, PROVIDER_DEFAULTS["local"]["model"])) is not None:
            raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _bom_is_for_csv(self) -> RunConfig:
        if self.csv_bom and self.output is not None and not self.output.lower().endswith(".csv"):
            raise ValueError(f"--csv-bom (csv_bom) is for a .csv output, and the output is {self.output}; drop it")
        return self

    @model_validator(mode="after")
    def _batch_needs_a_batch_api(self) -> RunConfig:
        if self.mode == "batch" and (self.max_cost is not None or self.max_tokens_total is not None):
            raise ValueError(
                "--max-cost and --max-tokens-total bound online runs; batch mode does not apply them yet. Price the job "
                "with `pipeline estimate --mode batch`, or run online with the ceiling"
            )
        if self.mode == "batch" and self.provider not in BATCH_PROVIDERS:
            raise ValueError(
                f"--mode batch needs a provider with a batch API ({', '.join(BATCH_PROVIDERS)}); the {self.provider} "
                "provider has none. Run without --mode batch (online)"
            )
        return self

    @model_validator(mode="after")
    def _ray_options_need_ray(self) -> RunConfig:
        if self.engine != "ray" and (self.ray_address is not None or self.workers is not None):
            raise ValueError("--ray-address and --workers are for --engine ray; add --engine ray, or drop them")
        return self

    @model_validator(mode="after")
    def _ceiling_has_worst_case(self) -> RunConfig:
        if (why := ceiling_refusal(self)) is not None:
            raise ValueError(why)
        return self

    def input_is_requests(self) -> bool:
        """The input is a file of OpenAI batch requests: its bodies are the requests, no prompt is given."""
        return bool(self.input) and is_batch_requests(self.input)

    def setting(self, name: str) -> Any:
        """A setting, falling back to the provider's default where the user gave none."""
        value = getattr(self, name)
        if value is None and name == "concurrency" and self.adapt:
            return PROVIDER_DEFAULTS[self.provider]["adaptive_concurrency"]
        if value is None:
            return PROVIDER_DEFAULTS[self.provider].get(name, "json_schema" if name == "json_mode" else None)
        return value

    @field_validator("checkpoint_dir", "metrics", "report", "cache_dir")
    @classmethod
    def _a_place_we_can_write(cls, value: str | None, info: Any) -> str | None:
        """`s3://` means object storage; any other scheme is refused, never made a local folder named `gs:`."""
        if value is None:
            return value
        scheme = _SCHEME.match(value)
        if scheme is None or (scheme[1].lower() == "s3" and info.field_name != "cache_dir"):
            return value
        if info.field_name == "cache_dir":
            raise ValueError(
                f"{value!r}: the answer cache is a local folder (one SQLite file that jobs share); give a local path"
            )
        raise ValueError(
            f"{value!r}: {scheme[1]}:// is not a place pipeline can write; give a local path or an s3://bucket/... address"
        )

    @property
    def checkpoint_remote(self) -> Any:
        """Where the checkpoint lives in object storage (a `storage.Url` of its folder), or None for a local
        one: `--checkpoint-dir s3://...`, or, by default, beside an `s3://` output in the same bucket."""
        from pipeline.tables import storage

        if self.checkpoint_dir:
            return storage.prefix(self.checkpoint_dir) if storage.is_remote(self.checkpoint_dir) else None
        if self.output is not None and storage.is_remote(self.output):
            url = storage.Url.parse(self.output)
            return url.with_name(url.stem + ".checkpoint")
        return None

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint's local folder: itself, or the working copy of one in object storage."""
        if (remote := self.checkpoint_remote) is not None:
            from pipeline.tables.statedir import objects_dir

            return objects_dir().joinpath(remote.bucket, *remote.key.split("/"))
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        if self.output is None:
            raise ValueError("no output, so no checkpoint: give --output or --checkpoint-dir")
        if self.output == "-":
            # Stdout has no folder to sit beside: the current one, named after the input, so the
            # same command run again from the same place resumes. A glob's wildcards make no name.
            stem = re.sub(r"[*?\[\]]+", "_", Path(self.input[0]).stem).strip("_") or "input"
            return Path(f"{stem}.stdout.checkpoint")
        out = Path(self.output)
        return out.with_name(out.stem + ".checkpoint")

    def key_env(self) -> str | None:
        """The environment variable that holds the key, if this run needs one."""
        if self.api_key_env:
            return self.api_key_env
        if any(name.strip().lower() in CREDENTIAL_HEADERS for name in self.headers):
            return None  # the user's own header carries the credential (Azure's api-key, a gateway's token)
        if self.provider == "openai":
            # Never send OPENAI_API_KEY to a server the user did not name it for.
            base = self.base_url or OPENAI_DEFAULT_BASE
            return "OPENAI_API_KEY" if base.rstrip("/") == OPENAI_DEFAULT_BASE else None
        return PROVIDER_DEFAULTS[self.provider].get("api_key_env")

    def api_key(self) -> str | None:
        """Read the key from the environment; refuse early when it is missing."""
        env = self.key_env()
        if env is None:
            return None
        return from_env(env, f"The {self.provider} provider needs an API key in", "or name another variable with --api-key-env.")

    def request_headers(self) -> tuple[dict[str, str], tuple[str, ...]]:
        """The headers to send, $VAR and ${VAR} read from the environment ($$ is a dollar sign), and the
        values to mask in replies: every value read from the environment, and the credential in an
        Authorization, api-key or x-api-key header. Refused here, before anything is sent: a variable
        unset or empty, a header the pipeline sets itself, a name or value HTTP cannot carry."""
        resolved: dict[str, str] = {}
        secrets: list[str] = []
        for raw_name, raw_value in self.headers.items():
            name = raw_name.strip()
            if not _HEADER_NAME.fullmatch(name):
                raise ConfigError(f"{name!r} is not an HTTP header name: use letters, digits and -, e.g. api-key.")
            if name.lower() in _OWN_HEADERS:
                raise ConfigError(
                    f"The header {name} is set by the pipeline itself ({_OWN_HEADERS[name.lower()]}); "
                    "remove it from headers/--header."
                )
            if any(name.lower() == seen.lower() for seen in resolved):
                raise ConfigError(f"The header {name} is given twice (header names ignore case); give it once.")
            read: dict[str, str] = {}  # variable -> its value

            def substitute(m: re.Match[str], header: str = name, read: dict[str, str] = read) -> str:
                if m[0] == "$$":
                    return "$"
                var = m[1] or m[2]
                value = from_env(var, f"The header {header} reads")
                read[var] = value
                return value

            value = _ENV_REF.sub(substitute, raw_value.strip())
            if any(c in value for c in "\r\n\0"):
                origin = f" (read from {', '.join(read)})" if read else ""
                raise ConfigError(f"The value of the header {name}{origin} holds a line break; a header value is one line.")
            resolved[name] = value
            secrets.extend(read.values())
            if name.lower() in CREDENTIAL_HEADERS and value:
                secrets.extend((value, value.split()[-1]))  # "Bearer sk-..." may be echoed whole or as the key alone
        return resolved, tuple(dict.fromkeys(secrets))


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_ENV_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+)|\$)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
# Set by the pipeline or the HTTP client: another value would break every request.
_OWN_HEADERS = {
    "content-type": "its bodies are always JSON",
    "content-length": "the HTTP client counts the body",
    "transfer-encoding": "the HTTP client frames the body",
    "host": "it comes from --base-url",
}


def from_env(var: str, who: str, alternative: str = "") -> str:
    """A secret from the environment, or an error that says whether it is unset or empty and how to set it."""
    value = os.environ.get(var, "").strip()
    if not value:
        state = "is set but empty" if var in os.environ else "is not set"
        raise ConfigError(
            f"{who} the environment variable {var}, which {state}. Set it (export {var}=...) and run again"
            + (f", {alternative}" if alternative else ".")
        )
    return value


# Header names (lower case) that carry a credential: a user header by one of these names means a key is sent.
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "api-key", "x-api-key")

# The input formats (source.FORMATS), here so a misplaced table is caught without importing polars.
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson")
FIELDS = tuple(f.alias or name for name, f in RunConfig.model_fields.items())


def is_batch_requests(patterns: tuple[str, ...]) -> bool:
    """Whether the input is one JSONL (local or s3://) whose first line is an OpenAI batch request."""
    if len(patterns) != 1 or not patterns[0].lower().endswith((".jsonl", ".ndjson")):
        return False
    if patterns[0].startswith("s3://"):
        from pipeline.tables import storage  # pyarrow's S3: only for an object input

        raw = storage.first_line(storage.Url.parse(patterns[0]))
        return raw is not None and _is_request_line(raw)
    path = Path(patterns[0])
    if not path.is_file():
        return False
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return _is_request_line(raw)
    return False


def _is_request_line(raw: bytes) -> bool:
    try:
        first = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(first, dict) and "custom_id" in first and isinstance(first.get("body"), dict)
