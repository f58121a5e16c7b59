"""The spend ceiling: what a run may still send, in money or tokens. Pure arithmetic, no I/O.

Before a request goes out its worst case is reserved: an upper bound on its prompt
tokens plus its `max_tokens`. When the answer comes back the reservation is settled
to what the server billed (its `usage`), or released when nothing was billed (a 5xx
or 429 carries no usage). The invariant `spent + reserved <= limit` holds at every
step, so the ceiling is never passed as long as the bound is one.

The prompt bound is one token a byte of the request body: a byte-level BPE token
(OpenAI, Anthropic, Llama 3, Qwen...) covers at least one byte of text, and the JSON
around each message outweighs the few tokens a chat template adds. It is 3-4 times
what a prompt really costs, which only matters for the last requests before the
ceiling: each reservation is settled to the real count as soon as it comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from pipeline.config import BATCH_DISCOUNT
from pipeline.models import configs
from pipeline.rules import worst_out

if TYPE_CHECKING:
    import polars as pl

    from pipeline.config import RunConfig
    from pipeline.observe.stats import RunStats

NOT_SENT = "not sent: spend ceiling reached"
BOUND_LABEL = "1 token a byte of the request, a bound for byte-level tokenizers"


class Verdict(Enum):
    FITS = "fits"
    WAIT = "wait"  # fits once requests in flight settle: their reservations are worst cases
    REFUSE = "refuse"  # would pass the ceiling even if nothing in flight is billed


@dataclass(frozen=True)
class Ceiling:
    limit: float
    per_in: float  # what one prompt token counts against `limit`
    per_out: float
    flag: str  # as the user wrote it: --max-cost, --max-tokens-total

    def of(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in * self.per_in + tokens_out * self.per_out

    def show(self, amount: float) -> str:
        return money(amount) if self.flag == "--max-cost" else f"{amount:,.0f} tokens"


class Budget:
    """Reservations and settled spend of one run against one or two ceilings; O(1) a request."""

    def __init__(self, ceilings: tuple[Ceiling, ...], *, max_out: int) -> None:
        self.ceilings = ceilings
        self.max_out = max_out
        self.spent_in = self.spent_out = 0
        self.reserved_in = self.reserved_out = 0
        self.reached = False
        self.overrun = False  # an answer billed more than its reservation: the bound did not hold

    def worst(self, request_bytes: int) -> tuple[int, int]:
        """The most one request of `request_bytes` (its prompt and the body around it) may cost,
        in (prompt, completion) tokens."""
        return request_bytes, self.max_out

    def check(self, tokens_in: int, tokens_out: int) -> Verdict:
        if self.reached:
            return Verdict.REFUSE
        verdict = Verdict.FITS
        for c in self.ceilings:
            # Spent only grows, so a request that does not fit now never will: refuse at once.
            if c.of(self.spent_in + tokens_in, self.spent_out + tokens_out) > c.limit:
                self.reached = True
                return Verdict.REFUSE
            if c.of(self.spent_in + self.reserved_in + tokens_in, self.spent_out + self.reserved_out + tokens_out) > c.limit:
                verdict = Verdict.WAIT
        return verdict

    def reserve(self, held: tuple[int, int]) -> None:
        self.reserved_in += held[0]
        self.reserved_out += held[1]

    def settle(self, held: tuple[int, int], tokens_in: int, tokens_out: int) -> None:
        """Replace a reservation by what was billed: (0, 0) when nothing was."""
        self.reserved_in -= held[0]
        self.reserved_out -= held[1]
        self.spent_in += tokens_in
        self.spent_out += tokens_out
        if tokens_in > held[0] or tokens_out > held[1]:
            self.overrun = True


def ceilings(cfg: RunConfig) -> tuple[Ceiling, ...]:
    found = []
    if cfg.max_cost is not None and (paid := prices(cfg)) is not None:
        found.append(Ceiling(cfg.max_cost, paid[0] / 1e6, paid[1] / 1e6, "--max-cost"))
    if cfg.max_tokens_total is not None:
        found.append(Ceiling(float(cfg.max_tokens_total), 1.0, 1.0, "--max-tokens-total"))
    return tuple(found)


def budget_for(cfg: RunConfig) -> Budget | None:
    """The run's budget, or None when no ceiling is set (then nothing is reserved: no cost per request)."""
    found = ceilings(cfg)
    out = worst_out(cfg)
    if not found or out is None:  # a ceiling without a worst case was refused by the config already
        return None
    return Budget(found, max_out=out)


