"""Conversations and stored responses as first-class objects, kept in the session store.

An owner (an API key, or a browser's cookie session) has conversations (``conv_...``: metadata and
a list of message items) and stored responses (``resp_...``: one model answer with its input
items, linked to the one before it by ``previous_response_id``). They live in whatever session
store is configured (memory, SQLite, Redis or a third party's), through the store's plain
``load``/``save``/``delete``, so every store keeps working unchanged and SQLite and Redis keep them
across restarts and replicas. Each record names its owner; another owner's id reads as missing.

An owner's index record lists its conversations (newest first, with title and times) and responses,
so listing needs one read; beyond ``max_conversations`` / ``max_responses`` the oldest are deleted.
Records expire with the store's TTL. Writes for one owner are serialized within a process; two
replicas adding to one owner's index at the same instant can lose one index entry (the records
themselves are each written atomically): give an owner's requests affinity to one replica when that
matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import ChatStreamError
from .sessions import SessionStore

OWNER_KEY = "owner:"
CONVERSATION_KEY = "conversation:"
RESPONSE_KEY = "response:"
MAX_CHAIN = 1000  # previous_response_id links followed at most
TITLE_CHARS = 80


def owner_of(kind: str, secret: str) -> str:
    """A stable, opaque owner id for a credential (``key``: an API key; ``session``: a cookie
    session id); the credential itself is never stored."""
    return hashlib.sha256(f"{kind}:{secret}".encode()).hexdigest()[:32]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(
    role: str, text: str, *, item_id: str | None = None, status: str = "completed"
) -> dict[str, Any]:
    """A message item as the Responses and Conversations APIs show it."""
    part = (
        {"type": "output_text", "text": text, "annotations": []}
        if role == "assistant"
        else {
            "type": "input_text",
            "text": text,
        }
    )
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": role,
        "status": status,
        "content": [part],
    }


def item_text(item: dict[str, Any]) -> str:
    """The text of a message item (its text parts joined)."""
    return "".join(str(part.get("text", "")) for part in item.get("content", []) if isinstance(part, dict))


def short_title(text: str) -> str:
    """``text`` as a title: white space folded, at most ``TITLE_CHARS`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"


def title_of(items: Sequence[dict[str, Any]]) -> str:
    """A conversation's default title: its first user message, shortened."""
    return next((short_title(item_text(item)) for item in items if item.get("role") == "user"), "")


def first_question(prompt: Any) -> str:
    """A chat conversation's default title: its first user message, shortened."""
    contents = prompt.get_contents()
    return next((short_title(c.message) for c in contents if c.role == prompt.requester and c.message), "")


def unknown_conversation(conversation_id: str) -> ChatStreamError:
    """The 404 for a conversation id that is not the asker's (or does not exist)."""
    return ChatStreamError(
        404,
        "unknown_conversation",
        f"conversation_id {conversation_id!r} is not one of this session's conversations",
        field="conversation_id",
    )


class ConversationBook:
    """The conversations and stored responses of every owner, in one session store."""

    def __init__(
        self, store: SessionStore, *, max_conversations: int = 1000, max_responses: int = 1000
    ) -> None:
        self.store = store
        self.max_conversations = max_conversations
        self.max_responses = max_responses
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, owner: str) -> asyncio.Lock:
        lock = self._locks.get(owner)
        if lock is None:
            lock = self._locks[owner] = asyncio.Lock()
        return lock

    # -- the owner's index ------------------------------------------------------------------------
    async def _index(self, owner: str) -> dict[str, Any]:
        data = await self.store.load(OWNER_KEY + owner)
        if not isinstance(data, dict):
            data = {}
        data.setdefault("conversations", [])
        data.setdefault("responses", [])
        return data

    async def _save_index(self, owner: str, index: dict[str, Any]) -> None:
        for kind, limit, prefix in (
            ("conversations", self.max_conversations, CONVERSATION_KEY),
            ("responses", self.max_responses, RESPONSE_KEY),
        ):
            entries = index[kind]
            while len(entries) > limit:  # newest first: the oldest go
                old = entries.pop()
                await self.store.delete(prefix + (old["id"] if isinstance(old, dict) else old))
        await self.store.save(OWNER_KEY + owner, index)

    # -- conversations ----------------------------------------------------------------------------
    async def create_conversation(
        self,
        owner: str,
        items: Iterable[dict[str, Any]] = (),
        *,
        metadata: dict[str, str] | None = None,
        title: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A new conversation holding ``items``; ``extra`` keeps transport-specific state."""
        now = time.time()
        items = list(items)
        record = {
            "id": new_id("conv"),
            "owner": owner,
            "created_at": now,
            "updated_at": now,
            "metadata": dict(metadata or {}),
            "title": title if title is not None else title_of(items),
            "items": items,
            **(extra or {}),
        }
        async with self._lock(owner):
            await self.store.save(CONVERSATION_KEY + record["id"], record)
            index = await self._index(owner)
            index["conversations"].insert(0, _summary(record))
            await self._save_index(owner, index)
        return record

    async def conversation(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        """The conversation, or None when it does not exist or is another owner's."""
        if not isinstance(conversation_id, str) or not conversation_id.startswith("conv_"):
            return None
        record = await self.store.load(CONVERSATION_KEY + conversation_id)
        if not isinstance(record, dict) or record.get("owner") != owner:
            return None
        return record

    async def conversations(self, owner: str) -> list[dict[str, Any]]:
        """The owner's conversations, most recently updated first: id, title, created/updated times."""
        index = await self._index(owner)
        return sorted(index["conversations"], key=lambda entry: -float(entry.get("updated_at", 0)))

    async def update_conversation(
        self,
        owner: str,
        conversation_id: str,
        *,
        metadata: dict[str, str] | None = None,
        title: str | None = None,
        default_title: str = "",
        add_items: Sequence[dict[str, Any]] = (),
        changes: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Change a conversation (None when it is missing or not the owner's): replace its metadata
        or title (``default_title`` names it only while it has none), append items, or set other
        fields; its ``updated_at`` moves on."""
        async with self._lock(owner):
            record = await self.conversation(owner, conversation_id)
            if record is None:
                return None
            if metadata is not None:
                record["metadata"] = dict(metadata)
            if add_items:
                record["items"] = [*record.get("items", []), *add_items]
                default_title = default_title or title_of(record["items"])
            if title is not None:
                record["title"] = title
            elif default_title and not record.get("title"):
                record["title"] = default_title
            record.update(changes or {})
            record["updated_at"] = time.time()
            await self.store.save(CONVERSATION_KEY + conversation_id, record)
            index = await self._index(owner)
            index["conversations"] = [_summary(record)] + [
                entry for entry in index["conversations"] if entry.get("id") != conversation_id
            ]
            await self._save_index(owner, index)
            return record

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        """Delete the owner's conversation; False when there was none to delete."""
        async with self._lock(owner):
            if await self.conversation(owner, conversation_id) is None:
                return False
            await self.store.delete(CONVERSATION_KEY + conversation_id)
            index = await self._index(owner)
            index["conversations"] = [e for e in index["conversations"] if e.get("id") != conversation_id]
            await self._save_index(owner, index)
            return True

    # -- stored responses -------------------------------------------------------------------------
    async def save_response(self, owner: str, record: dict[str, Any]) -> None:
        """Keep a response (``record["id"]``) for its owner."""
        record = {**record, "owner": owner}
        async with self._lock(owner):
            await self.store.save(RESPONSE_KEY + record["id"], record)
            index = await self._index(owner)
            index["responses"] = [record["id"]] + [r for r in index["responses"] if r != record["id"]]
            await self._save_index(owner, index)

    async def response(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The stored response, or None when it does not exist or is another owner's."""
        if not isinstance(response_id, str) or not response_id.startswith("resp_"):
            return None
        record = await self.store.load(RESPONSE_KEY + response_id)
        if not isinstance(record, dict) or record.get("owner") != owner:
            return None
        return record

    async def delete_response(self, owner: str, response_id: str) -> bool:
        async with self._lock(owner):
            if await self.response(owner, response_id) is None:
                return False
            await self.store.delete(RESPONSE_KEY + response_id)
            index = await self._index(owner)
            index["responses"] = [r for r in index["responses"] if r != response_id]
            await self._save_index(owner, index)
            return True

    async def history(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """The items a response continues from: every earlier response's input and output, oldest
        first, then its own. None when ``response_id`` is missing; ``LookupError`` naming the link
        when a response further back was deleted or expired."""
        chain: list[dict[str, Any]] = []
        current: str | None = response_id
        while current is not None:
            record = await self.response(owner, current)
            if record is None:
                if not chain:
                    return None
                raise LookupError(current)
            chain.append(record)
            if len(chain) > MAX_CHAIN:
                raise LookupError(f"{response_id} (more than {MAX_CHAIN} links)")
            current = record.get("previous_response_id")
        items: list[dict[str, Any]] = []
        for record in reversed(chain):
            items.extend(record.get("input_items", []))
            items.extend(record.get("output", []))
        return items


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record["id"],
        "title": record.get("title", ""),
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
    }
