"""The ``mock`` engine plugin: registers the generator mock (:mod:`chatstream.mock_engine`),
which streams canned text with no model loaded (``use_mock_response=True``)."""

from __future__ import annotations

from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.mock_engine import DEFAULT_TEXTS, LONG_TEXT, MOCK_TYPES, MockEngine, split_mock_tokens
from chatstream.types import EngineConfig

__all__ = [
    "DEFAULT_TEXTS",
    "LONG_TEXT",
    "MOCK_TYPES",
    "MockEngine",
    "create_mock_engine",
    "split_mock_tokens",
]


def create_mock_engine(config: EngineConfig) -> MockEngine:
    """Engine factory for ``engine = "mock"``."""
    return MockEngine(config.mock_params or config.options)


@hookimpl
def register_engines(register: Any) -> None:
    """Register the ``mock`` engine."""
    register("mock", create_mock_engine)
