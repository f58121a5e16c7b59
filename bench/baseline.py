"""The least any batch client must do: read the table, send one chat request per row, read the reply.

No rate limiting, retries, checkpoint or output, so its CPU per request is the floor that
`pipeline run` is measured against.  The request bodies are byte-for-byte the ones the
OpenAI provider of `pipeline` builds (same keys, same order, same default max_tokens), so
both clients put the same load on the server.

Prints one JSON object on stdout: wall and CPU seconds (whole process, start-up included,
like the harness measures `pipeline run`) and the count of replies per HTTP status.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the heavy imports: `pipeline run` pays for its imports too

import argparse  # noqa: E402 - the clock above must start first
import asyncio  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import polars as pl  # noqa: E402


async def send_all(url: str, bodies: list[bytes], concurrency: int, total_s: float) -> tuple[Counter[int], float, float]:
    statuses: Counter[int] = Counter()
    sem = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=total_s)) as session:

        async def one(body: bytes) -> None:
            async with sem:
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        raw = await resp.read()
                        if resp.status == 200:
                            # Decoding the answer is part of the minimum: a tool has to get the text out.
                            orjson.loads(raw)["choices"][0]["message"]["content"]
                        statuses[resp.status] += 1
                except (TimeoutError, aiohttp.ClientError):
                    statuses[0] += 1  # 0 = no HTTP answer

        first = time.monotonic()
        await asyncio.gather(*(one(b) for b in bodies))
        return statuses, first, time.monotonic()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--prompt", default="Summarise: {text}")
    p.add_argument("--column", default="text", help="the one column the prompt template uses")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--max-tokens", type=int, default=256, help="pipeline's default, so bodies match")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()

    reader = pl.read_parquet if args.input.endswith(".parquet") else pl.read_csv
    values = reader(args.input, columns=[args.column], n_rows=args.limit).get_column(args.column).to_list()
    bodies = [
        orjson.dumps(
            {
                "model": args.model,
                "messages": [{"role": "user", "content": args.prompt.format_map({args.column: v})}],
                "max_tokens": args.max_tokens,
            }
        )
        for v in values
    ]
    url = args.base_url.rstrip("/") + "/chat/completions"
    statuses, first, last = asyncio.run(send_all(url, bodies, args.concurrency, args.timeout))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "requests": len(bodies),
        "ok": statuses[200],
        "failed": len(bodies) - statuses[200],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": time.monotonic() - STARTED,
        "send_s": last - first,  # first request to last reply, start-up excluded
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_mb": usage.ru_maxrss / 1024,
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
