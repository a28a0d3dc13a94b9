"""CONTRIBUTING.md stays true: every hook is documented and the processor example works."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from chatstream import ChatStream, GenerationParams, GenerationRequest, hookspecs
from chatstream.pipeline import processor_registry
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins

ROOT = Path(__file__).resolve().parents[1]
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")


def test_every_hook_is_documented_for_plugin_authors() -> None:
    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "chatstream_spec")]
    assert len(hooks) >= 10
    missing = [name for name in hooks if f"`{name}(" not in CONTRIBUTING]
    assert not missing, f"hooks missing from CONTRIBUTING.md: {missing}"


@pytest.fixture
def banned_words(tmp_path: Path) -> Any:
    match = re.search(r"```python\n(# banned_words\.py\n.*?)```", CONTRIBUTING, re.S)
    assert match, "the banned-words example is gone from CONTRIBUTING.md"
    path = tmp_path / "banned_words.py"
    path.write_text(match.group(1))
    spec = importlib.util.spec_from_file_location("banned_words", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("banned_words", None)
    return module


async def greedy_ids(cs: ChatStream, prompt: str) -> list[int]:
    await cs.start()
    request = GenerationRequest(prompt=prompt, params=GenerationParams(temperature=0, max_new_tokens=12))
    ids: list[int] = []
    async for chunk in cs.engine.generate_ids(request):
        ids.extend(chunk)
    await cs.close()
    return ids


async def test_banned_words_example_bans_tokens_in_the_engine(banned_words: Any, tiny_model: Any) -> None:
    model, tokenizer = tiny_model
    plugins = isolated_plugins(banned_words)
    assert "banned_words" in processor_registry(plugins.pm)
    prompt = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"

    plain = ChatStream(model=model, tokenizer=tokenizer, plugins=plugins, settings=load_settings())
    before = await greedy_ids(plain, prompt)
    assert before

    banned = sorted(set(before[:3]))
    settings = load_settings(
        sampling={
            "pipeline": ["banned_words", "repetition", "temperature", "top_k", "top_p"],
            "processors": {"banned_words": {"token_ids": banned}},
        }
    )
    cs = ChatStream(
        model=model, tokenizer=tokenizer, plugins=isolated_plugins(banned_words), settings=settings
    )
    after = await greedy_ids(cs, prompt)
    assert after and not set(after) & set(banned)
