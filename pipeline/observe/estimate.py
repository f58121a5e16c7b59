"""`pipeline estimate`: price a job before it starts, without one generation request.

One streaming pass over the table (the same rendering, request keys and
checkpoint look-up as `pipeline run`) gathers the counts. Prompt tokens get two
figures. The typical one comes from the provider's count endpoint where it has
one (every request when there are few, else a uniform sample scaled up by
bytes), else is calibrated from the answers the checkpoint holds for rows of
this table (their rendered bytes are known here and their billed
`prompt_tokens` are in the checkpoint), else from the 4-bytes rule; no offline
tokenizer is shipped. The upper bound is an exact count where there is one,
else the byte bound the run's spend ceiling reserves by (spend.py): one token a
byte of the request, so what `estimate` calls "at most" and what a run may
spend agree. The checkpoint is only read: no lock, no compaction, so a running
job is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import orjson
import polars as pl

from pipeline import errors
from pipeline.config import BATCH_DISCOUNT, RunConfig
from pipeline.engines.prepared import Prepared, prepare
from pipeline.limits import spend
from pipeline.models import configs as model_configs
from pipeline.observe import estimate_media
from pipeline.observe.estimate_media import MediaTotals
from pipeline.plan import NOWHERE, preflight
from pipeline.providers import MIN_SECRET, Provider, make_provider
from pipeline.providers.anthropic import AnthropicMessages
from pipeline.providers.base import decode, endpoint, http_error
from pipeline.providers.openai import chat_messages
from pipeline.providers.transport import AiohttpTransport
from pipeline.requests.prompts import Renderer
from pipeline.rules import worst_out
from pipeline.tables import source
from pipeline.tables.checkpoint import STORED_SCHEMA, read_done

COUNTING_PROVIDERS = ("anthropic", "modelslab")  # both serve /v1/messages/count_tokens
COUNT_CONCURRENCY, COUNT_TIMEOUT = 4, 30.0
DEFAULT_LATENCY = 1.0  # seconds a request, until a run has measured one
ESTIMATED = "estimate: about 4 bytes a token"
EXACT = "exact, from the provider's count endpoint"
BOUND = "1 token a byte of the request"  # spend.BOUND_LABEL, said briefly
COUNT_FIELDS = ("model", "system", "messages", "tools", "tool_choice")  # what count_tokens accepts
SAMPLE_CHARS = 400  # characters of each text in a sample request shown, without --full


@dataclass(frozen=True)
class Seen:
    """Answers in the checkpoint for rows of this table: what their requests weighed and what was billed."""

    answers: int = 0
    bytes: int = 0  # payload + system, as Scan.request_bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def per_byte(self) -> float:
        return self.prompt_tokens / self.bytes if self.bytes else 0.0


@dataclass(frozen=True)
class Scan:
    """What one pass over the table found. Payloads are (payload, per-row params) as the provider adapters take them."""

    rows: int
    not_sendable: int
    skipped: int
    requests: int
    request_bytes: int  # payload + system, summed over the requests to send
    rule_tokens: int  # the 4-bytes rule, summed the same way
    charged_tokens: int  # what the --tpm limiter will charge for them
    samples: tuple[tuple[str, str | None, str | None], ...]  # the first requests to send (and their images), in input order
    count_sample: tuple[tuple[str, int], ...]  # (payload, bytes) of up to count_limit requests, uniformly chosen
    payload_bytes: int = 0  # the payloads alone, summed over the requests to send: the run's byte bound adds the body
    seen: Seen = Seen()
    media: MediaTotals = field(default_factory=MediaTotals)  # the requests' images and PDFs, their tokens by the rule


@dataclass(frozen=True)
class Estimate:
    rows: int
    not_sendable: int
    skipped: int
    requests: int
    tokens_in: int  # typical (exact where counted)
    tokens_in_method: str
    max_tokens: int | None
    tokens_out: int | None  # None: no max_tokens, so no worst case
    cost_in: float | None  # None: no price in the config; the typical prompt's cost
    cost_out: float | None  # the worst-case output's
    seconds: float
    rate: float  # requests a second
    pace: str  # which limit sets the rate, and why
    samples: tuple[str, ...] = ()  # pretty request bodies, keys masked
    tokens_in_most: int | None = None  # an upper bound on the prompt tokens (None: as tokens_in, which is exact)
    tokens_in_exact: bool = False
    tokens_out_typical: int | None = None  # from the answers in the checkpoint, else the worst case
    tokens_out_method: str = ""
    cost_typical: float | None = None
    cost_most: float | None = None
    images: str | None = None  # the report's line about the requests' images, when they carry any

    @property
    def most_in(self) -> int:
        return self.tokens_in if self.tokens_in_most is None else self.tokens_in_most


def measured_latency(done: pl.DataFrame) -> tuple[float, str]:
    """Seconds a request: the median of answers already received, else a stated assumption."""
    measured = done.get_column("latency_ms").drop_nulls()
    if measured.len() == 0:
        return DEFAULT_LATENCY, "no latency measured yet"
    median_ms = max(1.0, float(statistics.median(measured.to_list())))  # never divide by a zero latency
    return median_ms / 1000, f"median of {measured.len():,} answers in the checkpoint"


def _batch_requests(p: Prepared, system_bytes: int) -> pl.DataFrame:
    """One row per row of the batch: its key, payload, whether it can be sent and whether it is answered already."""
    media = estimate_media.per_request(p.media, p.media_tokens, p.media_most, len(p.keys))
    return (
        pl.DataFrame(
            {"key": p.keys, "payload": p.prompts, "extra": p.extra, "skip": p.skip, "charge": p.tokens, "media": p.media},
            schema={
                "key": pl.String,
                "payload": pl.String,
                "extra": pl.String,
                "skip": pl.String,
                "charge": pl.Int64,
                "media": pl.String,
            },
        )
        .hstack(media)
        .with_columns(
            sendable=pl.col("skip").is_null() & pl.col("key").is_not_null(),
            cached=pl.int_range(pl.len()).is_in(pl.Series(list(p.cached), dtype=pl.Int64).implode()),
            # 60 bits of the (uniform) key hash: an 8-byte stand-in for the key when de-duplicating,
            # and the smallest ids make a uniform, repeatable sample for the count endpoint.
            id=pl.col("key").str.slice(0, 15).str.to_integer(base=16),
            bytes=pl.col("payload").str.len_bytes().cast(pl.Int64) + system_bytes,
            payload_bytes=pl.col("payload").str.len_bytes().cast(pl.Int64),
        )
    )


def _answered(p: Prepared, df: pl.DataFrame) -> pl.DataFrame:
    """(id, bytes, prompt_tokens, completion_tokens) of this batch's rows answered in the checkpoint
    with usage the server reported (not the pipeline's own estimate)."""
    images = p.media_tokens or [0] * len(p.keys)  # billed with the prompt: taken out, the rest is per byte of text
    usable = [
        (row, max(0, r.prompt_tokens - images[row]), r.completion_tokens or 0)
        for row, r in p.cached.items()
        if r.status == "ok" and r.prompt_tokens is not None and not r.tokens_estimated
    ]
    if not usable:
        return SEEN_SCHEMA.clear()
    rows, pt, ct = zip(*usable, strict=True)
    picked = df.select("id", "bytes", "sendable")[list(rows)]
    return (
        picked.with_columns(pt=pl.Series(pt, dtype=pl.Int64), ct=pl.Series(ct, dtype=pl.Int64))
        .filter("sendable")
        .select(SEEN_SCHEMA.columns)
    )


SEEN_SCHEMA = pl.DataFrame(schema={"id": pl.Int64, "bytes": pl.Int64, "pt": pl.Int64, "ct": pl.Int64})


def scan_table(
    table: source.Table, cfg: RunConfig, renderer: Renderer, done: pl.DataFrame, samples: int, count_limit: int
) -> Scan:
    """Stream the table once, as `run` would, and count what it would send."""
    rows = not_sendable = skipped = 0
    parts: list[pl.DataFrame] = []  # (id, bytes, charge, payload bytes) of each row to send: 20 bytes a row, not the table
    answered: list[pl.DataFrame] = []  # (id, bytes, prompt and completion tokens) of rows answered already
    shown = pl.DataFrame(schema={"id": pl.Int64, "payload": pl.String, "extra": pl.String, "media": pl.String})
    reservoir = pl.DataFrame(schema={"id": pl.Int64, "payload": pl.String, "bytes": pl.Int64})
    # The system prompt as sent, the schema included where the server is told it in words.
    sent = chat_messages(replace(renderer.spec, conversation=False), "")
    system_bytes = sum(len(str(m["content"]).encode()) for m in sent if m["role"] == "system")
    for frame in source.batches(table, cfg.batch_size, cfg.limit):
        prepared = prepare(frame, renderer, done)
        df = _batch_requests(prepared, system_bytes)
        if prepared.cached:
            answered.append(_answered(prepared, df))
        sendable = df.filter("sendable")
        rows += df.height
        not_sendable += df.height - sendable.height
        skipped += int(sendable.get_column("cached").sum())
        todo = sendable.filter(~pl.col("cached")).unique(subset="id", keep="first", maintain_order=True)
        parts.append(
            todo.select(
                "id", pl.col("bytes").cast(pl.Int32), pl.col("charge").cast(pl.Int32), pl.col("payload_bytes").cast(pl.Int32),
                *estimate_media.COLUMNS,
            )
        )  # fmt: skip
        if shown.height < samples:
            more = todo.filter(~pl.col("id").is_in(shown.get_column("id").implode())).head(samples - shown.height)
            shown = pl.concat([shown, more.select(shown.columns)])
        candidates = pl.concat([reservoir, todo.select(reservoir.columns)])
        reservoir = candidates.unique(subset="id").sort("id").head(count_limit)
    # Identical requests are sent once, wherever they sit in the table: one hash pass at the end
    # (is_first_distinct needs a fraction of the memory of unique(subset=...)).
    empty = pl.DataFrame(
        schema={"id": pl.Int64, "bytes": pl.Int32, "charge": pl.Int32, "payload_bytes": pl.Int32, **estimate_media.COLUMNS}
    )
    requests = pl.concat([empty, *parts]).filter(pl.col("id").is_first_distinct())
    totals = requests.select(
        n=pl.len(),
        bytes=pl.col("bytes").cast(pl.Int64).sum(),
        rule=((pl.col("bytes").cast(pl.Int64) + 3) // 4).clip(lower_bound=1).sum(),
        charge=pl.col("charge").cast(pl.Int64).sum(),
        payload=pl.col("payload_bytes").cast(pl.Int64).sum(),
    )
    n, request_bytes, rule_tokens, charged, payload_bytes = (int(v) for v in totals.row(0))
    media = estimate_media.totals(
        requests.select(pl.col(c).cast(pl.Int64).sum() for c in estimate_media.COLUMNS).row(0, named=True)
    )
    seen_rows = pl.concat([SEEN_SCHEMA, *answered])
    seen = Seen(
        *(
            int(v or 0)
            for v in seen_rows.filter(pl.col("id").is_first_distinct())
            .select(pl.len(), pl.col("bytes").sum(), pl.col("pt").sum(), pl.col("ct").sum())
            .row(0)
        )
    )
    samples_rows = tuple(shown.select("payload", "extra", "media").rows())
    count_sample = tuple(reservoir.select("payload", "bytes").rows())
    return Scan(
        rows, not_sendable, skipped, n, request_bytes, rule_tokens, charged, samples_rows, count_sample, payload_bytes, seen,
        media,
    )  # fmt: skip


async def _count(url: str, headers: Mapping[str, str], bodies: list[bytes], secrets: tuple[str, ...]) -> list[int]:
    """POST every body to the count endpoint, a few at a time; the first failure stops the rest."""
    transport = AiohttpTransport(concurrency=COUNT_CONCURRENCY, timeout=COUNT_TIMEOUT)
    todo, counts = iter(bodies), []

    async def worker() -> None:
        for body in todo:  # one shared iterator: each body is taken by exactly one worker
            status, _, reply = await transport.post(url, headers, body)
            for secret in secrets:  # a server may echo the key in its error message
                if len(secret) >= MIN_SECRET:
                    reply = reply.replace(secret.encode(), b"***")
            data = decode(reply) if status == 200 else None
            if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
                raise http_error(status, reply[:200].decode("utf-8", "replace"), wait=None)
            counts.append(data["input_tokens"])

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(COUNT_CONCURRENCY):
                group.create_task(worker())
    finally:
        await transport.close()
    return counts


def calibrated(scan: Scan, why: str) -> tuple[int, str]:
    """Typical prompt tokens without a count: the tokens a byte billed for the answers in the checkpoint,
    applied to the bytes to send; with no answers, the 4-bytes rule. `why` says why there is no count."""
    seen = scan.seen
    if seen.answers and seen.bytes:
        return round(seen.per_byte * scan.request_bytes), (
            f"calibrated from {seen.answers:,} answer{'s' if seen.answers != 1 else ''} in the checkpoint: "
            f"{seen.per_byte * 1000:,.0f} tokens per KB of prompt; {why}"
        )
    return scan.rule_tokens, f"{ESTIMATED}{',' if why.startswith('no ') else ';'} {why}"


def count_tokens(cfg: RunConfig, renderer: Renderer, scan: Scan, api_key: str | None) -> tuple[int, str]:
    """Prompt tokens of the requests to send, and how they were found (EXACT when counted, all of them)."""
    if scan.requests == 0:
        return 0, "nothing to send"
    if cfg.provider not in COUNTING_PROVIDERS:
        return calibrated(scan, "no tokenizer for this provider")
    # The Messages adapter builds the body (system turns, schema tool and all); the count
    # endpoint takes only the fields that are input, not max_tokens or sampling.
    headers, secrets = cfg.request_headers()
    messages = AnthropicMessages(str(cfg.setting("base_url")), renderer.spec, api_key, headers, secrets)
    if not messages.sends_key:
        env = cfg.key_env() or "the key's variable"
        return calibrated(scan, f"set {env} to count exactly with the provider's count endpoint")
    bodies = []
    for payload, _ in scan.count_sample:
        full = orjson.loads(messages.body(payload))
        bodies.append(orjson.dumps({k: full[k] for k in COUNT_FIELDS if k in full}))
    try:
        url = endpoint(str(cfg.setting("base_url")), "/v1/messages/count_tokens")
        counts = asyncio.run(_count(url, messages.headers, bodies, messages.secrets))
    except BaseExceptionGroup as group:
        failed = group.subgroup(errors.RequestError)
        if failed is None:
            raise
        return calibrated(scan, f"the provider's count endpoint failed: {failed.exceptions[0]}")
    if len(counts) == scan.requests:
        return sum(counts), EXACT
    per_byte = sum(counts) / sum(b for _, b in scan.count_sample)
    return round(per_byte * scan.request_bytes), f"extrapolated from {len(counts):,} rows counted by the provider"


def figures(cfg: RunConfig, scan: Scan, tokens: tuple[int, str], latency: tuple[float, str], *, base_bytes: int = 0) -> Estimate:
    """The pure arithmetic: typical and worst-case tokens, cost and wall time from the counts.
    `base_bytes`: the request body around an empty prompt, as the run's spend ceiling counts it."""
    per_out = worst_out(cfg)
    if {"max_tokens", "max_completion_tokens"} & cfg.param_columns.keys():
        per_out = None  # taken per row from a column: no one worst case (and no ceiling either, see rules.ceiling_refusal)
    out = None if per_out is None else scan.requests * per_out
    exact = tokens[1] == EXACT or scan.requests == 0
    # The bound the run reserves by: every request's body around an empty prompt plus its prompt, a token a byte,
    # and its images at the provider's rule (their most where the size is not known).
    media = scan.media
    most_in = tokens[0] + media.most if exact else max(tokens[0], scan.requests * base_bytes + scan.payload_bytes) + media.most
    if media.items:  # images count by a published rule, never exactly
        tokens = (tokens[0] + media.tokens, tokens[1] + ("; images by the provider's published rule" if exact else ""))
        exact = False
    seen = scan.seen
    typical_out: int | None
    if seen.answers:
        average = seen.completion_tokens / seen.answers
        guess = round(average * scan.requests)
        typical_out = guess if out is None else min(out, guess)
        out_method = f"{average:,.0f} a request, the average of {seen.answers:,} answers in the checkpoint"
    else:
        typical_out, out_method = out, "every request at max_tokens: no answers yet to go by"
    cost_in = cost_out = cost_typical = cost_most = None
    if (paid := spend.prices(cfg)) is not None:  # batch mode at the batch discount
        cost_in = tokens[0] / 1e6 * paid[0]
        cost_out = None if out is None else out / 1e6 * paid[1]
        cost_typical = spend.cost(cfg, tokens[0], typical_out or 0) if typical_out is not None else None
        cost_most = None if out is None else spend.cost(cfg, most_in, out)
    concurrency = int(cfg.setting("concurrency"))
    if cfg.adapt and cfg.concurrency is None:
        # The run learns how many the server takes: this is the best case, its limits decide.
        label = f"up to {concurrency} in flight as learned at run time (a best case), assumed {latency[0]:.1f} s per request: {latency[1]}"
    else:
        label = f"concurrency {concurrency}, assumed {latency[0]:.1f} s per request: {latency[1]}"
    paces = [(concurrency / latency[0], label)]
    if cfg.rpm is not None:
        paces.append((cfg.rpm / 60, f"limited by rpm {cfg.rpm:g}"))
    if cfg.tpm is not None and scan.requests:
        per_request = scan.charged_tokens / scan.requests  # prompt estimate + max_tokens, as the limiter charges
        label = f"limited by tpm {cfg.tpm:g} at {per_request:,.0f} tokens a request as the limiter counts them"
        paces.append((cfg.tpm / 60 / per_request, label))
    rate, pace = min(paces)
    return Estimate(
        rows=scan.rows, not_sendable=scan.not_sendable, skipped=scan.skipped, requests=scan.requests,
        tokens_in=tokens[0], tokens_in_method=tokens[1], max_tokens=per_out, tokens_out=out,
        cost_in=cost_in, cost_out=cost_out, seconds=scan.requests / rate, rate=rate, pace=pace,
        tokens_in_most=None if exact else most_in, tokens_in_exact=exact,
        tokens_out_typical=typical_out, tokens_out_method=out_method, cost_typical=cost_typical, cost_most=cost_most,
    )  # fmt: skip


def empty_request_bytes(provider: Provider) -> int:
    """Bytes of a request body around an empty prompt, the most over the JSON forms the run may send in
    (engine._request_bytes reserves by the form in use, so never more). Switches `provider`'s form: pass one of its own."""
    sizes = []
    for _ in range(2):
        try:
            sizes.append(len(provider.body("", None)))
        except orjson.JSONDecodeError:  # a conversation column: the payload is a JSON list
            sizes.append(len(provider.body("[]", None)))
        if not provider.use_json_object():
            break
    return max(sizes)


def sample_bodies(
    cfg: RunConfig,
    renderer: Renderer,
    rows: tuple[tuple[str, str | None, str | None], ...],
    api_key: str | None,
    *,
    full: bool = True,
) -> tuple[str, ...]:
    """Request bodies exactly as the provider adapter builds them, with any key in the body masked and
    each image shown by what it is, not its base64; unless `full`, each text in them cut to SAMPLE_CHARS
    characters."""
    headers, secrets = cfg.request_headers()
    provider = make_provider(cfg.provider, cfg.setting("base_url") or NOWHERE, renderer.spec, api_key, headers, secrets)
    shown = []
    for payload, extra, media in rows:
        body = orjson.loads(provider.body(payload, extra, None, estimate_media.placeholders(media)))
        body = estimate_media.stand_ins(body, media)
        if "key" in body:  # ModelsLab sends the key in the body
            body["key"] = "***"
        shown.append(orjson.dumps(body if full else _cut(body), option=orjson.OPT_INDENT_2).decode())
    return tuple(shown)


def _cut(value: Any) -> Any:
    """The body with every long text cut, saying how much was left out: a 2 MB cell is not read on a screen."""
    if isinstance(value, str) and len(value) > SAMPLE_CHARS:
        return f"{value[:SAMPLE_CHARS]}… [{len(value) - SAMPLE_CHARS:,} more characters; --full shows all]"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v) for v in value]
    return value


