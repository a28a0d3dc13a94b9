"""The prefix cache engines keep between turns: longest-prefix lookup, LRU within a budget, scopes."""

from __future__ import annotations

import random

from chatstream.prefix_cache import MIN_REUSE, PrefixCache, common_prefix


def test_common_prefix_agrees_with_a_plain_loop_on_random_sequences() -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randrange(0, 60)
        a = [rng.randrange(3) for _ in range(n)]
        b = a[: rng.randrange(0, n + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 20))]
        expected = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        assert common_prefix(a, b) == expected


def test_lookup_finds_the_longest_shared_prefix_even_across_sessions() -> None:
    cache: PrefixCache[str] = PrefixCache(budget_bytes=1000)
    system = list(range(20))
    cache.insert([*system, 100, 101, 102], "ann", 10, scope="ann")
    cache.insert([*system, 200, 201], "ben", 10, scope="ben")
    hit = cache.lookup([*system, 200, 201, 202, 203], scope="cat")
    assert hit is not None and hit.entry.value == "ben" and hit.length == 22
    shared = cache.lookup([*system, 300], scope="cat")  # only the system prompt is shared
    assert shared is not None and shared.length == 20
    assert cache.lookup(list(range(50, 80))) is None  # nothing in common
    assert cache.lookup(system[: MIN_REUSE - 1]) is None  # too short to be worth it


def test_confined_lookups_see_only_their_own_session() -> None:
    cache: PrefixCache[str] = PrefixCache(budget_bytes=1000)
    cache.insert(list(range(30)), "ann", 10, scope="ann")
    assert cache.lookup(list(range(30)), scope="ben", confined=True) is None
    hit = cache.lookup([*list(range(30)), 1], scope="ann", confined=True)
    assert hit is not None and hit.entry.value == "ann"


def test_a_newer_turn_replaces_the_entries_it_extends() -> None:
    cache: PrefixCache[str] = PrefixCache(budget_bytes=1000)
    turn1 = list(range(30))
    cache.insert(turn1, "turn 1", 100, scope="ann")
    cache.insert([*turn1, 7, 8, 9], "turn 2", 120, scope="ann")
    assert len(cache) == 1 and cache.nbytes == 120
    hit = cache.lookup([*turn1, 7, 8, 9, 10])
    assert hit is not None and hit.entry.value == "turn 2"


def test_eviction_keeps_the_budget_and_drops_the_least_recently_used() -> None:
    cache: PrefixCache[int] = PrefixCache(budget_bytes=300)
    for session in range(3):
        cache.insert([session] * 20, session, 100, scope=str(session))
    assert cache.lookup([0] * 20) is not None  # 0 is now the most recently used
    cache.insert([9] * 20, 9, 100, scope="9")
    assert cache.nbytes <= 300 and len(cache) == 3
    assert cache.lookup([1] * 20) is None  # the least recently used went
    assert {cache.lookup([s] * 20).entry.value for s in (0, 2, 9)} == {0, 2, 9}
    assert not cache.insert([5] * 20, 5, 301)  # over budget alone: refused, nothing evicted
    assert len(cache) == 3
