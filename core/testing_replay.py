"""Test-kit fixture that serves a recording: ``replay_chatstream(dir, **options)``.

``chatstream.testing`` re-exports the fixture, so it is available wherever the test kit is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from .plugin_manager import LoadedPlugins


def make_replay_chatstream(
    dirname: str | os.PathLike[str],
    *,
    fallback: str = "error",
    timing: str = "none",
    plugins: LoadedPlugins | None = None,
    **options: Any,
) -> Any:
    """A ``ChatStream`` replaying ``dirname`` through ``MockTransformer`` stand-ins, with isolated plugins.

    ``fallback`` and ``timing`` are the replay engine's options; ``options`` are ChatStream's
    (pass the generation settings used when recording, e.g. ``temperature=0``).
    """
    from .chatstream import ChatStream
    from .mock_transformer import MockTransformer
    from .testing import isolated_plugins

    mock = MockTransformer(dirname, fallback=fallback, timing=timing)
    return ChatStream(
        model=mock.model, tokenizer=mock.tokenizer, plugins=plugins or isolated_plugins(), **options
    )


@pytest.fixture
def replay_chatstream() -> Callable[..., Any]:
    """Factory: ``replay_chatstream(dir, fallback="error", timing="none", **options)`` -> a ChatStream."""
    return make_replay_chatstream