def estimate(cfg: RunConfig, samples: int = 3, *, count_limit: int = 200, full: bool = True) -> Estimate:
    """Check the job as `pipeline run` does, then count; raises UserError for bad input. Sends count requests only."""
    plan = preflight(cfg, writes=False)
    renderer, table = plan.renderer, plan.table
    api_key = None
    if cfg.provider in COUNTING_PROVIDERS:
        with contextlib.suppress(errors.ConfigError):  # no key yet: price by the byte estimate, and say so
            api_key = cfg.api_key()
    done = read_done(cfg.checkpoint_path) if cfg.output or cfg.checkpoint_dir else pl.DataFrame(schema=STORED_SCHEMA)
    if (remote := cfg.checkpoint_remote) is not None:  # the job's answers are in the bucket, not on this disk
        from pipeline.tables import remote_state

        done = remote_state.read_done(remote)
    scan = scan_table(table, cfg, renderer, done.clear() if cfg.fresh else done, samples, count_limit)
    headers, secrets = cfg.request_headers()
    provider = make_provider(cfg.provider, cfg.setting("base_url") or NOWHERE, renderer.spec, api_key, headers, secrets)
    tokens = count_tokens(cfg, renderer, scan, api_key)
    result = figures(cfg, scan, tokens, measured_latency(done), base_bytes=empty_request_bytes(provider))
    bodies = sample_bodies(cfg, renderer, scan.samples, api_key, full=full)
    images = estimate_media.line(scan.media, renderer.media.rules if renderer.media else None)
    return replace(result, samples=bodies, images=images)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report(cfg: RunConfig, est: Estimate) -> str:
    """The few lines a person reads before deciding to spend the money."""
    lines = [
        f"pipeline estimate: {', '.join(cfg.input)} ({est.rows:,} rows), provider {cfg.provider}, model {cfg.setting('model')}"
    ]
    for i, body in enumerate(est.samples, 1):
        lines.append(f"  sample request {i}: " + body.replace("\n", "\n    "))
    lines.append(
        f"  rows: {est.rows:,}; already answered (skipped): {est.skipped:,}; not sendable (null/empty): {est.not_sendable:,}; "
        f"requests to send: {est.requests:,}"
    )
    if est.images:
        lines.append(est.images)
    if est.tokens_in_exact:
        lines.append(f"  tokens in: {est.tokens_in:,} ({est.tokens_in_method})")
    else:
        images = " and the images by the rule" if est.images else ""
        lines.append(
            f"  tokens in: about {est.tokens_in:,} ({est.tokens_in_method}); "
            f"at most {est.most_in:,} (bound: {BOUND}{images}, as the run's spend ceiling counts it)"
        )
    if est.tokens_out is None:
        typical = "" if est.tokens_out_typical is None else f"; about {est.tokens_out_typical:,} ({est.tokens_out_method})"
        lines.append(f"  tokens out: no limit (no max_tokens set), {est.requests:,} requests{typical}")
    else:
        typical = (
            f"; about {est.tokens_out_typical:,} ({est.tokens_out_method})" if est.tokens_out_typical != est.tokens_out else ""
        )
        lines.append(
            f"  tokens out: at most {est.tokens_out:,} ({est.requests:,} requests x max_tokens {est.max_tokens}){typical}"
        )
    bound = "the exact prompt count + max_tokens" if est.tokens_in_exact else f"{BOUND} + max_tokens"
    if est.cost_in is None:
        lines.append("  cost: set price_in and price_out (per million tokens) in the config to see a cost")
    elif est.cost_most is None:
        if est.cost_typical is not None:
            lines.append(f"  cost: about {spend.money(est.cost_typical)} (typical); no upper bound: no max_tokens set")
        else:
            lines.append(f"  cost: about {spend.money(est.cost_in)} in, plus the output, which has no bound: no max_tokens set")
    else:
        typical = "typical" if est.tokens_out_typical != est.tokens_out else "typical prompt, output at max_tokens"
        about = f"about {spend.money(est.cost_typical or 0.0)} ({typical}), " if est.cost_typical != est.cost_most else ""
        batch = f"; batch mode: {BATCH_DISCOUNT:.0%} of the online price" if cfg.mode == "batch" else ""
        lines.append(f"  cost: {about}at most {spend.money(est.cost_most)} (bound: {bound}){batch}")
    out = est.tokens_out
    fit = spend.fit_line(
        cfg, (est.tokens_in, est.tokens_out_typical or 0), None if out is None else (est.most_in, out),
        est.tokens_in_exact, requests=est.requests,
    )  # fmt: skip
    if fit is not None:
        lines.append(fit + "; nothing was sent")
    if est.requests == 0:
        lines.append("  time: none, nothing to send")
    elif cfg.mode == "batch":
        lines.append("  time: within 24 hours (the provider's batch window; most batches finish sooner)")
    else:
        speed = f"{est.rate:,.1f} requests/s" if est.rate >= 0.95 else f"{est.rate * 60:,.1f} requests/min"
        lines.append(f"  time: about {_duration(est.seconds)} at {speed} ({est.pace})")
    return "\n".join(lines)


def estimate_job(cfg: RunConfig, out: TextIO, samples: int = 3, *, count_limit: int = 200, full: bool = False) -> int:
    """Dry run: no generation request. Prints the report to `out` (sample texts cut unless `full`); returns
    the exit code (0). Raises UserError (exit 2). With several models, a report for each, on its own
    server and at its own prices, then the total cost where every model has prices."""
    each = model_configs(cfg)
    if len(each) == 1:
        print(report(cfg, estimate(cfg, samples, count_limit=count_limit, full=full)), file=out)
        return 0
    preflight(cfg, writes=False)  # the whole run's checks first: batch mode and Ray refuse several models
    costs: list[float | None] = []
    for i, one in enumerate(each, start=1):
        found = estimate(one, samples, count_limit=count_limit, full=full)
        costs.append(found.cost_most)
        print(f"== model {i} of {len(each)}: {one.model} ({one.provider}) ==", file=out)
        print(report(one, found) + "\n", file=out)
    if all(c is not None for c in costs):
        total = spend.money(sum(c or 0.0 for c in costs))
        print(f"All {len(each)} models together: at most {total}.", file=out)
    return 0
