"""Sessions: who is asking (request handlers) and where their conversation lives (stores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from starlette.requests import Request
    from starlette.responses import Response

    from .chatstream import ChatStream
    from .prompt import AbstractChatPrompt


@runtime_checkable
class SessionStore(Protocol):
    """Keeps one JSON-able dict per session id. ``save`` replaces the whole record atomically."""

    async def load(self, session_id: str) -> dict[str, Any] | None: ...

    async def save(self, session_id: str, data: dict[str, Any]) -> None: ...

    async def delete(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


@dataclass
class ChatSession:
    """One user's conversation for the length of a request."""

    id: str | None  # None: nothing is stored (stateless requests)
    prompt: AbstractChatPrompt
    generation_params: dict[str, Any] = field(default_factory=dict)
    is_new: bool = False
    # The session's current conversation among its stored ones (chatstream.conversations);
    # None until its first answer is saved.
    conversation_id: str | None = None

    def to_record(self) -> dict[str, Any]:
        """What a store keeps for this session."""
        record: dict[str, Any] = {
            "prompt": self.prompt.to_dict(),
            "generation_params": dict(self.generation_params),
        }
        if self.conversation_id is not None:
            record["conversation_id"] = self.conversation_id
        return record


class SessionConflict(Exception):
    """The session already has a generation in progress."""


class AbstractRequestHandler:
    """Decides who is asking and where their history lives.

    Subclass it and override ``open_session`` (find or create the conversation for a request),
    ``save_session`` (keep it) and optionally ``finish_response`` (e.g. set a cookie).
    """

    chatstream: ChatStream | None = None

    def bind(self, chatstream: ChatStream) -> None:
        """Called once by the ``ChatStream`` that uses this handler."""
        self.chatstream = chatstream

    async def open_session(self, request: Request) -> ChatSession:
        raise NotImplementedError

    async def save_session(self, request: Request, session: ChatSession) -> None:
        raise NotImplementedError

    async def refresh_session(self, request: Request | None, session: ChatSession) -> None:
        """Re-read what other requests may have changed in the stored session (its generation
        parameters) into ``session``, right before a turn saves it. Default: nothing."""
        return None

    async def clear_session(self, request: Request, session: ChatSession) -> None:
        """Forget the conversation (the session itself stays)."""
        session.prompt.clear_history()
        await self.save_session(request, session)

    def finish_response(self, response: Response, session: ChatSession) -> None:
        """Adjust the response before it is sent (default: nothing)."""
        return None
