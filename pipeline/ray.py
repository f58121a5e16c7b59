"""`pipeline.ray.complete(ds, **settings)`: a Ray Dataset in, the same rows with results out.

The public face of the Ray engine (`pipeline.engines.ray`); Ray itself is imported
only when called, and is the optional `ray` extra.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import answers, errors
from pipeline.engines.ray import (
    build_stages,
    connect,
    import_ray,
    plan_work,
    rename_results,
    say_to_stderr,
    start_shared,
    summary_callback,
)
from pipeline.plan import layout_for, media_for, renderer_for, structured_for
from pipeline.settings import settings_config
from pipeline.tables.checkpoint import read_done
from pipeline.tables.sink import STDOUT, check_output

__all__ = ["complete"]


def complete(ds: Any, **settings: Any) -> Any:
    """The result columns added to a Ray Dataset's rows, by the same engine in a pool of actors.

    `ds`: a `ray.data.Dataset`. `settings`: those of `pipeline.complete()` (prompt, provider,
    base_url, model, rpm, max_cost, cache_dir, ...), plus `workers=` (actors) and
    `checkpoint_dir=` (a folder every node can reach: answered rows are not sent again when
    called again with it). Without either folder, answers go to the user's default answer store
    on the driver's node, as `pipeline.complete()`'s do. Returns a Dataset, lazy as Ray's are: the requests are sent when it
    is consumed (written, iterated, materialized), and then the run's summary is said (on
    stderr; with progress=False to the `pipeline` logger). Rows keep their order; a failed row
    has status error and the reason in `error`, as in `pipeline run`'s output.
    """
    ray = import_ray()
    config = settings.pop("config", None)
    cfg = settings_config(config, {**settings, "engine": "ray"}, api=True)
    # As pipeline.complete(): without a place of the caller's, the answers go to the default store (kept by
    # an actor on this node), so the same call made again pays for nothing it already has.
    cfg = answers.with_default_store(cfg)
    if cfg.mode == "batch":
        raise errors.ConfigError(
            "pipeline.ray.complete() sends online: a batch job has no actors to run. Use pipeline.complete(table, "
            "mode='batch', checkpoint_dir=...) on the table instead."
        )
    if not ray.is_initialized():
        connect(ray, cfg)
    structured = structured_for(cfg)
    renderer = renderer_for(cfg, structured)
    if cfg.image_columns:
        absent = [c for c in cfg.image_columns if c not in ds.schema().names]
        if absent:
            raise errors.ConfigError(
                f"The image column {absent[0]!r} is not in the dataset. Its columns are: "
                f"{', '.join(repr(c) for c in ds.schema().names)}."
            )
        # Relative paths in image cells: from this process's current folder, on whichever node sends the row.
        renderer = replace(renderer, media=media_for(cfg, (), renderer.spec.model))
    base_url = cfg.setting("base_url")
    if base_url is None:
        raise errors.ConfigError(
            "pipeline.ray.complete() needs a server every actor can reach: give base_url= (the embedded model runs "
            "only beside a local run)."
        )
    cfg.api_key()  # an unset key variable is a ConfigError here, before anything is sent
    cfg.request_headers()
    layout = layout_for(cfg, structured)
    check_output(Path(STDOUT), [], list(ds.schema().names), layout.extracted, cfg.result_prefix, layout.added)  # clashes, first
    # Without checkpoint_dir the answers go to a new temporary folder (the dataset is lazy: it outlives this call).
    checkpoint = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(tempfile.mkdtemp(prefix="pipeline-ray-"))
    checkpoint.mkdir(parents=True, exist_ok=True)
    # The dataset's blocks are the actors' units of work, as they come: repartitioning here would add a
    # stage that can wait forever for a CPU on a small cluster (the actors hold the rest), so it is the
    # caller's to do (see docs/guides/ray.md).
    work = plan_work(ray, cfg, None)
    shared = start_shared(ray, cfg, renderer, structured, str(base_url), checkpoint, work, layout=layout)
    out = build_stages(ray, ds, shared, work, read_done(checkpoint)).map_batches(
        rename_results, fn_kwargs={"prefix": cfg.result_prefix}, batch_size=None, batch_format="pyarrow", num_cpus=0.1
    )
    say = say_to_stderr if cfg.progress else logging.getLogger("pipeline").info
    with contextlib.suppress(ImportError, AttributeError):  # a Ray without execution callbacks: no summary, same rows
        out.context.custom_execution_callback_classes.append(summary_callback(shared.coordinator, str(checkpoint), say))
    return out
