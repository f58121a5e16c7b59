"""When to try a request again, and how long to wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.errors import InvalidOutput, RequestError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    # As in the AWS SDKs' standard mode: full jitter over 0.1 s x 2^n, capped.
    # Short first waits keep a 10% error rate from stretching a run by its
    # retry tail; the exponent still backs off a struggling server fast, and
    # the governor holds every request when the server says the account must wait.
    base: float = 0.1
    cap: float = 20.0
    max_wait: float = 900.0  # longer waits are refused by the governor before they get here

    def delay(self, attempt: int, err: RequestError) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up on this row."""
        if not err.transient or attempt >= self.max_attempts:
            return None
        if isinstance(err, InvalidOutput):
            return 0.0  # the server is fine; the answer was not: ask again at once
        if err.retry_after is not None:
            # Honour the server, plus a little jitter so waiters do not return in lockstep.
            return min(err.retry_after, self.max_wait) + random.uniform(0, 0.1 + 0.1 * err.retry_after)
        # Full jitter: spreads a burst of failures over the whole window.
        return random.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))
