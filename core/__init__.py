"""chatstream: serve language models as multi-user streaming chat, extended with plugins.

The names below are the public API for users and plugin authors; other modules may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl
from .prompt import AbstractChatPrompt, ChatContent
from .types import (
    Engine,
    EngineConfig,
    FinishedReason,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    LogitsProcessor,
    RowInfo,
    TextDelta,
)

if TYPE_CHECKING:  # pragma: no cover
    from .chatstream import ChatStream, ChatStreamError
    from .loadtime import LoadTime
    from .mock_transformer import MockTransformer
    from .plugins.handlers.simple_session import SimpleSessionRequestHandler
    from .sessions import AbstractRequestHandler, ChatSession, SessionStore
    from .settings import Settings

__all__ = [
    "AbstractChatPrompt",
    "AbstractRequestHandler",
    "ChatContent",
    "ChatSession",
    "ChatStream",
    "ChatStreamError",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "FinishedReason",
    "GenerationParams",
    "GenerationRequest",
    "LoadTime",
    "LogitsProcessor",
    "MockTransformer",
    "RowInfo",
    "SessionStore",
    "Settings",
    "SimpleSessionRequestHandler",
    "TextDelta",
    "hookimpl",
]

# Heavier names load on first use, so `import chatstream` (and the CLI) stays fast.
_LAZY = {
    "ChatStream": ".chatstream",
    "ChatStreamError": ".chatstream",
    "LoadTime": ".loadtime",
    "MockTransformer": ".mock_transformer",
    "SimpleSessionRequestHandler": ".plugins.handlers.simple_session",
    "AbstractRequestHandler": ".sessions",
    "ChatSession": ".sessions",
    "SessionStore": ".sessions",
    "Settings": ".settings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chatstream' has no attribute {name!r}")
