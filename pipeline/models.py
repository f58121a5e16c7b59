"""Several models in one run: the `models:` entries, checked, and each model's own settings.

An entry is a model's name, or a mapping with its name and what differs for it: its server
(`provider`, `base_url`, `api_key_env`, `headers`), its generation parameters, its prices and its
limits. An entry without a `provider` or `base_url` speaks to the run's server. One that names
another provider takes nothing of the run's server settings (the OpenAI server's URL is no
address for an Anthropic model); one that names another `base_url` keeps the provider but not
the run's `api_key_env` or `headers`: a key goes only to the server it was named for.

Each model runs under a RunConfig of its own (`configs`), validated as any run's settings are,
so a mistake in one entry is refused before anything is sent, naming the entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig

# Settings of the run's server: an entry that names another provider does not inherit them, and
# one that names another server does not inherit its credentials.
SERVER_SETTINGS = ("base_url", "api_key_env", "headers")
CREDENTIALS = ("api_key_env", "headers")


class ModelEntry(BaseModel):
    """One model of a run with several; every setting but `model` falls back to the run's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    provider: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    params: dict[str, Any] | None = None
    price_in: float | None = None
    price_out: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None
    timeout: float | None = None
    json_mode: str | None = None

    def given(self) -> dict[str, Any]:
        """The settings this entry sets itself."""
        return {k: v for k, v in self.model_dump(exclude_unset=True).items() if v is not None}


ENTRY_KEYS = tuple(ModelEntry.model_fields)


def parse_entries(value: Any, providers: tuple[str, ...]) -> tuple[ModelEntry, ...]:
    """`models:` as entries; raises ValueError naming the entry for an unknown key or provider, or a model twice."""
    if value is None:
        return ()
    if isinstance(value, str | dict):
        value = [value]
    entries: list[ModelEntry] = []
    for i, raw in enumerate(value, start=1):
        if isinstance(raw, ModelEntry):
            entries.append(raw)
            continue
        if isinstance(raw, str):
            raw = {"model": raw}
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw["model"].strip():
            raise ValueError(
                f"models entry {i} ({raw!r}) is neither a model's name nor a mapping with a 'model' key; write "
                "- gpt-4o-mini, or - {model: claude-3-5-haiku, provider: anthropic}"
            )
        name = raw["model"]
        unknown = sorted(set(raw) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(
                f"models entry {i} ({name}) has the unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"an entry takes {', '.join(ENTRY_KEYS)}"
            )
        if raw.get("provider") is not None and raw["provider"] not in providers:
            raise ValueError(
                f"models entry {i} ({name}) names the provider {raw['provider']!r}, which pipeline does not speak; "
                f"give one of {', '.join(providers)}"
            )
        try:
            entries.append(ModelEntry.model_validate(raw))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"models entry {i} ({name}): '{where}': {err['msg']} (got {err.get('input')!r})") from None
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries, start=1):
        if entry.model in seen:
            raise ValueError(
                f"models entry {i} ({entry.model}) names the same model as entry {seen[entry.model]}; each model once "
                "(its answers would be the same requests)"
            )
        seen[entry.model] = i
    return tuple(entries)


def configs(cfg: RunConfig) -> tuple[RunConfig, ...]:
    """Each model's own settings: the run's, with the entry's laid over them; `(cfg,)` for a run of one model.

    Raises ConfigError naming the entry when one model's settings do not hold together (a provider
    that cannot do what the run asks, a missing model name)."""
    if not cfg.models:
        return (cfg,)
    base = cfg.model_dump(by_alias=True, exclude_unset=True)
    base.pop("models", None)
    found = []
    for i, entry in enumerate(cfg.models, start=1):
        given = entry.given()
        values = dict(base)
        if given.get("provider") not in (None, cfg.provider):
            for name in SERVER_SETTINGS:
                values.pop(name, None)
        elif given.get("base_url") not in (None, cfg.base_url):
            for name in CREDENTIALS:
                values.pop(name, None)
        values.update(given)
        try:
            found.append(type(cfg).model_validate(values))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(
                f"Invalid models entry {i} ({entry.model}): " + (f"'{where}': {msg}." if where else f"{msg}.")
            ) from None
    if cfg.max_cost is not None and len({(c.price_in, c.price_out) for c in found}) > 1:
        raise ConfigError(
            "--max-cost with several models needs one price for all of them, and the models entries give different "
            "prices. Cap the run with --max-tokens-total instead, or run one model per invocation with its own --max-cost."
        )
    return tuple(found)


def several(cfg: RunConfig) -> bool:
    """Whether the run asks more than one model (then each output row says which, in its own column)."""
    return len(cfg.models) > 1


def entry_error(cfg: RunConfig, model_cfg: RunConfig, exc: ConfigError) -> ConfigError:
    """A model's refusal (a key not set, a header's variable), naming its entry when the run has several."""
    if not cfg.models:
        return exc
    names = [e.model for e in cfg.models]
    i = names.index(model_cfg.model) + 1 if model_cfg.model in names else 0
    return ConfigError(f"models entry {i} ({model_cfg.model}): {exc}")
