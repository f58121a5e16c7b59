"""How fast and how much: every decision about when a request may go, and whether it may go again.

- `buckets`: the pacers and the in-flight gate (aiolimiter's leaky buckets, no polling).
- `learn`: pure controllers that learn limits (AIMD, the in-flight limit, the outage breaker), fed events.
- `governor`: the one object the engine asks before sending and tells after an answer.
- `lease`: one rate budget shared by several engines (the Ray actors), leased in short slices.
- `spend`: the spend ceiling (`--max-cost`, `--max-tokens-total`) and prices.
- `retry`: which errors are worth another attempt, and how long to wait.
"""
