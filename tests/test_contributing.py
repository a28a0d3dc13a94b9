"""CONTRIBUTING.md stays true: every hook is documented and the processor example works."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from chatstream import ChatStream, GenerationParams, GenerationRequest, hookspecs
from chatstream.pipeline import processor_registry
from chatstream.settings import SettingsError, load_settings
from chatstream.testing import isolated_plugins

ROOT = Path(__file__).resolve().parents[1]
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")


HOOKS = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "chatstream_spec")]


def full_signature(name: str) -> str:
    """``name(arg: Type, ...) -> Return`` as hookspecs.py declares it."""
    signature = inspect.signature(getattr(hookspecs, name))
    args = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"{name}({args}) -> {signature.return_annotation}"


def test_every_hook_is_documented_with_its_full_signature() -> None:
    assert len(HOOKS) >= 11
    missing = [full_signature(name) for name in HOOKS if f"`{full_signature(name)}`" not in CONTRIBUTING]
    assert not missing, "document these hooks in CONTRIBUTING.md's hook reference:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("hook", "keys"),
    [("on_request_finished", hookspecs.RequestFinishedInfo), ("on_feedback", hookspecs.Feedback)],
)
def test_every_key_an_event_hook_receives_is_documented(hook: str, keys: type) -> None:
    docstring = getattr(hookspecs, hook).__doc__ or ""
    reference = CONTRIBUTING[CONTRIBUTING.index(f"`{full_signature(hook)}`") :].split("\n- ", 1)[0]
    for key in keys.__annotations__:
        assert f"``{key}``" in docstring, f"{hook}'s docstring omits {key!r}"
        assert f"`{key}`" in reference, f"CONTRIBUTING.md's entry for {hook} omits {key!r}"


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"token_id": [42]},
            r"'sampling\.processors\.banned_words\.token_id': unknown option; known options: token_ids",
        ),
        (
            {"token_ids": ["x"]},
            r"'sampling\.processors\.banned_words\.token_ids\[0\]': .*integer.*\(got 'x'\)",
        ),
    ],
)
def test_banned_words_example_refuses_bad_options_by_their_full_path(
    banned_words: Any, tiny_model: Any, options: dict[str, Any], message: str
) -> None:
    model, tokenizer = tiny_model
    settings = load_settings(sampling={"pipeline": ["banned_words"], "processors": {"banned_words": options}})
    with pytest.raises(SettingsError, match=message):
        ChatStream(
            model=model, tokenizer=tokenizer, plugins=isolated_plugins(banned_words), settings=settings
        )
