"""``SimpleSessionRequestHandler``: one conversation per browser, found by a signed session cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING, Any

from pydantic import Field

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions
from chatstream.sessions import AbstractRequestHandler, ChatSession

if TYPE_CHECKING:  # pragma: no cover
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger(__name__)

COOKIE_NAME = "chatstream_session"


class SimpleSessionOptions(PluginOptions):
    """``plugin_config.simple_session``."""

    secret: str | None = Field(
        None, min_length=1, description="signs the cookie; default: the session_secret setting"
    )
    cookie_name: str = Field(
        COOKIE_NAME, pattern=r"^[A-Za-z0-9_-]+$", description="the session cookie's name"
    )
    secure: bool = Field(False, description="send the cookie over HTTPS only")


def _sign(secret: bytes, value: str) -> str:
    digest = hmac.new(secret, value.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class SimpleSessionRequestHandler(AbstractRequestHandler):
    """Keeps each browser's conversation in the session store, keyed by a signed cookie.

    The cookie holds a random id and its HMAC; it is HttpOnly and SameSite=Lax. The secret comes
    from the ``session_secret`` setting; when unset, a random per-process secret is used (sessions
    then do not survive a restart or span replicas) and a warning says so.
    """

    def __init__(
        self, secret: str | None = None, cookie_name: str = COOKIE_NAME, secure: bool = False
    ) -> None:
        self._secret = secret.encode() if secret else None
        self.cookie_name = cookie_name
        self.secure = secure

    def bind(self, chatstream: Any) -> None:
        super().bind(chatstream)
        if self._secret is None:
            configured = chatstream.settings.session_secret
            if configured is not None:
                self._secret = configured.get_secret_value().encode()
            else:
                log.warning(
                    "session_secret is not set: using a random secret for this process; sessions will not "
                    "survive a restart. Set CHATSTREAM_SESSION_SECRET to a long random string."
                )
                self._secret = secrets.token_bytes(32)

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            raise RuntimeError("SimpleSessionRequestHandler is not bound to a ChatStream yet")
        return self._secret

    def session_id_of(self, request: Request) -> str | None:
        """The verified session id from the request's cookie, or None (missing or tampered)."""
        raw = request.cookies.get(self.cookie_name)
        # Any bytes may come in a cookie; only a well-formed one can be ours (compare_digest
        # refuses non-ASCII text).
        if not raw or not raw.isascii() or raw.count(".") != 1:
            return None
        session_id, signature = raw.split(".")
        if not hmac.compare_digest(signature, _sign(self.secret, session_id)):
            return None
        return session_id

    async def open_session(self, request: Request) -> ChatSession:
        assert self.chatstream is not None
        session_id = self.session_id_of(request)
        record = await self.chatstream.session_store.load(session_id) if session_id else None
        if session_id is None or record is None:
            return ChatSession(
                session_id or secrets.token_urlsafe(24), self.chatstream.new_prompt(), is_new=True
            )
        prompt = self.chatstream.restore_prompt(record.get("prompt") or {})
        conversation = record.get("conversation_id")
        return ChatSession(
            session_id,
            prompt,
            dict(record.get("generation_params") or {}),
            conversation_id=conversation if isinstance(conversation, str) else None,
        )

    async def refresh_session(self, request: Request | None, session: ChatSession) -> None:
        assert self.chatstream is not None
        if session.id is None:
            return
        record = await self.chatstream.session_store.load(session.id)
        if record is not None:
            session.generation_params = dict(record.get("generation_params") or {})

    async def save_session(self, request: Request, session: ChatSession) -> None:
        assert self.chatstream is not None and session.id is not None
        await self.chatstream.session_store.save(session.id, session.to_record())

    def finish_response(self, response: Response, session: ChatSession) -> None:
        if session.id is None:
            return
        response.set_cookie(
            self.cookie_name,
            f"{session.id}.{_sign(self.secret, session.id)}",
            httponly=True,
            samesite="lax",
            secure=self.secure,
            max_age=30 * 24 * 3600,
        )


@hookimpl(trylast=True)
def register_request_handlers(register: Any) -> None:
    register("simple_session", SimpleSessionRequestHandler, options=SimpleSessionOptions)
