"""``AbstractChatPrompt``: a conversation plus the rules that render it in one model's format.

Subclass it the documented way: set role names in ``__init__`` and override ``create_prompt``
(and ``get_stop_strs``). Instances are per conversation and serialise with ``to_dict`` /
``from_dict`` so session stores can persist them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

ROLE_SYSTEM = "system"
ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"


def new_message_id() -> str:
    """A fresh message id (opaque string)."""
    return uuid.uuid4().hex


@dataclass
class ChatContent:
    """One message: who said it and what. ``message`` is None for an answer still being generated."""

    role: str
    message: str | None
    id: str = field(default_factory=new_message_id)

    def get_role(self) -> str:
        return self.role

    def get_message(self) -> str | None:
        return self.message

    def set_message(self, message: str | None) -> None:
        self.message = message


class AbstractChatPrompt:
    """Base class of every prompt format.

    Class attributes a format may set: ``stop_strs`` (strings that end the model's turn),
    ``default_system`` (system prompt used when none is set), ``add_special_tokens`` (whether the
    tokenizer should add BOS to the rendered text; None leaves the tokenizer's default).
    """

    stop_strs: tuple[str, ...] = ()
    default_system: str | None = None
    add_special_tokens: bool | None = None

    def __init__(self) -> None:
        self.system: str | None = self.default_system
        self.chat_contents: list[ChatContent] = []
        self.requester = ROLE_USER
        self.responder = ROLE_ASSISTANT
        self.chat_mode = True
        self.prompt_ttl: int | None = None  # keep only the last N exchanges when set

    # -- roles and system -------------------------------------------------------------------------
    def set_system(self, system: str | None) -> None:
        """Set the system prompt (None removes it)."""
        self.system = system

    def set_requester(self, requester: str) -> None:
        """Set the name the format uses for the user's role."""
        self.requester = requester

    def set_responder(self, responder: str) -> None:
        """Set the name the format uses for the model's role."""
        self.responder = responder

    def set_chat_mode_enabled(self, enabled: bool) -> None:
        """False renders only the latest request (task prompts such as translation)."""
        self.chat_mode = enabled

    def set_prompt_ttl(self, ttl: int | None) -> None:
        """Keep only the last ``ttl`` exchanges when rendering (1 = single turn)."""
        self.prompt_ttl = ttl

    # -- the conversation ---------------------------------------------------------------------------
    def add_requester_msg(self, message: str) -> ChatContent:
        """Append a user message and return it."""
        content = ChatContent(self.requester, message)
        self.chat_contents.append(content)
        return content

    def add_responder_msg(self, message: str | None) -> ChatContent:
        """Append a model message; None marks the answer about to be generated."""
        content = ChatContent(self.responder, message)
        self.chat_contents.append(content)
        return content

    def set_responder_last_msg(self, message: str) -> None:
        """Fill in (or replace) the text of the last model message."""
        last = self._last_responder()
        if last is None:
            raise ValueError("there is no responder message to set; call add_responder_msg first")
        last.message = message

    def clear_last_responder_message(self) -> None:
        """Empty the last model message (to generate it again)."""
        last = self._last_responder()
        if last is not None:
            last.message = None

    def remove_last_requester_msg(self) -> None:
        """Remove the last user message and anything after it."""
        for index in range(len(self.chat_contents) - 1, -1, -1):
            if self.chat_contents[index].role == self.requester:
                del self.chat_contents[index:]
                return

    def clear_history(self) -> None:
        """Forget every message (the system prompt stays)."""
        self.chat_contents.clear()

    def get_contents(self) -> list[ChatContent]:
        """The messages, oldest first."""
        return self.chat_contents

    def get_turn(self) -> int:
        """How many user messages the conversation has."""
        return sum(1 for content in self.chat_contents if content.role == self.requester)

    def _last_responder(self) -> ChatContent | None:
        if self.chat_contents and self.chat_contents[-1].role == self.responder:
            return self.chat_contents[-1]
        return None

    def visible_contents(self) -> list[ChatContent]:
        """The messages the prompt renders, after chat mode and the prompt TTL are applied."""
        contents = self.chat_contents
        keep = 1 if not self.chat_mode else self.prompt_ttl
        if keep is not None:
            starts = [i for i, c in enumerate(contents) if c.role == self.requester]
            if len(starts) > keep:
                contents = contents[starts[-keep] :]
        return list(contents)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style role/content dicts (pending answer excluded)."""
        out: list[dict[str, str]] = []
        if self.system is not None:
            out.append({"role": ROLE_SYSTEM, "content": self.system})
        for content in self.visible_contents():
            if content.message is None:
                continue
            role = ROLE_USER if content.role == self.requester else ROLE_ASSISTANT
            out.append({"role": role, "content": content.message})
        return out

    # -- rendering ---------------------------------------------------------------------------------
    def create_prompt(self) -> str:
        """Render the conversation; the text ends where the model should continue."""
        raise NotImplementedError(f"{type(self).__name__} must implement create_prompt()")

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt | None = None) -> str:
        """Render the prompt for a conversation with no messages yet (system prompt only)."""
        return (chat_prompt or self).create_prompt()

    def get_stop_strs(self) -> list[str]:
        """Strings that end the model's turn; never shown to the user."""
        return list(self.stop_strs)

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` restores exactly."""
        return {
            "format": type(self).__qualname__,
            "system": self.system,
            "requester": self.requester,
            "responder": self.responder,
            "chat_mode": self.chat_mode,
            "prompt_ttl": self.prompt_ttl,
            "contents": [{"role": c.role, "message": c.message, "id": c.id} for c in self.chat_contents],
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Replace this conversation with one from ``to_dict``."""
        self.system = data.get("system")
        self.requester = data.get("requester", self.requester)
        self.responder = data.get("responder", self.responder)
        self.chat_mode = bool(data.get("chat_mode", True))
        self.prompt_ttl = data.get("prompt_ttl")
        self.chat_contents = [ChatContent(c["role"], c["message"], c["id"]) for c in data.get("contents", [])]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbstractChatPrompt:
        """A new prompt of this class holding the conversation from ``to_dict``."""
        prompt = cls()
        prompt.load_dict(data)
        return prompt
