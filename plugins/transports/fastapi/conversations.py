"""A browser session's conversations over HTTP: list, create, open, rename, delete, and read one.

A session (its signed cookie) has many conversations, kept in the session store
(:mod:`chatstream.conversations`); one is current, and ``/chat_stream`` continues it exactly as
before. ``POST /chat_stream`` with ``conversation_id`` continues that one instead (it becomes
current). All of them answer under the role API name ``conversations``.

- ``GET /conversations``: ``{"conversations": [{"id", "title", "created_at", "updated_at"}],
  "current": id or null}``, most recently updated first.
- ``POST /conversations`` (``{"title": ...}`` optional): a new, empty conversation, now current.
- ``GET /conversations/{id}``: ``{"id", "title", "created_at", "updated_at", "current",
  "messages": [{"id", "role", "message"}]}``.
- ``POST /conversations/{id}/open``: make it current; answers as ``GET``.
- ``POST /conversations/{id}`` (``{"title": ...}``): rename it.
- ``DELETE /conversations/{id}``: delete it; when it was current, the next message starts a new one.

Another session's conversation ids answer 404 ``unknown_conversation``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatstream.chatstream import ChatStream
from chatstream.conversations import unknown_conversation
from chatstream.errors import ChatStreamError, check_unicode
from chatstream.sessions import ChatSession

from .bodies import parse_body, respond

MAX_TITLE = 200


def _tidy_title(value: str) -> str:
    value = " ".join(check_unicode(value).split())
    if not value:
        raise ValueError("a title needs a visible character")
    return value


class TitleBody(BaseModel):
    """``{"title": ...}``: a conversation's name (spaces tidied; blank is refused)."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=MAX_TITLE)

    _tidy = field_validator("title")(_tidy_title)


class NewConversationBody(BaseModel):
    """``{}`` or ``{"title": ...}``: a new conversation, named now or by its first question."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, min_length=1, max_length=MAX_TITLE)

    _tidy = field_validator("title")(lambda value: None if value is None else _tidy_title(value))


def _not_busy(cs: ChatStream, session: ChatSession) -> None:
    if cs.is_generating(session.id):
        raise ChatStreamError(409, "session_busy", "an answer is being generated; stop it first")


def _owner(cs: ChatStream, session: ChatSession) -> str:
    owner = cs.conversation_owner(session)
    if owner is None:
        raise ChatStreamError(
            409, "stateless", "this request handler keeps no session, so it keeps no conversations"
        )
    return owner


def _view(cs: ChatStream, session: ChatSession, record: dict[str, Any]) -> dict[str, Any]:
    prompt = cs.restore_prompt(record.get("prompt") or {})
    return {
        "id": record["id"],
        "title": record.get("title", ""),
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
        "current": record["id"] == session.conversation_id,
        "messages": [{"id": c.id, "role": c.role, "message": c.message} for c in prompt.get_contents()],
    }


async def list_conversations(cs: ChatStream, request: Request) -> Response:
    """GET: this session's conversations, most recently updated first, and the current one's id."""
    session = await cs.open_session(request)
    owner = cs.conversation_owner(session)
    found = [] if owner is None or session.is_new else await cs.conversations.conversations(owner)
    return respond(cs, session, {"conversations": found, "current": session.conversation_id})


async def new_conversation(cs: ChatStream, request: Request) -> Response:
    """POST: start a new, empty conversation (``{"title": ...}`` optional); it becomes current."""
    body = await parse_body(request, NewConversationBody)
    session = await cs.open_session(request)
    owner = _owner(cs, session)
    _not_busy(cs, session)
    async with cs.session_lock(session.id):
        session.prompt = cs.new_prompt()
        state = {"prompt": session.prompt.to_dict(), "generation_params": dict(session.generation_params)}
        record = await cs.conversations.create_conversation(owner, title=body.title or "", extra=state)
        session.conversation_id = record["id"]
        await cs.save_session(request, session)
    return respond(cs, session, _view(cs, session, record), status=201)


async def get_conversation(cs: ChatStream, request: Request) -> Response:
    """GET: one of this session's conversations, with its messages."""
    session = await cs.open_session(request)
    record = await cs.session_conversation(session, request.path_params["conversation_id"])
    return respond(cs, session, _view(cs, session, record))


async def open_conversation(cs: ChatStream, request: Request) -> Response:
    """POST: make one of this session's conversations the current one; answers with its messages."""
    conversation_id = request.path_params["conversation_id"]
    session = await cs.open_session(request)
    _owner(cs, session)
    _not_busy(cs, session)
    async with cs.session_lock(session.id):
        record = await cs.open_conversation(session, conversation_id)
        await cs.request_handler.save_session(request, session)  # the record is unchanged: the session only
    return respond(cs, session, _view(cs, session, record))


async def rename_conversation(cs: ChatStream, request: Request) -> Response:
    """POST ``{"title": ...}``: rename one of this session's conversations."""
    conversation_id = request.path_params["conversation_id"]
    body = await parse_body(request, TitleBody)
    session = await cs.open_session(request)
    owner = _owner(cs, session)
    record = await cs.conversations.update_conversation(owner, conversation_id, title=body.title)
    if record is None or "prompt" not in record:
        raise unknown_conversation(conversation_id)
    return respond(cs, session, _view(cs, session, record))


async def delete_conversation(cs: ChatStream, request: Request) -> Response:
    """DELETE: one of this session's conversations; when it was current, a new one starts."""
    conversation_id = request.path_params["conversation_id"]
    session = await cs.open_session(request)
    owner = _owner(cs, session)
    current = conversation_id == session.conversation_id
    if current:
        _not_busy(cs, session)
    async with cs.session_lock(session.id):
        if not await cs.conversations.delete_conversation(owner, conversation_id):
            raise unknown_conversation(conversation_id)
        if current:
            session.prompt = cs.new_prompt()
            session.conversation_id = None
            await cs.request_handler.save_session(request, session)
    return respond(cs, session, {"deleted": True, "id": conversation_id})


# (method, path, handler); every one is checked against the role API name "conversations".
ROUTES = (
    ("GET", "/conversations", list_conversations),
    ("POST", "/conversations", new_conversation),
    ("GET", "/conversations/{conversation_id}", get_conversation),
    ("POST", "/conversations/{conversation_id}/open", open_conversation),
    ("POST", "/conversations/{conversation_id}", rename_conversation),
    ("DELETE", "/conversations/{conversation_id}", delete_conversation),
)