def prices(cfg: RunConfig) -> tuple[float, float] | None:
    """Price per million tokens in and out as this run pays them: batch mode at the batch discount."""
    if cfg.price_in is None or cfg.price_out is None:
        return None
    factor = BATCH_DISCOUNT if cfg.mode == "batch" else 1.0
    return cfg.price_in * factor, cfg.price_out * factor


@dataclass(frozen=True)
class Pricing:
    """What a request costs, at prices per million tokens: the engines price each row's requests with it."""

    per_million_in: float
    per_million_out: float

    def of(self, tokens_in: int, tokens_out: int) -> float:
        # Divided last: 8 tokens at $1 and 20 at $2 are $0.000048, not 0.000047999999999999994.
        return (tokens_in * self.per_million_in + tokens_out * self.per_million_out) / 1e6


def pricing_for(cfg: RunConfig, *, batch: bool) -> Pricing | None:
    """The prices of a request sent online (`batch` False: also batch mode's online fallback) or in a
    batch (at the batch discount); None when the prices are not set."""
    if cfg.price_in is None or cfg.price_out is None:
        return None
    factor = BATCH_DISCOUNT if batch else 1.0
    return Pricing(cfg.price_in * factor, cfg.price_out * factor)


def cost(cfg: RunConfig, tokens_in: int, tokens_out: int) -> float | None:
    paid = prices(cfg)
    if paid is None:
        return None
    return tokens_in * paid[0] / 1e6 + tokens_out * paid[1] / 1e6


def answered_tokens(done: pl.DataFrame) -> tuple[int, int]:
    """Prompt and completion tokens of the answers a checkpoint holds (ok rows, one per request):
    what was paid for this output by earlier runs, as far as the answers tell."""
    if done.height == 0:
        return 0, 0
    pt, ct = done.select("prompt_tokens", "completion_tokens").sum().row(0)
    return int(pt or 0), int(ct or 0)


def answered_cost(cfg: RunConfig, done: pl.DataFrame) -> float | None:
    """What the answers a checkpoint holds cost when they were bought: each one's `cost_usd` (0 for an
    answer the answer cache gave), or, for one kept by a run without prices, its tokens at this run's."""
    paid = pricing_for(cfg, batch=cfg.mode == "batch")
    if paid is None and not priced(cfg):
        return None
    if done.height == 0:
        return 0.0
    import polars as pl  # here: the spend module is imported by config-level code that needs no polars

    if paid is None:  # several models, each at its own prices: the answers carry what they cost
        return float(done.select(pl.col("cost_usd").fill_null(0.0).sum()).item() or 0.0)

    tokens_in, tokens_out = pl.col("prompt_tokens").fill_null(0), pl.col("completion_tokens").fill_null(0)
    at_price = (tokens_in * paid.per_million_in + tokens_out * paid.per_million_out) / 1e6
    return float(done.select(pl.coalesce(pl.col("cost_usd"), at_price).sum()).item() or 0.0)


def priced(cfg: RunConfig) -> bool:
    """Whether the run has prices: its own, or (with several models) those of one of its models."""
    return any(prices(c) is not None for c in configs(cfg))


def note_run(stats: RunStats, cfg: RunConfig, done: pl.DataFrame) -> None:
    """Fill the spend figures of `stats` the summary and the metrics read, once the run is over. This run's
    spend is what its requests were billed (`spent_tokens_*`, `spent_usd`: every attempt, as the engines
    count it, the answers' usage and an answer's that failed its checks; under a ceiling also the worst case
    of an attempt that may have been billed without saying), which the rows' `cost_usd` add up to."""
    stats.spent_cost = stats.spent_usd if priced(cfg) else None
    stats.earlier_tokens_in, stats.earlier_tokens_out = answered_tokens(done)
    stats.earlier_cost = answered_cost(cfg, done)


