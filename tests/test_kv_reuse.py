"""KV reuse across turns in the transformers engine: turn 2 computes only its new tokens, greedy
output never changes (alone or joining a running batch), eviction under a small budget, session
scopes, and a cancelled turn that leaves nothing wrong behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.plugins.engines.transformers_engine import TransformersEngine
from chatstream.settings import load_settings
from chatstream.step_loop import TokenTrace
from chatstream.testing import isolated_plugins, run_live_server
from chatstream.types import EngineConfig, GenerationParams, GenerationRequest, TextDelta

GREEDY = GenerationParams(max_new_tokens=12, temperature=0)


@pytest.fixture(params=["dynamic", "slots"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_engine(tiny_model: Any, layout: str, **options: Any) -> TransformersEngine:
    model, tokenizer = tiny_model
    config = EngineConfig(
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        max_batch_size=4,
        options={"kv_cache": layout, **options},
    )
    return TransformersEngine(config)


@pytest.fixture
async def engines(
    tiny_model: Any, layout: str
) -> AsyncIterator[tuple[TransformersEngine, TransformersEngine]]:
    """(with reuse, without reuse), started."""
    reuse, cold = make_engine(tiny_model, layout), make_engine(tiny_model, layout, prefix_cache=False)
    await reuse.start()
    await cold.start()
    yield reuse, cold
    await reuse.close()
    await cold.close()


async def answer(
    engine: TransformersEngine, ids: list[int], scope: str | None = None, params: GenerationParams = GREEDY
) -> tuple[list[int], TextDelta]:
    """(generated ids, first delta) of one greedy request (the trace gives the sampled ids)."""
    request = GenerationRequest(prompt="", params=params, prompt_ids=ids, cache_scope=scope)
    trace = TokenTrace()
    first: TextDelta | None = None
    async for delta in engine.generate(request, trace=trace):
        first = first or delta
    assert first is not None
    generated = [token for token, _, _ in trace.steps]
    if trace.ended_on_eos:
        generated = generated[:-1]
    return generated, first


def prompt(tiny_model: Any, text: str) -> list[int]:
    return list(tiny_model[1](text)["input_ids"])


async def test_turn_two_computes_only_its_new_tokens_and_changes_no_token(
    tiny_model: Any, engines: tuple[TransformersEngine, TransformersEngine]
) -> None:
    reuse, cold = engines
    turn1 = prompt(tiny_model, "The quick brown fox jumps over the lazy dog, and then")
    first_answer, first = await answer(reuse, turn1, "ann")
    assert first.prompt_tokens == len(turn1) and first.cached_tokens == 0
    turn2 = turn1 + first_answer + prompt(tiny_model, " again and again until the end")
    second_answer, second = await answer(reuse, turn2, "ann")
    # The cache holds every position but the last sampled token's: all of it is reused.
    reused = len(turn1) + len(first_answer) - 1
    assert second.cached_tokens == reused
    assert second.prompt_tokens is not None and second.prompt_tokens - reused == len(turn2) - reused
    cold_answer, cold_first = await answer(cold, turn2, "ann")
    assert cold_first.cached_tokens == 0
    assert second_answer == cold_answer


async def test_a_resumed_request_joining_a_running_batch_gets_the_same_tokens(
    tiny_model: Any, engines: tuple[TransformersEngine, TransformersEngine]
) -> None:
    reuse, cold = engines
    turn1 = prompt(tiny_model, "Once upon a time there was a small village by the sea")
    first_answer, _ = await answer(reuse, turn1, "ann")
    turn2 = turn1 + first_answer + prompt(tiny_model, " where fishermen lived")
    long = GenerationParams(max_new_tokens=40, temperature=0)
    other = prompt(tiny_model, "Numbers: one two three four five six")

    async def with_a_running_batch(engine: TransformersEngine) -> tuple[list[int], list[int]]:
        running = asyncio.create_task(answer(engine, other, "ben", long))
        await asyncio.sleep(0.05)  # ben's row is decoding when ann's turn 2 arrives
        resumed, _ = await answer(engine, turn2, "ann")
        return resumed, (await running)[0]

    assert await with_a_running_batch(reuse) == await with_a_running_batch(cold)


async def test_several_resumed_requests_at_once_share_one_prefill_and_change_no_token(
    tiny_model: Any, engines: tuple[TransformersEngine, TransformersEngine]
) -> None:
    reuse, cold = engines
    firsts = [
        prompt(tiny_model, "Short one"),
        prompt(tiny_model, "A somewhat longer opening message about the weather today"),
        prompt(tiny_model, "Medium length question about rivers"),
    ]
    turn2 = []
    for index, ids in enumerate(firsts):
        got, _ = await answer(reuse, ids, f"s{index}")
        follow = " and then?" if index != 1 else " tell me much more about it, with details"
        turn2.append(ids + got + prompt(tiny_model, follow))
    steps = reuse.steps
    together = await asyncio.gather(*(answer(reuse, ids, f"s{i}") for i, ids in enumerate(turn2)))
    expected = await asyncio.gather(*(answer(cold, ids, f"s{i}") for i, ids in enumerate(turn2)))
    assert [got for got, _ in together] == [got for got, _ in expected]
    # Different cached lengths and different new parts: every row reused its own history.
    for (_, first), ids, old in zip(together, turn2, firsts, strict=True):
        assert first.cached_tokens is not None and len(old) < first.cached_tokens < len(ids)
    assert reuse.steps - steps <= GREEDY.max_new_tokens + 2  # they ran side by side, not one by one


async def test_eviction_under_a_small_budget_keeps_answers_right(tiny_model: Any, layout: str) -> None:
    budget_mb = 0.1  # about two conversations' KV on the tiny model (512 bytes a token)
    small = make_engine(tiny_model, layout, prefix_cache_mb=budget_mb)
    cold = make_engine(tiny_model, layout, prefix_cache=False)
    await small.start()
    await cold.start()
    try:
        histories = {
            f"s{i}": prompt(tiny_model, f"Session {i} talks about topic {i} at some length " * 2)
            for i in range(5)
        }
        reused = []
        # Turn 1 in order, turn 2 in reverse: the latest sessions still hit, the oldest were evicted.
        for order in (list(histories), list(reversed(histories))):
            for scope in order:
                ids = histories[scope]
                got, first = await answer(small, ids, scope)
                expected, _ = await answer(cold, ids, scope)
                assert got == expected
                reused.append(first.cached_tokens or 0)
                histories[scope] = ids + got + prompt(tiny_model, " and more")
                assert small._prefix is not None and small._prefix.nbytes <= budget_mb * 2**20
                assert len(small._prefix) < len(histories)  # entries were evicted
        assert any(reused[5:]) and not all(reused[5:])  # turn 2: some hits, some evicted
    finally:
        await small.close()
        await cold.close()


async def test_session_scope_confines_reuse_while_shared_reuses_a_common_prefix(
    tiny_model: Any, layout: str
) -> None:
    system = prompt(tiny_model, "System: you are a careful assistant who answers briefly and well. ")
    for scope_setting, expected_for_ben in (("shared", True), ("session", False)):
        engine = make_engine(tiny_model, layout, prefix_cache_scope=scope_setting)
        await engine.start()
        try:
            await answer(engine, system + prompt(tiny_model, "User: hello"), "ann")
            _, first = await answer(engine, system + prompt(tiny_model, "User: goodbye"), "ben")
            assert (first.cached_tokens or 0) > 0 if expected_for_ben else first.cached_tokens == 0
            _, again = await answer(engine, system + prompt(tiny_model, "User: hello again"), "ann")
            assert (again.cached_tokens or 0) > 0  # a session always reuses its own history
        finally:
            await engine.close()


async def test_a_cancelled_turn_leaves_a_cache_that_changes_no_answer(
    tiny_model: Any, engines: tuple[TransformersEngine, TransformersEngine]
) -> None:
    reuse, cold = engines
    turn1 = prompt(tiny_model, "A long story begins here and it goes on")
    long = GenerationParams(max_new_tokens=40, temperature=0)
    stream = reuse.generate_ids(
        GenerationRequest(prompt="", params=long, prompt_ids=turn1, cache_scope="ann")
    )
    got: list[int] = []
    async for chunk in stream:
        got.extend(chunk)
        if len(got) >= 3:
            break
    await stream.aclose()
    await asyncio.sleep(0.1)  # the engine drops the cancelled row (and keeps its KV)
    turn2 = turn1 + got + prompt(tiny_model, " but stops")
    resumed, first = await answer(reuse, turn2, "ann")
    expected, _ = await answer(cold, turn2, "ann")
    assert resumed == expected and (first.cached_tokens or 0) >= len(turn1)


class Finished:
    def __init__(self) -> None:
        self.infos: list[dict[str, Any]] = []

    @hookimpl
    def on_request_finished(self, reason: str, info: dict[str, Any]) -> None:
        self.infos.append(info)


def test_a_conversation_over_http_reuses_its_history_and_counts_it(tiny_model: Any) -> None:
    model, tokenizer = tiny_model
    finished = Finished()
    settings = load_settings(
        session_secret="k" * 32,
        transports=["fastapi", "ops"],
        prompt_format="chatml",
        temperature=0,
        max_new_tokens=8,
        roles={"default": ["*"]},
    )
    cs = ChatStream(model=model, tokenizer=tokenizer, settings=settings, plugins=isolated_plugins(finished))
    from chatstream.app import create_app

    with run_live_server(create_app(chatstream=cs)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for text in ("hello there, how are you today?", "and what about tomorrow?"):
            assert client.post("/chat_stream", json={"user_input": text}).status_code == 200
        metrics = client.get("/metrics").text
    first, second = finished.infos
    assert first["cached_tokens"] == 0 and first["prompt_tokens"] > 0
    assert second["cached_tokens"] > 0
    # Only turn 2's own tokens (its question, the templates around it, and the answer's tail) are computed.
    assert second["prompt_tokens"] - second["cached_tokens"] < first["prompt_tokens"]
    assert f'chatstream_prompt_tokens_total{{kind="reused"}} {float(second["cached_tokens"])}' in metrics


def test_the_openai_api_reports_cached_prompt_tokens_to_the_official_client(tiny_model: Any) -> None:
    import openai

    from chatstream.app import create_app

    model, tokenizer = tiny_model
    settings = load_settings(transports=["openai"], prompt_format="chatml", temperature=0, max_new_tokens=6)
    cs = ChatStream(model=model, tokenizer=tokenizer, settings=settings, plugins=isolated_plugins())
    with run_live_server(create_app(chatstream=cs)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        messages: list[Any] = [{"role": "user", "content": "tell me about the sea and its waves"}]
        first = client.chat.completions.create(model="m", messages=messages)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "and the tides?"},
        ]
        second = client.chat.completions.create(model="m", messages=messages)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 0 < cached < second.usage.prompt_tokens
