"""Engines that send a plan's requests and hand back results.

- `online`: the asyncio engine: a bounded pool of workers, retries on timers, results in input order.
- `batch`: the provider batch APIs (OpenAI, Anthropic): submit, poll, collect, a ledger so a kill never pays twice.
- `ray`: the online engine inside Ray Data actors, one shared rate budget (the optional `ray` extra).
"""
