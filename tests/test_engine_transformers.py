"""The transformers engine on a tiny random Llama: continuous batching, stopping, streaming text."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import torch

from chatstream.detokenize import REPLACEMENT_CHAR
from chatstream.models import ModelNotFoundError, load_model_and_tokenizer
from chatstream.plugin_manager import new_plugin_manager
from chatstream.plugins.engines import transformers_engine
from chatstream.plugins.engines.transformers_engine import TransformersEngine
from chatstream.types import (
    EngineConfig,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    LogitsProcessor,
    RowInfo,
    TextDelta,
)

PROMPTS = [
    "Hello, how are",
    "<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy",
    "a",
    "What is the capital of France? The capital",
]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0)


KV_LAYOUT = {"kv_cache": "dynamic"}


@pytest.fixture(autouse=True, params=["dynamic", "slots"])
def kv_cache(request: pytest.FixtureRequest) -> str:
    """Every test here runs with both KV cache layouts (see ``make_engine``)."""
    KV_LAYOUT["kv_cache"] = request.param
    return str(request.param)


def make_engine(tiny_model: tuple[Any, Any], **options: Any) -> TransformersEngine:
    model, tokenizer = tiny_model
    options.setdefault("device", "cpu")
    options.setdefault("options", dict(KV_LAYOUT))
    return TransformersEngine(EngineConfig(model=model, tokenizer=tokenizer, **options))


@pytest.fixture
async def engine(tiny_model: tuple[Any, Any]) -> AsyncIterator[TransformersEngine]:
    engine = make_engine(tiny_model, max_batch_size=4)
    await engine.start()
    yield engine
    await engine.close()


def reference_ids(tiny_model: tuple[Any, Any], prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy continuation from plain ``model.generate``, EOS stripped."""
    model, tokenizer = tiny_model
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    generated: list[int] = out[0, ids.shape[1] :].tolist()
    return generated[:-1] if generated and generated[-1] == tokenizer.eos_token_id else generated


async def collect(engine: TransformersEngine, request: GenerationRequest) -> list[TextDelta]:
    return [delta async for delta in engine.generate(request)]


class ForceScript:
    """A processor that makes every row generate ``script`` (then anything)."""

    def __init__(self, rows: Sequence[RowInfo], script: Sequence[int]) -> None:
        self.prompt_lens = torch.tensor([row.prompt_len for row in rows])
        self.script = list(script)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = (input_ids >= 0).sum(dim=1) - self.prompt_lens
        forced = scores.clone()
        for i, n in enumerate(generated.tolist()):
            if n < len(self.script):
                forced[i] = float("-inf")
                forced[i, self.script[n]] = 0.0
        return forced  # type: ignore[return-value]


def forcing(script: Sequence[int]) -> Callable[[Sequence[RowInfo]], list[LogitsProcessor]]:
    return lambda rows: [ForceScript(rows, script)]


# -- continuous batching ------------------------------------------------------------------------------


async def test_batched_greedy_matches_generate_and_unbatched_runs(tiny_model: tuple[Any, Any]) -> None:
    expected = [reference_ids(tiny_model, prompt, GREEDY.max_new_tokens) for prompt in PROMPTS]

    async def run(engine: TransformersEngine, stagger: bool) -> list[list[int]]:
        started = [asyncio.Event() for _ in PROMPTS]

        async def one(i: int) -> list[int]:
            if stagger and i:
                await started[i - 1].wait()  # join only after the previous request has tokens
            out: list[int] = []
            async for ids in engine.generate_ids(GenerationRequest(PROMPTS[i], GREEDY)):
                out += ids
                if len(out) >= 3:
                    started[i].set()
            started[i].set()
            return out

        return list(await asyncio.gather(*(one(i) for i in range(len(PROMPTS)))))

    batched = make_engine(tiny_model, max_batch_size=4)
    await batched.start()
    try:
        staggered = await run(batched, stagger=True)
        assert batched.steps < sum(len(ids) for ids in staggered)  # rows really shared forward passes
        together = await run(batched, stagger=False)
    finally:
        await batched.close()
    single = make_engine(tiny_model, max_batch_size=1)
    await single.start()
    try:
        alone = await run(single, stagger=False)
    finally:
        await single.close()
    assert staggered == expected
    assert together == expected
    assert alone == expected


