"""Ray Data LLM's own HTTP request processor (`ray.data.llm`) over a table, on a Ray cluster: the
baseline `bench/run.py --only ray` sets `--engine ray` beside.

    python bench/ray_data_llm.py --address HOST:PORT --url http://127.0.0.1:PORT/v1/chat/completions \
        --input in.parquet [--actors 2] [--batch-size 64] [--batches-per-actor 4]

Each row becomes an OpenAI chat request ("Summarise: {text}", max_tokens 256, as `pipeline run` sends
it); the processor's output is consumed, and one JSON line is printed: rows, ok, wall_s. The
processor awaits each request of a batch before the next goes out (`HttpRequestUDF.udf`), so the
requests in flight are actors x batches an actor runs at once; `--batches-per-actor` sets the latter
(Ray Data's RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY, 4 by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches-per-actor", type=int, default=4)
    args = p.parse_args()
    os.environ["RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY"] = str(args.batches_per_actor)
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    started = time.monotonic()
    # A quarter of a CPU each, as `--engine ray`'s actors ask for about: with a whole CPU each, two actors
    # hold a two-CPU node and the read stage waits for a CPU forever.
    config = HttpRequestProcessorConfig(
        url=args.url,
        batch_size=args.batch_size,
        concurrency=(args.actors, args.actors),
        http_request_stage={"num_cpus": 0.25},
    )

    def request(row: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": "user", "content": f"Summarise: {row['text']}"}]
        return {"payload": {"model": "fake-model", "messages": messages, "max_tokens": 256}}

    def answer(row: dict[str, Any]) -> dict[str, Any]:
        reply = row["http_response"]
        return {"id": row["id"], "completion": reply["choices"][0]["message"]["content"]}

    processor = build_processor(config, preprocess=request, postprocess=answer)
    # A file is one block, which one actor would take: blocks for every actor, as --engine ray cuts them.
    table = ray.data.read_parquet(os.path.abspath(args.input)).repartition(args.actors * 4)
    out = processor(table).materialize()
    rows = out.count()
    ok = out.filter(lambda r: bool(r["completion"])).count()
    print(json.dumps({"rows": rows, "ok": ok, "wall_s": time.monotonic() - started}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
