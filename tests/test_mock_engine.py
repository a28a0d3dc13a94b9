"""The generator mock: canned text without a model, word by word, Japanese character by character."""

from __future__ import annotations

import time

import pytest

from chatstream.plugins.engines.mock import MockEngine, split_mock_tokens
from chatstream.types import FinishReason, GenerationParams, GenerationRequest


async def stream(engine: MockEngine, **request: object) -> list[str]:
    out = []
    async for delta in engine.generate(GenerationRequest(prompt="p", **request)):
        out.append(delta.text)
    return out


async def test_round_cycles_through_its_texts() -> None:
    engine = MockEngine({"type": "round", "texts": ["one two", "three"]})
    answers = ["".join(await stream(engine)) for _ in range(3)]
    assert answers == ["one two", "three", "one two"]


async def test_japanese_streams_per_character_and_english_per_word() -> None:
    assert split_mock_tokens("Hello big world") == ["Hello", " big", " world"]
    assert split_mock_tokens("日本語です") == ["日", "本", "語", "で", "す"]
    pieces = await stream(MockEngine({"type": "round", "texts": ["こんにちは世界"]}))
    assert pieces[:-1] == list("こんにちは世界") and pieces[-1] == ""


async def test_echo_repeats_the_last_user_message() -> None:
    engine = MockEngine({"type": "echo"})
    messages = [
        {"role": "user", "content": "old"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "say this back"},
    ]
    assert "".join(await stream(engine, messages=messages)) == "say this back"


async def test_long_is_long_and_max_new_tokens_cuts_it_with_length() -> None:
    engine = MockEngine({"type": "long"})
    deltas = [d async for d in engine.generate(GenerationRequest("p", GenerationParams(max_new_tokens=5)))]
    assert len([d for d in deltas if d.text]) == 5
    assert deltas[-1].finish_reason == FinishReason.LENGTH
    full = [d async for d in MockEngine({"type": "round", "texts": ["a b"]}).generate(GenerationRequest("p"))]
    assert full[-1].finish_reason == FinishReason.STOP


async def test_initial_wait_and_per_token_delay() -> None:
    engine = MockEngine(
        {"type": "round", "texts": ["a b c"], "initial_wait_sec": 0.2, "time_per_token_sec": 0.05}
    )
    start = time.monotonic()
    await stream(engine)
    assert time.monotonic() - start >= 0.2 + 3 * 0.05


def test_bad_mock_params_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"'mock_params\.type': .*\(got 'loop'\)"):
        MockEngine({"type": "loop"})
    with pytest.raises(
        ValueError, match=r"'mock_params\.time_per_tokn': unknown option; known options: type, "
    ):
        MockEngine({"type": "round", "time_per_tokn": 1})
    with pytest.raises(
        ValueError, match=r"'mock_params\.initial_wait_sec': .*greater than or equal to 0 \(got -1\)"
    ):
        MockEngine({"type": "round", "initial_wait_sec": -1})
