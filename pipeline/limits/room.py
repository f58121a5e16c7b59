"""Room for the bytes of requests being built or in flight: what bounds a run's memory when its rows carry
images, whatever the concurrency (256 requests of 5 MB images would be 1.3 GB of bytes, twice that as
base64 bodies).

A weighted semaphore: a request takes its images' size before reading them and gives it back when
its answer is in. Waiters are served first come, first served, woken by `give` (never polled); one
larger than the whole room is let in alone, so nothing waits for ever.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Room:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, n: int) -> int:
        """Wait until `n` bytes fit (at most the whole room); returns what was taken, for `give`."""
        n = min(n, self.capacity)
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # let in just as it was cancelled: hand the room on
                self.give(n)
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # it may have been blocking smaller ones behind it
            raise
        return n

    def give(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.used += n
                fut.set_result(None)
