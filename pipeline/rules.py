"""Which settings go together: the checks across settings that a run refuses (exit 2) before sending, and
the worst case of one request, which the spend ceiling and `estimate` bound requests by.

Pure functions of a RunConfig, kept apart from the model itself (pipeline/config.py) so that it stays
about what each setting is; its validators call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import RunConfig

ANTHROPIC_DEFAULT_MAX_TOKENS = 1024  # as providers.anthropic.DEFAULT_MAX_TOKENS (not imported: that package is heavy)


def worst_out(cfg: RunConfig) -> int | None:
    """The most completion tokens one request may be billed, or None when nothing bounds it."""
    params = cfg.params
    given = [v for v in (cfg.max_tokens, params.get("max_tokens"), params.get("max_completion_tokens")) if isinstance(v, int)]
    if not given and cfg.provider == "anthropic":
        given = [ANTHROPIC_DEFAULT_MAX_TOKENS]
    if not given:
        return None
    return max(given) * cfg.samples()  # n choices are each billed


def answers_refusal(cfg: RunConfig) -> str | None:
    """Why --tools, --tool-choice, --tool-columns, --n and --explode cannot go together as given (exit 2), or None."""
    if cfg.tools is None and (cfg.tool_choice is not None or cfg.tool_columns):
        return f"{'--tool-choice' if cfg.tool_choice is not None else '--tool-columns'} is for --tools: give the tools too"
    if cfg.tools is not None and cfg.schema_ is not None:
        return (
            "--schema and --tools both shape the answer; give one. For typed columns from a tool's arguments, force it "
            "and add --tool-columns (--tool-choice NAME --tool-columns)"
        )
    given = cfg.params.get("n")
    if cfg.n is not None and given is not None and given != cfg.n:
        return f"--n {cfg.n} and --param n={given} disagree; give n once"
    if cfg.explode and cfg.samples() == 1:
        return "--explode makes one row per answer of --n N: give --n 2 or more, or drop --explode"
    if cfg.samples() == 1:
        return None
    if cfg.provider == "anthropic":
        return (
            "--n asks for several answers in one request, which Anthropic's Messages API does not do. For several "
            "samples, repeat each row with a column telling the copies apart and give it as --id-column (each copy is "
            "its own request), or use an OpenAI-compatible server"
        )
    if cfg.tools is not None or cfg.schema_ is not None:
        return (
            f"--n with {'--tools' if cfg.tools is not None else '--schema'} is not supported yet: only the first answer "
            "would be checked. Run without --n, or repeat each row with a column for --id-column"
        )
    return None


def ceiling_refusal(cfg: RunConfig) -> str | None:
    """Why a ceiling cannot be kept with these settings (exit 2 before anything is sent), or None."""
    flag = "--max-cost" if cfg.max_cost is not None else "--max-tokens-total" if cfg.max_tokens_total is not None else None
    if flag is None or cfg.models:  # with several models, each model's own settings are checked (models.configs)
        return None
    if cfg.max_cost is not None and (cfg.price_in is None or cfg.price_out is None):
        return (
            "--max-cost (max_cost) needs the prices to turn tokens into money: set price_in and price_out (per "
            "million tokens) in the config or pass --price-in and --price-out; for a server with no price, "
            "cap the tokens with --max-tokens-total instead"
        )
    if {"max_tokens", "max_completion_tokens"} & cfg.param_columns.keys():
        return (
            f"{flag} needs the same worst case for every request, and max_tokens is taken per row from a column "
            "(param_columns); set one max_tokens instead"
        )
    if worst_out(cfg) is None:
        return (
            f"{flag} needs a worst case for each request, and without max_tokens an answer has no bound: "
            "set max_tokens (--max-tokens N)"
        )
    return None


# The most images one request may hold (OpenAI: 500; Anthropic: 100 for models with a 200k context): see
# pipeline/requests/media/rules.py for where these are published.
MOST_IMAGE_COLUMNS = {"anthropic": 100}


def image_refusal(cfg: RunConfig, embedded: str) -> str | None:
    """Why the image settings cannot be kept (exit 2 before anything is sent), or None. `embedded`: the
    embedded model's name."""
    columns = cfg.image_columns
    if not columns:
        given = [f for f, on in (("--inline-images", cfg.inline_images), ("--image-detail", cfg.image_detail)) if on]
        if given:
            return f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for image columns: add --image-column COLUMN, or drop {' and '.join(given)}"
        return None
    if len(set(columns)) < len(columns):
        twice = next(c for c in columns if columns.count(c) > 1)
        return f"image_columns names {twice!r} twice; give each image column once"
    if cfg.provider == "local" and cfg.base_url is None:
        return (
            f"the embedded model ({embedded}) reads text only, so it cannot take the image "
            f"column{'s' if len(columns) > 1 else ''} {', '.join(repr(c) for c in columns)}. Point --base-url at a server with "
            "a vision model (llama.cpp's llama-server with its --mmproj file, vLLM with a vision model), or use a provider "
            "whose model reads images (--provider openai or anthropic with --model)"
        )
    if cfg.messages_column is not None:
        return (
            "--image-column goes with --prompt or --prompt-column; a conversation (--messages-column) carries its own "
            "images: put image_url parts in its messages' content"
        )
    if cfg.image_detail is not None and cfg.provider == "anthropic":
        return "--image-detail is OpenAI's setting; Anthropic sizes images by their pixels (drop --image-detail)"
    most = MOST_IMAGE_COLUMNS.get(cfg.provider, 500)
    if len(columns) > most:
        return f"{len(columns)} image columns, but the {cfg.provider} provider takes at most {most} images a request"
    return None
