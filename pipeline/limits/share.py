"""What else the Ray actors share besides the rate (lease.py): requests in flight, and the spend ceiling.

- `FlightShare` (pure, clock passed in) lives in the coordinator: `--concurrency` is one
  budget for all engines, handed out by demand. Each engine reports what it has in
  flight, the limit it applies and how many it could use; it gets back its grant.
  Grants are fair shares of the total by demand (water-filling), and never more than
  what the others may be holding: a grant lowered is only counted as freed once the
  engine has reported applying it and its requests above it have come back. So the
  cluster never has more than the total in flight, and an engine whose blocks ran
  out hands its share to the ones still sending within a report or two.
- `SpendClient` lives in each engine: every request's worst case is reserved against
  the one ceiling the coordinator holds (a call that waits while the ceiling is full
  only of reservations, as the local governor does), and settlements go back in
  batches, one call at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

STALE = 5.0  # seconds without a report after which an engine is taken for gone (its actor died)

Settle = tuple[tuple[int, int], int, int]  # (reserved worst case, tokens billed in, out)


@dataclass
class _Engine:
    grant: int  # the last limit sent to it
    applied: int = 0  # the limit it had in force when it last reported
    in_flight: int = 0
    wants: int = 0
    seen: float = 0.0


class FlightShare:
    """Requests in flight for the whole cluster: at most `total`, shared by demand."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self._engines: dict[str, _Engine] = {}

    def named(self, limit: int) -> None:
        """The server named its in-flight limit: it is the account's, so the cluster's total."""
        self.total = max(1, min(self.total, limit))

    def report(self, now: float, engine: str, *, in_flight: int, applied: int, wants: int) -> int:
        """An engine's state; returns the number of requests it may have in flight from now on."""
        e = self._engines.setdefault(engine, _Engine(grant=applied))
        e.in_flight, e.applied, e.wants, e.seen = in_flight, applied, wants, now
        for name in [n for n, o in self._engines.items() if now - o.seen > STALE]:
            del self._engines[name]
        others = sum(self._held(o) for n, o in self._engines.items() if n != engine)
        e.grant = max(0, min(self._fair().get(engine, 0), self.total - others))
        return e.grant

    def held(self) -> int:
        """The most the cluster may have in flight right now, by what it was told."""
        return sum(self._held(e) for e in self._engines.values())

    @staticmethod
    def _held(e: _Engine) -> int:
        # Until it reports again it may still apply the higher of its old limit and the new grant,
        # and requests above a lowered limit are still out until they come back.
        return max(e.applied, e.in_flight, e.grant)

    def _fair(self) -> dict[str, int]:
        """Water-filling: the total split evenly among engines that want some, none getting more than it wants."""
        wanting = sorted(((e.wants, n) for n, e in self._engines.items() if e.wants > 0))
        left, out = self.total, {}
        for i, (wants, name) in enumerate(wanting):
            give = min(wants, left // (len(wanting) - i))
            out[name] = give
            left -= give
        return out


class SpendClient:
    """One engine's side of the spend ceiling the coordinator holds (see limits.spend.Budget).

    `reserve(held, settles)` asks the coordinator to reserve `held` (after applying the
    settlements given), returning False once the ceiling is reached; `settle(settles)` sends
    settlements. Settlements wait here only while another batch of them is on its way."""

    def __init__(
        self,
        reserve: Callable[[tuple[int, int], list[Settle]], Awaitable[bool]],
        settle: Callable[[list[Settle]], Awaitable[None]],
    ) -> None:
        self._reserve, self._settle = reserve, settle
        self._pending: list[Settle] = []
        self._flushing: asyncio.Task[None] | None = None

    async def reserve(self, held: tuple[int, int]) -> bool:
        pending, self._pending = self._pending, []
        return await self._reserve(held, pending)

    def settle(self, held: tuple[int, int], tokens_in: int, tokens_out: int) -> None:
        self._pending.append((held, tokens_in, tokens_out))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._settle(batch)
        finally:
            self._flushing = None

    async def flushed(self) -> None:
        """Returns once every settlement made so far has reached the coordinator."""
        while self._flushing is not None:
            await asyncio.shield(self._flushing)