async def test_processors_see_left_padded_histories_that_grow_by_one(tiny_model: tuple[Any, Any]) -> None:
    calls: list[tuple[int, torch.Tensor]] = []
    builds: list[list[int]] = []

    class Recorder:
        def __init__(self, rows: Sequence[RowInfo]) -> None:
            self.id = len(builds)
            builds.append([row.prompt_len for row in rows])

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            calls.append((self.id, input_ids.clone()))
            return scores

    engine = make_engine(tiny_model, max_batch_size=4, build_pipeline=lambda rows: [Recorder(rows)])
    await engine.start()
    try:
        params = GenerationParams(max_new_tokens=6, temperature=0)
        await asyncio.gather(
            collect(engine, GenerationRequest(PROMPTS[0], params)),
            collect(engine, GenerationRequest(PROMPTS[2], params)),
        )
    finally:
        await engine.close()
    _, tokenizer = tiny_model
    prompts = {len(tokenizer(p)["input_ids"]) for p in (PROMPTS[0], PROMPTS[2])}
    assert {n for build in builds for n in build} == prompts
    for (before_id, before), (after_id, after) in itertools.pairwise(calls):
        if before_id == after_id:  # same processor list: same rows, each one token longer
            assert after.shape[0] == before.shape[0]
            real_before, real_after = (before >= 0).sum(1), (after >= 0).sum(1)
            assert torch.equal(real_after, real_before + 1)
    for _, ids in calls:
        for row in ids:  # -1 only on the left
            real = (row >= 0).nonzero()
            assert int(real[0]) + len(real) == len(row)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` (the step loop updates engine counters from its own thread)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_cancelled_request_leaves_the_batch_and_others_continue(
    engine: TransformersEngine, tiny_model: tuple[Any, Any]
) -> None:
    long = GenerationParams(max_new_tokens=60, temperature=0)
    leaver = engine.generate_ids(GenerationRequest(PROMPTS[0], long))
    stayer = engine.generate_ids(GenerationRequest(PROMPTS[2], long))
    await leaver.__anext__()
    stayed = list(await stayer.__anext__())
    await wait_until(lambda: engine.active_rows == 2)
    await leaver.aclose()
    await wait_until(lambda: engine.active_rows == 1)
    async for ids in stayer:
        stayed += ids
    # The survivor's cache was sliced out of the shared batch: its text must be unaffected.
    assert stayed == reference_ids(tiny_model, PROMPTS[2], 60)
    await wait_until(lambda: engine.active_rows == 0)


async def test_requests_beyond_the_batch_width_wait_then_run(tiny_model: tuple[Any, Any]) -> None:
    engine = make_engine(tiny_model, max_batch_size=2)
    await engine.start()
    try:
        params = GenerationParams(max_new_tokens=5, temperature=0)
        results = await asyncio.gather(*(collect(engine, GenerationRequest(p, params)) for p in PROMPTS))
    finally:
        await engine.close()
    assert all(deltas[-1].finish_reason is not None for deltas in results)


async def test_seeded_sampling_repeats_in_any_batch(engine: TransformersEngine) -> None:
    seeded = GenerationParams(max_new_tokens=12, temperature=1.0, seed=7)
    alone = await collect(engine, GenerationRequest(PROMPTS[0], seeded))
    other = GenerationParams(max_new_tokens=12, temperature=1.0)
    with_others: list[TextDelta]
    with_others, _ = await asyncio.gather(
        collect(engine, GenerationRequest(PROMPTS[0], seeded)),
        collect(engine, GenerationRequest(PROMPTS[3], other)),
    )
    assert "".join(d.text for d in alone) == "".join(d.text for d in with_others)


# -- stopping and text -----------------------------------------------------------------------------------


async def test_max_new_tokens_ends_with_length(
    engine: TransformersEngine, tiny_model: tuple[Any, Any]
) -> None:
    _, tokenizer = tiny_model
    script = tokenizer(" hello world again and again", add_special_tokens=False)["input_ids"]
    engine.config.build_pipeline = forcing(script * 3)
    deltas = await collect(engine, GenerationRequest("Hi", GenerationParams(max_new_tokens=4, temperature=0)))
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].tokens == 4
    assert "".join(d.text for d in deltas) == tokenizer.decode(script[:4])


async def test_eos_ends_with_stop_and_is_not_shown(
    engine: TransformersEngine, tiny_model: tuple[Any, Any]
) -> None:
    _, tokenizer = tiny_model
    script = [*tokenizer(" Paris.", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    engine.config.build_pipeline = forcing(script)
    deltas = await collect(
        engine, GenerationRequest("Hi", GenerationParams(max_new_tokens=50, temperature=0))
    )
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert "".join(d.text for d in deltas) == " Paris."
    await wait_until(lambda: engine.active_rows == 0)


async def test_a_stop_string_split_across_tokens_is_never_shown(
    engine: TransformersEngine, tiny_model: tuple[Any, Any]
) -> None:
    _, tokenizer = tiny_model
    stop = "<|end|>"
    text = f"The capital is Paris.{stop} and more"
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokenizer(stop, add_special_tokens=False)["input_ids"]) > 1  # really split
    engine.config.build_pipeline = forcing(script)
    request = GenerationRequest("Hi", GenerationParams(max_new_tokens=50, temperature=0), stop=[stop])
    deltas = await collect(engine, request)
    assert "".join(d.text for d in deltas) == "The capital is Paris."
    assert not any("<" in d.text for d in deltas)
    assert deltas[-1].finish_reason is FinishReason.STOP
    await wait_until(lambda: engine.active_rows == 0)  # the row stopped computing


async def test_japanese_streams_without_replacement_characters(
    engine: TransformersEngine, tiny_model: tuple[Any, Any]
) -> None:
    _, tokenizer = tiny_model
    text = "日本の首都は東京です。ありがとう"
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(script) > len(text)  # characters span several tokens
    engine.config.build_pipeline = forcing(script)
    params = GenerationParams(max_new_tokens=len(script), temperature=0)
    deltas = await collect(engine, GenerationRequest(PROMPTS[1], params))
    assert "".join(d.text for d in deltas) == text
    assert not any(REPLACEMENT_CHAR in d.text for d in deltas)
    assert len([d for d in deltas if d.text]) > 3  # it streamed, not one final chunk


async def test_special_token_strings_in_the_prompt_stay_special(engine: TransformersEngine) -> None:
    im_start = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    bos = engine.tokenizer.bos_token_id
    assert engine.encode("<|im_start|>user", add_special_tokens=False)[0] == im_start
    assert engine.encode("<|im_start|>user")[:2] == [bos, im_start]  # the tokenizer default adds BOS
    assert engine.count_tokens("<|im_start|>") == 2


async def test_add_special_tokens_from_config_and_request(tiny_model: tuple[Any, Any]) -> None:
    engine = make_engine(tiny_model, add_special_tokens=False)
    bos = engine.tokenizer.bos_token_id
    assert engine.encode("hi")[0] != bos
    assert engine.encode("hi", add_special_tokens=True)[0] == bos


# -- errors and wiring --------------------------------------------------------------------------------


async def test_a_prompt_longer_than_the_context_is_refused(tiny_model: tuple[Any, Any]) -> None:
    engine = make_engine(tiny_model, context_len=8)
    await engine.start()
    try:
        with pytest.raises(ValueError, match="context_len"):
            await collect(engine, GenerationRequest("The quick brown fox jumps over the lazy dog", GREEDY))
    finally:
        await engine.close()


async def test_a_full_context_ends_with_length(tiny_model: tuple[Any, Any]) -> None:
    engine = make_engine(tiny_model, context_len=12)
    await engine.start()
    try:
        deltas = await collect(
            engine, GenerationRequest("Hello", GenerationParams(max_new_tokens=100, temperature=0))
        )
    finally:
        await engine.close()
    prompt_len = engine.count_tokens("Hello")
    if deltas[-1].finish_reason is FinishReason.LENGTH:
        assert deltas[-1].tokens == 12 - prompt_len
    else:  # the random model may pick EOS first
        assert deltas[-1].finish_reason is FinishReason.STOP
        assert deltas[-1].tokens < 12 - prompt_len


async def test_generate_before_start_says_to_start(tiny_model: tuple[Any, Any]) -> None:
    engine = make_engine(tiny_model)
    with pytest.raises(RuntimeError, match=r"start\(\)"):
        await collect(engine, GenerationRequest("hi"))


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        TransformersEngine(EngineConfig(max_batch_size=0))
    with pytest.raises(ValueError, match="tokenizer"):
        TransformersEngine(EngineConfig(model=object()))


def test_a_missing_model_path_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope"), "cpu")
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match=r"\.gguf"):
        load_model_and_tokenizer(str(tmp_path / "weights.bin"), "cpu")


def test_the_engine_is_registered_as_transformers() -> None:
    pm = new_plugin_manager()
    pm.register(transformers_engine)
    found: dict[str, Any] = {}
    options: dict[str, Any] = {}

    def register(name: str, factory: Any, **meta: Any) -> None:
        found[name], options[name] = factory, meta.get("options")

    pm.hook.register_engines(register=register)
    assert isinstance(found["transformers"](EngineConfig()), TransformersEngine)
    assert options["transformers"] is transformers_engine.TransformersOptions


async def test_the_slots_layout_keeps_one_preallocated_cache(
    tiny_model: tuple[Any, Any], kv_cache: str
) -> None:
    engine = make_engine(tiny_model, max_batch_size=3, context_len=64)
    await engine.start()
    try:
        assert engine.kv_cache_layout == kv_cache
        slots = engine._slots
        if slots is None:
            return
        # Layers x slots x heads x context x head size, allocated once at start-up.
        assert slots.keys.shape[1] == 3 and slots.keys.shape[3] == 64
        before = slots.keys.data_ptr()
        params = GenerationParams(max_new_tokens=8, temperature=0)
        await asyncio.gather(*(collect(engine, GenerationRequest(p, params)) for p in PROMPTS))
        assert engine._slots is slots and slots.keys.data_ptr() == before
    finally:
        await engine.close()


def test_a_bad_kv_cache_layout_is_named(tiny_model: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError) as error:
        make_engine(tiny_model, options={"kv_cache": "paged"})
    message = str(error.value)
    assert "setting 'plugin_config.transformers.kv_cache'" in message
    assert "'dynamic' or 'slots'" in message and "(got 'paged')" in message
