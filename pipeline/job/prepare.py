"""Before anything is sent: every check the user could fail, then the `Job` that runs what passed them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipeline import errors
from pipeline.config import RunConfig
from pipeline.job.record import mark_refused
from pipeline.job.run import Job
from pipeline.models import entry_error
from pipeline.observe import metrics
from pipeline.observe.stats import RunStats
from pipeline.plan import Plan, preflight
from pipeline.providers.local_model import check_installed
from pipeline.tables import source
from pipeline.tables.cache import AnswerCache
from pipeline.tables.sink import Sink


def prepare_job(
    cfg: RunConfig,
    *,
    table: source.Table | None = None,
    sink: Sink | None = None,
    checkpoint: Path | None = None,
    say: Callable[[str], None] | None = None,
    stream: TextIO | None = None,
    files: bool = True,
    notebook: bool = False,
    api_key: str | None = None,
) -> Job:
    """Check everything the user could have got wrong, before anything is sent; raises UserError.

    `table` and `sink` are the API's DataFrame in and out (else the config's input
    and output files); `checkpoint` overrides the config's folder; `files` says
    whether the metrics file and the report are written (the API's DataFrame out
    writes them only when asked for by path); `api_key` is the API's key given in memory, else the
    config's variable is read."""
    clock = metrics.Clock.now()
    try:
        plan = preflight(cfg, writes=sink is None, table=table)
        access: tuple[tuple[str | None, dict[str, str]], ...] = ()
        if plan.models:  # each model's key and headers, read now: one unset is exit 2, naming its entry
            access, secrets = _access(cfg, plan, api_key)
            api_key, headers = access[0]
        else:
            api_key = api_key or cfg.api_key()
            headers, secrets = cfg.request_headers()  # before anything starts: a variable unset is exit 2
        if any(c.provider == "local" and c.setting("base_url") is None for c in [m.cfg for m in plan.models] or [cfg]):
            check_installed()
        if cfg.cache_dir is not None:
            AnswerCache(cfg.cache_dir).open().close()  # a folder that cannot hold it is exit 2, before anything is sent
        stats = RunStats(total_rows=source.count_rows(plan.table, cfg.limit) * max(1, len(plan.models)))
    except errors.UserError as exc:
        if files or cfg.metrics:
            mark_refused(cfg, clock, exc)
        raise
    err = stream or sys.stderr

    def to_stream(message: str) -> None:
        print(message, file=err, flush=True)

    return Job(
        cfg,
        plan,
        stats=stats,
        clock=clock,
        say=say or to_stream,
        stream=err,
        secrets=(*secrets, *([api_key] if api_key else [])),
        api_key=api_key,
        headers=headers,
        sink=sink,
        checkpoint=checkpoint or cfg.checkpoint_path,
        remote=cfg.checkpoint_remote if checkpoint is None else None,
        files=files,
        notebook=notebook,
        access=access,
    )


def _access(
    cfg: RunConfig, plan: Plan, api_key: str | None
) -> tuple[tuple[tuple[str | None, dict[str, str]], ...], tuple[str, ...]]:
    """Each model's key and headers, and every secret among them. A key given in memory (the API's) goes
    only to the models on the run's own server (its provider and base_url) that name no variable of their own."""
    access, secrets = [], []
    for m in plan.models:
        c = m.cfg
        same_server = (c.provider, c.base_url, c.api_key_env) == (cfg.provider, cfg.base_url, cfg.api_key_env)
        try:
            own = api_key if api_key and same_server else None
            key = own or m.cfg.api_key()
            headers, hidden = m.cfg.request_headers()
        except errors.ConfigError as exc:
            raise entry_error(cfg, m.cfg, exc) from None
        access.append((key, headers))
        secrets.extend([*hidden, *([key] if key else [])])
    return tuple(access), tuple(dict.fromkeys(secrets))
