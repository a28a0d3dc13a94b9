"""The ``memory`` session store: one process, TTL expiry, a bound on sessions (LRU eviction)."""

from __future__ import annotations

import asyncio
import collections
import copy
import time
from typing import Any

from pydantic import Field

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options

OPTIONS_PATH = "plugin_config.memory"


class MemoryStoreOptions(PluginOptions):
    """``plugin_config.memory``."""

    ttl_s: float = Field(3600.0, gt=0, description="seconds after its last use a session expires")
    max_sessions: int = Field(
        10_000, ge=1, description="sessions kept; beyond it the least recently used new one is evicted"
    )


class MemorySessionStore:
    """Sessions in a dict. ``ttl_s`` after the last use a session expires; beyond ``max_sessions``
    one is evicted. Records are deep-copied in and out, so a caller that keeps mutating its objects
    never changes what is stored until it saves again.

    Eviction is a segmented LRU: a session enters on probation and is promoted once it is loaded
    again (its client came back with the cookie). Probationary sessions are evicted first, oldest
    first; a promoted one only when no probationary one is left. So a flood of new sessions (any
    client can make one per request, with no cookie) evicts other new sessions, never the
    conversations of users who came back.
    """

    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 10_000) -> None:
        options = parse_options(
            MemoryStoreOptions, {"ttl_s": ttl_s, "max_sessions": max_sessions}, OPTIONS_PATH
        )
        self.ttl_s = options.ttl_s
        self.max_sessions = options.max_sessions
        # Each segment in least recently used order: (last use, record).
        self._probation: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = (
            collections.OrderedDict()
        )
        self._protected: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = (
            collections.OrderedDict()
        )
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def _expire(self, now: float) -> None:
        for segment in (self._probation, self._protected):
            while segment:
                key, (stamp, _) = next(iter(segment.items()))
                if now - stamp < self.ttl_s:
                    break
                del segment[key]

    async def load(self, session_id: str) -> dict[str, Any] | None:
        async with self._lock:
            now = time.monotonic()
            self._expire(now)
            item = self._protected.pop(session_id, None) or self._probation.pop(session_id, None)
            if item is None:
                return None
            self._protected[session_id] = (now, item[1])  # used again: promoted (or kept) protected
            return copy.deepcopy(item[1])

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        record = copy.deepcopy(data)  # copy first: a failure leaves the old record intact
        async with self._lock:
            now = time.monotonic()
            segment = self._protected if session_id in self._protected else self._probation
            segment.pop(session_id, None)
            segment[session_id] = (now, record)
            self._expire(now)
            while len(self) > self.max_sessions:
                (self._probation or self._protected).popitem(last=False)

    async def delete(self, session_id: str) -> None:
        async with self._lock:
            self._probation.pop(session_id, None)
            self._protected.pop(session_id, None)

    async def close(self) -> None:
        return None


def create_memory_store(options: MemoryStoreOptions | dict[str, Any]) -> MemorySessionStore:
    """Store factory (``plugin_config.memory``)."""
    return MemorySessionStore(**dict(parse_options(MemoryStoreOptions, options, OPTIONS_PATH)))


@hookimpl(trylast=True)
def register_session_stores(register: Any) -> None:
    register("memory", create_memory_store, options=MemoryStoreOptions)
