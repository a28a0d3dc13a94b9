"""The streaming HTTP response every transport uses for answers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Send

from .errors import StreamAborted


class ChatStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that always closes its body iterator and then runs ``finalizer``,
    even when the client left before the body started, so a vanished client frees its slot.

    With ``send_timeout_s``, a client that reads nothing for that long (the server's send waits on
    full socket buffers) is treated as gone: the stream ends unfinished and the slot is freed, so a
    client that stops reading without closing cannot hold a slot forever.
    """

    def __init__(
        self,
        content: Any,
        *,
        finalizer: Callable[[], Awaitable[None]] | None = None,
        send_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.finalizer = finalizer
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send: Send) -> None:
        timeout = self.send_timeout_s

        async def send_in_time(message: Message) -> None:
            with anyio.fail_after(timeout):
                await send(message)

        try:
            await super().stream_response(send if timeout is None else send_in_time)
        except StreamAborted:
            # Return without the last body message: the server closes the connection unfinished
            # (uvicorn logs one line, "returned without completing response"); the cause is logged.
            pass
        except TimeoutError:
            logging.getLogger("chatstream").warning(
                "a client read nothing for %.0f s (client_read_timeout_s): its stream was ended", timeout
            )
        finally:
            with anyio.CancelScope(shield=True):
                closer = getattr(self.body_iterator, "aclose", None)
                try:
                    if closer is not None:
                        await closer()
                finally:
                    if self.finalizer is not None:
                        finalizer, self.finalizer = self.finalizer, None
                        await finalizer()
