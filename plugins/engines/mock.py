"""The ``mock`` engine plugin: registers the generator mock (:mod:`chatstream.mock_engine`),
which streams canned text with no model loaded (``use_mock_response=True``)."""

from __future__ import annotations

from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.mock_engine import (
    DEFAULT_TEXTS,
    LONG_TEXT,
    MOCK_TYPES,
    MockEngine,
    MockParams,
    split_mock_tokens,
)
from chatstream.options import parse_options
from chatstream.types import EngineConfig

__all__ = [
    "DEFAULT_TEXTS",
    "LONG_TEXT",
    "MOCK_TYPES",
    "MockEngine",
    "MockParams",
    "create_mock_engine",
    "split_mock_tokens",
]


def create_mock_engine(config: EngineConfig) -> MockEngine:
    """Engine factory for ``engine = "mock"``: ``mock_params``, else ``plugin_config.mock``."""
    if config.mock_params:
        return MockEngine(config.mock_params)
    return MockEngine(parse_options(MockParams, config.options, "plugin_config.mock"))


@hookimpl(trylast=True)
def register_engines(register: Any) -> None:
    """Register the ``mock`` engine."""
    register("mock", create_mock_engine, options=MockParams)
