"""A batch of input rows made ready for the engine, off the event loop: rendered (prompts, per-row
parameters, request keys, token estimates, image descriptors) and looked up in the checkpoint and
the answer cache, so that only rows still to answer reach a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from pipeline.requests.media import MEDIA, MEDIA_BYTES, MEDIA_KIND, MEDIA_MOST, MEDIA_TOKENS
from pipeline.requests.prompts import EST_TOKENS, EXTRA, KEY, PROMPT, SKIP_REASON, Renderer
from pipeline.tables.cache import Answers
from pipeline.tables.checkpoint import Result, lookup


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
    key_list, skip = keys.to_list(), rendered.get_column(SKIP_REASON).to_list()
    from_cache: frozenset[int] = frozenset()
    if cache is not None:
        answered = cache_hits(cache, key_list, skip, cached)
        cached.update(answered)
        from_cache = frozenset(answered)
    return Prepared(
        frame=frame,
        prompts=rendered.get_column(PROMPT).to_list(),
        extra=rendered.get_column(EXTRA).to_list(),
        skip=skip,
        keys=key_list,
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
