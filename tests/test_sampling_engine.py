"""The sampling pipeline from settings, running in the engine on the tiny model."""

from __future__ import annotations

from typing import Any

from chatstream import ChatStream, GenerationRequest
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins

PROMPT = "<|im_start|>user\nhello hello hello<|im_end|>\n<|im_start|>assistant\n"


async def generated_ids(tiny_model: Any, **settings: Any) -> list[int]:
    model, tokenizer = tiny_model
    cs = ChatStream(
        model=model, tokenizer=tokenizer, plugins=isolated_plugins(), settings=load_settings(**settings)
    )
    await cs.start()
    params = cs.generation_params(max_new_tokens=40)
    ids: list[int] = []
    async for chunk in cs.engine.generate_ids(GenerationRequest(prompt=PROMPT, params=params)):
        ids.extend(chunk)
    await cs.close()
    return ids


async def test_presence_penalty_from_settings_stops_repeats(tiny_model: Any) -> None:
    plain = await generated_ids(tiny_model, temperature=0)
    assert len(plain) > len(set(plain)), "greedy decoding of the tiny model should repeat tokens"
    # the documented constructor options drive the repetition penalty; a strong subtractive one
    # (over prompt and answer) forbids every token already seen
    penalised = await generated_ids(
        tiny_model, temperature=0, repetition_penalty=100.0, repetition_penalty_method="subtractive"
    )
    assert len(penalised) == len(set(penalised))


async def test_pipeline_order_and_membership_come_from_settings(tiny_model: Any) -> None:
    # without "repetition" in the pipeline the same penalty setting has no effect
    plain = await generated_ids(tiny_model, temperature=0)
    ignored = await generated_ids(
        tiny_model,
        temperature=0,
        repetition_penalty=100.0,
        repetition_penalty_method="subtractive",
        sampling={"pipeline": ["temperature", "top_k", "top_p"]},
    )
    assert ignored == plain
