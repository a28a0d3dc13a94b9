"""Admission control: N generation slots and a bounded FIFO waiting queue.

A request first takes a slot if one is free; otherwise it waits in line if the line is shorter
than ``max_queue_size``; otherwise it is refused at once with ``TooManyRequests``. Slots are
handed over in arrival order. A waiter that is cancelled (its client left) leaves the line
without taking a slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass


class TooManyRequests(Exception):
    """Every slot is busy and the waiting queue is full."""

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("too_many_requests")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Load:
    """A snapshot of the current load."""

    processing: int
    waiting: int
    max_processing: int
    max_waiting: int

    def to_dict(self) -> dict[str, int]:
        return {
            "processing": self.processing,
            "waiting": self.waiting,
            "max_processing": self.max_processing,
            "max_waiting": self.max_waiting,
        }


class Admission:
    """Limits concurrent generations and queues the overflow in arrival order."""

    def __init__(self, max_processing: int, max_waiting: int) -> None:
        if max_processing < 1:
            raise ValueError(f"num_of_concurrent_executions={max_processing}: must be at least 1")
        if max_waiting < 0:
            raise ValueError(f"max_queue_size={max_waiting}: must be 0 or more")
        self.max_processing = max_processing
        self.max_waiting = max_waiting
        self._processing = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def load(self) -> Load:
        return Load(self._processing, len(self._waiters), self.max_processing, self.max_waiting)

    def close(self) -> None:
        """Refuse every new request from now on (graceful shutdown)."""
        self._closed = True

    async def acquire(self) -> None:
        """Take a slot, waiting in line if needed; raises ``TooManyRequests`` when the line is full."""
        if self._closed:
            raise TooManyRequests(retry_after=5)
        if self._processing < self.max_processing and not self._waiters:
            self._processing += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise TooManyRequests(retry_after=self._retry_after())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release_slot()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back; the longest waiter gets it."""
        self._release_slot()

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes directly to this waiter
                return
        self._processing -= 1

    def _retry_after(self) -> int:
        return max(1, len(self._waiters) // max(1, self.max_processing))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """``async with admission.slot():`` holds a slot for the body."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
