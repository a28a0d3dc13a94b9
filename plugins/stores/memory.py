"""The ``memory`` session store: one process, TTL expiry, a bound on sessions (LRU eviction)."""

from __future__ import annotations

import asyncio
import collections
import copy
import time
from typing import Any

from chatstream.hookspecs import hookimpl


class MemorySessionStore:
    """Sessions in a dict. ``ttl_s`` after the last use a session expires; beyond ``max_sessions``
    the least recently used one is evicted. Records are deep-copied in and out, so a caller that
    keeps mutating its objects never changes what is stored until it saves again.
    """

    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 10_000) -> None:
        if ttl_s <= 0:
            raise ValueError(f"memory store ttl_s={ttl_s}: must be > 0 seconds")
        if max_sessions < 1:
            raise ValueError(f"memory store max_sessions={max_sessions}: must be at least 1")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._data: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def _expire(self, now: float) -> None:
        while self._data:
            key, (stamp, _) = next(iter(self._data.items()))
            if now - stamp < self.ttl_s:
                break
            del self._data[key]

    async def load(self, session_id: str) -> dict[str, Any] | None:
        async with self._lock:
            now = time.monotonic()
            self._expire(now)
            item = self._data.get(session_id)
            if item is None:
                return None
            self._data[session_id] = (now, item[1])
            self._data.move_to_end(session_id)
            return copy.deepcopy(item[1])

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        record = copy.deepcopy(data)  # copy first: a failure leaves the old record intact
        async with self._lock:
            now = time.monotonic()
            self._data[session_id] = (now, record)
            self._data.move_to_end(session_id)
            self._expire(now)
            while len(self._data) > self.max_sessions:
                self._data.popitem(last=False)

    async def delete(self, session_id: str) -> None:
        async with self._lock:
            self._data.pop(session_id, None)

    async def close(self) -> None:
        return None


def create_memory_store(options: dict[str, Any]) -> MemorySessionStore:
    """Store factory; options ``ttl_s`` and ``max_sessions`` (``plugin_config.memory``)."""
    known = {"ttl_s", "max_sessions"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"memory store: unknown options {sorted(unknown)}; known: {sorted(known)}")
    return MemorySessionStore(**options)


@hookimpl
def register_session_stores(register: Any) -> None:
    register("memory", create_memory_store)