def money(x: float) -> str:
    """Dollars and cents from $1, four decimals from a cent, and below that two significant
    digits ($0.000032, $0.0005), so a small test run never reads $0.0000."""
    if x >= 1:
        return f"${x:,.2f}"
    if x >= 0.01 or x <= 0:
        return f"${x:.4f}"
    return f"${x:.{1 - math.floor(math.log10(x))}f}".rstrip("0")


def summary_line(stats: RunStats) -> str | None:
    """One line for the run's summary: what this run spent, against its ceiling, and on this output in all runs."""
    s = stats
    if s.spent_cost is None and s.ceiling_what is None:
        return None
    if s.spent_cost is not None:
        this, total = money(s.spent_cost), money(s.spent_cost + (s.earlier_cost or 0.0))
    else:
        this = f"{s.spent_tokens_in + s.spent_tokens_out:,} tokens"
        total = f"{s.spent_tokens_in + s.spent_tokens_out + s.earlier_tokens_in + s.earlier_tokens_out:,} tokens"
    ceiling = f" (ceiling {s.ceiling_what}{', reached' if s.ceiling_reached else ''})" if s.ceiling_what else ""
    return f"  spend: {this} this run{ceiling}, {total} on this output in all runs"


def stop_message(stats: RunStats, cfg: RunConfig, checkpoint: str) -> str:
    """What the user reads when the ceiling stopped the run: what was spent, and how to go on."""
    s = stats
    not_sent = s.error_kinds.get("spend_ceiling", 0)
    spent = money(s.spent_cost) if s.spent_cost is not None else f"{s.spent_tokens_in + s.spent_tokens_out:,} tokens"
    flag = "--max-cost" if cfg.max_cost is not None else "--max-tokens-total"
    return (
        f"pipeline: stopped at the spend ceiling: this run spent {spent} ({s.spent_tokens_in:,} tokens in, "
        f"{s.spent_tokens_out:,} out) of {s.ceiling_what}; no request was sent whose worst case would pass it. "
        f"{not_sent:,} row{'s were' if not_sent != 1 else ' was'} not sent (status error, '{NOT_SENT}'); every answer "
        f"is kept in {checkpoint}. To go on, raise {flag} and run the same command again: rows already "
        "answered are not sent again, so nothing answered is paid twice: exit 5 (spend_ceiling)."
    )


def describe_ceiling(budget: Budget) -> str:
    return " and ".join(f"{c.flag} {c.show(c.limit)}" for c in budget.ceilings)


def fit_line(
    cfg: RunConfig, typical: tuple[int, int], bound: tuple[int, int] | None, bound_exact: bool, *, requests: int = 0
) -> str | None:
    """Whether a job of `typical` (about) and `bound` (at most) (prompt, completion) tokens fits under the ceilings;
    with `requests`, how many of them fit at the typical cost when the job does not."""
    found = ceilings(cfg)
    if not found:
        return None
    parts = []
    for c in found:
        about = c.of(*typical)
        if bound is None:
            parts.append(f"{c.flag} {c.show(c.limit)}: cannot tell, the output has no bound (no max_tokens)")
        elif (most := c.of(*bound)) <= c.limit:
            parts.append(f"fits under {c.flag} {c.show(c.limit)} (at most {c.show(most)})")
        elif about <= c.limit:
            parts.append(
                f"may not fit under {c.flag} {c.show(c.limit)}: about {c.show(about)}, at most {c.show(most)}"
                f"{'' if bound_exact else ' by the byte bound'}; if it is reached the run stops and marks the rest "
                f"'{NOT_SENT}'"
            )
        else:
            share = (
                f" (about {int(c.limit / (about / requests)):,} of {requests:,} requests at the typical cost)" if requests else ""
            )
            parts.append(
                f"does not fit under {c.flag} {c.show(c.limit)}: about {c.show(about)}{share}; the run will stop at the "
                f"ceiling and mark the rest '{NOT_SENT}' (raise it to {c.show(most)} to be sure it does not)"
            )
    return "  ceiling: " + "; ".join(parts)
