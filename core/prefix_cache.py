"""What engines keep between turns: token-id sequences, each with a value (its KV cache), found by
longest common prefix, evicted least recently used within a byte budget.

An engine inserts a finished turn's ids (prompt and answer) with the KV it computed for them; the
next request whose prompt starts with some of those ids reuses that many positions and prefills only
the rest. A causal model's KV at position i depends only on tokens 0..i, so any prefix of an entry
is valid for any prompt that starts with the same ids, another session's included: a shared system
prompt is computed once. Reuse is decided by token-id identity alone, so it never changes an answer.

Entries are never changed once stored; a newer turn of the same conversation replaces the entries
it extends. Scopes confine reuse: with ``scope`` given, a lookup sees only entries inserted with the
same scope (one session's own history), closing the timing side channel between sessions.

Used by one thread (an engine's step loop); not thread-safe.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")

# Fewer shared tokens than this are not worth a lookup's bookkeeping.
MIN_REUSE = 8


@dataclass(frozen=True)
class Entry(Generic[V]):
    ids: tuple[int, ...]
    value: V
    nbytes: int
    scope: str | None


@dataclass(frozen=True)
class Hit(Generic[V]):
    """``length`` leading positions of ``entry`` match the prompt."""

    entry: Entry[V]
    length: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading items ``a`` and ``b`` share (slice comparisons: C speed, log steps)."""
    a, b = tuple(a), tuple(b)
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low] and a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class PrefixCache(Generic[V]):
    """Entries by recency, within ``budget_bytes`` (an entry larger than the budget is not kept)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: collections.OrderedDict[int, Entry[V]] = collections.OrderedDict()
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, ids: Sequence[int], scope: str | None = None, *, confined: bool = False
    ) -> Hit[V] | None:
        """The entry sharing the longest prefix with ``ids`` (at least ``MIN_REUSE``), marked as
        recently used; None when there is none. ``confined``: only entries of the same ``scope``."""
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            if confined and entry.scope != scope:
                continue
            length = common_prefix(entry.ids, ids)
            if length >= MIN_REUSE and (best is None or length > best[1]):
                best = (key, length)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return Hit(self._entries[best[0]], best[1])

    def insert(self, ids: Sequence[int], value: V, nbytes: int, scope: str | None = None) -> bool:
        """Keep ``value`` for ``ids``; entries of the same scope that ``ids`` extends are dropped (the
        new one serves every prompt they served). Evicts least recently used entries to fit; False
        when the entry alone is over budget (nothing is kept, nothing evicted)."""
        if nbytes > self.budget_bytes or len(ids) < MIN_REUSE:
            return False
        key_ids = tuple(ids)
        for key, entry in list(self._entries.items()):
            if (
                entry.scope == scope
                and len(entry.ids) <= len(key_ids)
                and key_ids[: len(entry.ids)] == entry.ids
            ):
                self._remove(key)
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))
        self._entries[self._next_key] = Entry(key_ids, value, nbytes, scope)
        self._next_key += 1
        self.nbytes += nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
