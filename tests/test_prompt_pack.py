"""The community pack contrib_prompts/chatstream-prompts-ja-neox loads like any third-party plugin."""

from __future__ import annotations

import importlib.metadata

import pytest

from chatstream.plugin_manager import LoadedPlugins, load_plugins
from chatstream.prompt_formats import prompt_format_registry, select_prompt_format

DIST = "chatstream-prompts-ja-neox"
ENTRY_POINT = "prompts-ja-neox"


@pytest.fixture(scope="module")
def loaded() -> LoadedPlugins:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed: pip install ./contrib_prompts/{DIST}")
    return load_plugins(builtins=(), load=[ENTRY_POINT], strict=True)


def test_pack_formats_are_listed_with_the_pack_as_their_plugin(loaded: LoadedPlugins) -> None:
    formats = prompt_format_registry(loaded.pm)
    assert {"redpajama", "rinna-neox-sft", "line-sft", "dolly"} <= set(formats)
    assert {formats[name].plugin for name in ("redpajama", "rinna-neox-sft")} == {ENTRY_POINT}
    assert loaded.dist_of[ENTRY_POINT][0] == DIST


def test_pack_formats_are_picked_by_model_id(loaded: LoadedPlugins) -> None:
    formats = prompt_format_registry(loaded.pm)
    chosen, _ = select_prompt_format(formats, model_id="togethercomputer/RedPajama-INCITE-Chat-3B-v1")
    assert chosen.name == "redpajama"
    chosen, _ = select_prompt_format(formats, model_id="rinna/japanese-gpt-neox-3.6b-instruction-sft-v2")
    assert chosen.name == "rinna-neox-sft"
