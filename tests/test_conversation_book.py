"""The conversation book over a plain session store: per-owner bounds, owners kept apart, chains
with a missing link, and many writers at once for one owner."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatstream.conversations import ConversationBook, message_item, owner_of
from chatstream.plugins.stores.memory import MemorySessionStore

ANN, BEN = owner_of("key", "ann"), owner_of("key", "ben")


class OldStyleStore:
    """A third-party store written for sessions only: load, save, delete, close."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    async def load(self, session_id: str) -> dict[str, Any] | None:
        return self.data.get(session_id)

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        self.data[session_id] = data

    async def delete(self, session_id: str) -> None:
        self.data.pop(session_id, None)

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("store", [MemorySessionStore, OldStyleStore])
async def test_an_owner_keeps_at_most_the_bound_and_the_oldest_go(store: type) -> None:
    backing = store()
    book = ConversationBook(backing, max_conversations=2)
    made = [await book.create_conversation(ANN, [message_item("user", f"q{i}")]) for i in range(3)]
    listed = await book.conversations(ANN)
    assert [c["id"] for c in listed] == [made[2]["id"], made[1]["id"]]
    assert await book.conversation(ANN, made[0]["id"]) is None  # deleted from the store too
    assert listed[0]["title"] == "q2"


async def test_owners_are_kept_apart() -> None:
    book = ConversationBook(MemorySessionStore())
    mine = await book.create_conversation(ANN, [message_item("user", "secret")])
    assert await book.conversation(BEN, mine["id"]) is None
    assert await book.update_conversation(BEN, mine["id"], title="stolen") is None
    assert not await book.delete_conversation(BEN, mine["id"])
    assert await book.conversations(BEN) == []
    assert (await book.conversation(ANN, mine["id"]) or {}).get("title") == "secret"


async def test_a_chain_with_a_deleted_link_names_it() -> None:
    book = ConversationBook(MemorySessionStore())
    first = {
        "id": "resp_1",
        "input_items": [message_item("user", "a")],
        "output": [message_item("assistant", "b")],
    }
    second = {**first, "id": "resp_2", "previous_response_id": "resp_1"}
    await book.save_response(ANN, first)
    await book.save_response(ANN, second)
    history = await book.history(ANN, "resp_2")
    assert history is not None and [item["role"] for item in history] == ["user", "assistant"] * 2
    assert await book.history(BEN, "resp_2") is None
    await book.delete_response(ANN, "resp_1")
    with pytest.raises(LookupError, match="resp_1"):
        await book.history(ANN, "resp_2")


class YieldingStore(OldStyleStore):
    """Gives way to other tasks on every call, as a store over the network does."""

    async def load(self, session_id: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        return await super().load(session_id)

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        await super().save(session_id, data)


async def test_many_writers_at_once_lose_no_conversation() -> None:
    book = ConversationBook(YieldingStore())
    made = await asyncio.gather(
        *(book.create_conversation(ANN, [message_item("user", f"q{i}")]) for i in range(25))
    )
    created = await book.conversations(ANN)
    assert sorted(c["id"] for c in created) == sorted(c["id"] for c in made)
    await asyncio.gather(*(book.update_conversation(ANN, c["id"], title=f"t{i}") for i, c in enumerate(made)))
    listed = await book.conversations(ANN)
    assert sorted(c["id"] for c in listed) == sorted(c["id"] for c in made)
    assert {c["title"] for c in listed} == {f"t{i}" for i in range(25)}
