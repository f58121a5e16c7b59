"""Room for the bytes of requests being built or in flight: what bounds a run's memory when its rows carry
images, whatever the concurrency (256 requests of 5 MB images would be 1.3 GB of bytes, twice that as
base64 bodies).

A weighted semaphore: a request takes its images' size before reading them and gives it back when
its answer is in. Waiters are served first come, first served, woken by `give` (never polled); one
larger than the whole room is let in alone, so nothing waits for ever.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 << 10  # glibc's default, held there


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


def hold_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its default (128 kB) for the rest of the process; True if set.

    Image rows allocate and free many large buffers (bytes read, their base64, the request body). glibc
    raises its threshold to the size of each mmapped block freed, up to 32 MB, after which such buffers
    come from the heap, which they fragment: peak memory then grew with rows (10,000 rows of 50 kB
    images: 318 MB; 40,000: 393 MB). Held at 128 kB, large buffers go back to the system when freed and
    memory stays near a text-only run's (207 MB and 272 MB; text only 190 and 220). Setting it turns
    the adjustment off (mallopt(3)). A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # here, not at the top: only runs with image columns need it

    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has the function and ignores it)
        return False
