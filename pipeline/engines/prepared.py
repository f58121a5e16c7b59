"""Rows made requests before the engine takes them, and the lanes a run with several models sends on.

`prepare` renders an input batch (prompts, per-row parameters, request keys, token estimates, image
descriptors) and looks its keys up (the checkpoint, the answer cache);
`prepare_models` does so once per model and widens the batch to a row per input row and model,
the models of one input row together, so the output keeps the input's order. Each model sends on
its own `Lane`: its provider, HTTP client, governor (its own learned limits: a 429 from one
model's server slows only that model), prices and answer cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import polars as pl

from pipeline.requests.media import MEDIA, MEDIA_BYTES, MEDIA_KIND, MEDIA_MOST, MEDIA_TOKENS
from pipeline.requests.prompts import EST_TOKENS, EXTRA, KEY, PROMPT, SKIP_REASON, Renderer
from pipeline.tables.cache import Answers
from pipeline.tables.checkpoint import Result, lookup

if TYPE_CHECKING:
    from pipeline.limits.governor import Governor
    from pipeline.limits.spend import Pricing
    from pipeline.observe.stats import RunStats
    from pipeline.providers import Provider
    from pipeline.providers.transport import Transport
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """One input batch after rendering and the checkpoint look-up (built off the event loop)."""

    frame: pl.DataFrame
    prompts: list[str | None]
    extra: list[str | None]
    skip: list[str | None]
    keys: list[str | None]
    tokens: list[int]
    cached: dict[int, Result]  # row -> result already in the checkpoint (or the answer cache)
    from_cache: frozenset[int] = frozenset()  # the rows of `cached` that the answer cache gave
    media: list[str | None] | None = None  # per row: its images' descriptor (None: a job without image columns)
    media_bytes: list[int] | None = None
    media_most: list[int] | None = None
    media_tokens: list[int] | None = None  # their tokens by the provider's rule (typical), for `estimate`
    skip_kinds: list[str | None] | None = None  # per row held back by its images: the kind counted (image_missing...)


def media_lists(rendered: pl.DataFrame) -> dict[str, Any]:
    """A rendered batch's image descriptors, sizes and tokens, as `Prepared` takes them."""
    fields = {"media": MEDIA, "media_bytes": MEDIA_BYTES, "media_most": MEDIA_MOST, "media_tokens": MEDIA_TOKENS,
              "skip_kinds": MEDIA_KIND}  # fmt: skip
    return {k: rendered.get_column(c).to_list() for k, c in fields.items()}


def prepare(frame: pl.DataFrame, renderer: Renderer, done: pl.DataFrame, cache: Answers | None = None) -> Prepared:
    """Render a batch and look its keys up: in the checkpoint, then in the answer cache, if any.

    An answer from the cache is the stored answer (text, tokens, model, finish reason) with
    `attempts` 0, `latency_ms` null and `cost_usd` 0: no request was made for it by this output, so the
    output's attempts and costs add up to the requests it paid for and its latencies are its own requests'."""
    rendered = renderer.render(frame)
    keys = rendered.get_column(KEY)
    cached: dict[int, Result] = {}
    if done.height:
        hit, rows = lookup(done, keys)
        cached = dict(zip(hit.arg_true().to_list(), map(Result.stored, rows.rows()), strict=True))
    return assemble(frame, rendered, keys.to_list(), rendered.get_column(SKIP_REASON).to_list(), cached, cache)


def assemble(
    frame: pl.DataFrame,
    rendered: pl.DataFrame,
    keys: list[str | None],
    skip: list[str | None],
    cached: dict[int, Result],
    cache: Answers | None,
) -> Prepared:
    """A rendered batch as the engine takes it: the rows answered already (`cached`, which the answer
    cache's hits join) and, for the others, what to send. The local engine's and a Ray actor's."""
    from_cache: frozenset[int] = frozenset()
    if cache is not None:
        hits = cache_hits(cache, keys, skip, cached)
        cached.update(hits)
        from_cache = frozenset(hits)
    return Prepared(
        frame=frame,
        prompts=rendered.get_column(PROMPT).to_list(),
        extra=rendered.get_column(EXTRA).to_list(),
        skip=skip,
        keys=keys,
        tokens=rendered.get_column(EST_TOKENS).to_list(),
        cached=cached,
        from_cache=from_cache,
        **(media_lists(rendered) if MEDIA in rendered.columns else {}),
    )


def cache_hits(cache: Answers, keys: list[str | None], skip: list[str | None], cached: dict[int, Result]) -> dict[int, Result]:
    """The rows the answer cache answers, of those with a request and no answer yet."""
    wanted = {row: k for row, k in enumerate(keys) if k is not None and skip[row] is None and row not in cached}
    stored = cache.get_many(list(wanted.values())) if wanted else {}
    return {
        row: Result.stored(stored[k])._replace(attempts=0, latency_ms=None, cost_usd=0.0)
        for row, k in wanted.items()
        if k in stored
    }


@dataclass(eq=False)
class Lane:
    """What one model sends with. `stats`: its own counters (None for a run of one model, whose
    counters are the run's); `name`: the model as the user gave it."""

    provider: Provider
    transport: Transport
    governor: Governor
    concurrency: int
    pricing: Pricing | None = None
    cache: Answers | None = None
    stats: RunStats | None = None
    name: str = ""
    base_bytes: dict[str | None, int] = field(default_factory=dict)  # the body around an empty prompt, by JSON form


def prepare_models(
    frame: pl.DataFrame, renderers: Sequence[Renderer], done: pl.DataFrame, caches: Sequence[Answers | None]
) -> Prepared:
    """A batch for several models: each row rendered and looked up for each model, then a row per input
    row and model (row i of model m at i * models + m), so that row % models is a row's model."""
    parts = [prepare(frame, r, done, c) for r, c in zip(renderers, caches, strict=True)]
    m, n = len(parts), frame.height

    def woven(lists: list[list[T]]) -> list[T]:
        return [x for row in zip(*lists, strict=True) for x in row]

    return Prepared(
        frame=frame[[i for i in range(n) for _ in range(m)]] if n else frame,
        prompts=woven([p.prompts for p in parts]),
        extra=woven([p.extra for p in parts]),
        skip=woven([p.skip for p in parts]),
        keys=woven([p.keys for p in parts]),
        tokens=woven([p.tokens for p in parts]),
        cached={row * m + i: r for i, p in enumerate(parts) for row, r in p.cached.items()},
        from_cache=frozenset(row * m + i for i, p in enumerate(parts) for row in p.from_cache),
    )
