"""The ``stateless`` request handler: the client sends the whole conversation; nothing is stored.

Body of ``POST /chat_stream``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}],
"user_input": "..."}``. The earlier messages become the history the new answer sees.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request

from chatstream.errors import ChatStreamError, check_unicode, field_error
from chatstream.hookspecs import hookimpl
from chatstream.options import NoOptions
from chatstream.sessions import AbstractRequestHandler, ChatSession

MAX_MESSAGES = 1000


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str

    _unicode = field_validator("content")(check_unicode)


class StatelessBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES)


class StatelessRequestHandler(AbstractRequestHandler):
    """History comes with each request (``messages``); sessions are never stored or cookied."""

    async def open_session(self, request: Request) -> ChatSession:
        assert self.chatstream is not None
        try:
            data = json.loads(await request.body() or b"{}")
            body = StatelessBody.model_validate(data if isinstance(data, dict) else {})
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ChatStreamError(400, "invalid_json", "the body must be JSON") from None
        except ValidationError as exc:
            raise field_error(exc) from None
        prompt = self.chatstream.new_prompt()
        limit = self.chatstream.settings.max_input_chars
        for message in body.messages:
            if len(message.content) > limit:
                raise ChatStreamError(
                    413, "input_too_long", f"a message has more than {limit} characters", field="messages"
                )
            if message.role == "system":
                prompt.set_system(message.content)
            elif message.role == "user":
                prompt.add_requester_msg(message.content)
            else:
                prompt.add_responder_msg(message.content)
        return ChatSession(None, prompt)

    async def save_session(self, request: Request, session: ChatSession) -> None:
        return None


@hookimpl(trylast=True)
def register_request_handlers(register: Any) -> None:
    register("stateless", StatelessRequestHandler, options=NoOptions)
