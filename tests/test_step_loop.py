"""The step-loop base (chatstream.step_loop) on a scripted engine: cancellation, errors, slots, text."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from chatstream.step_loop import EngineError, StepLoopEngine, StepRow, TokenTrace
from chatstream.types import (
    EngineConfig,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    Segment,
    TextDelta,
    joined,
)

EOS = 0
WORDS = {EOS: "", 1: " one", 2: " two", 3: " three", 4: " END", 5: "!"}


class WordTokenizer:
    """Token id -> word; a prompt is one id per word."""

    eos_token_id = EOS

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return "".join(WORDS[int(i)] for i in ids)

    def special_text(self, token_id: int) -> str | None:
        return "</s>" if token_id == EOS else None


@dataclass(eq=False)
class ScriptRow(StepRow):
    made: int = 0


class ScriptEngine(StepLoopEngine[ScriptRow]):
    """Every row generates 1, 2, 3, 1, 2, 3...; a prompt with the word ``eos`` ends after three tokens.

    ``gate`` holds the loop before each step; ``fail_next`` makes the next step raise.
    """

    name = "script"
    row_type = ScriptRow

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.tokenizer = WordTokenizer()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = threading.Event()
        self.admitted: list[ScriptRow] = []
        self._rows: list[ScriptRow] = []

    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        text = prompt if isinstance(prompt, str) else joined(prompt)
        return [3 if word == "eos" else 1 for word in text.split()]

    def _running_count(self) -> int:
        return len(self._rows)

    def _release(self) -> list[ScriptRow]:
        rows, self._rows = self._rows, []
        return rows

    def _step(self) -> None:
        from chatstream.engine_queue import deliver

        self.gate.wait()
        self._drain(block=False)  # what was submitted while the gate was closed waits now too
        for row in self._rows:
            row.done = row.done or row.cancelled
        self._rows = [row for row in self._rows if not row.cancelled]
        new = self._take_waiting(self.max_batch_size - len(self._rows))
        self.admitted += new
        self._rows += new
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("device lost")
        self.steps += 1
        items: list[tuple[ScriptRow, Any]] = []
        for row in list(self._rows):
            ends_on_eos = 3 in row.prompt_ids and row.made == 3
            token = EOS if ends_on_eos else row.made % 3 + 1
            row.made += 1
            if row.trace is not None:
                row.trace.add(token, [token], [1.0])
            if ends_on_eos:
                items.append((row, FinishReason.STOP))
            else:
                items.append((row, token))
                if row.made >= row.params.max_new_tokens:
                    items.append((row, FinishReason.LENGTH))
            if items[-1][1] in (FinishReason.STOP, FinishReason.LENGTH):
                row.done = True
                self._rows.remove(row)
        deliver(items)


async def running(max_batch_size: int) -> AsyncIterator[ScriptEngine]:
    engine = ScriptEngine(EngineConfig(max_batch_size=max_batch_size, context_len=64))
    await engine.start()
    yield engine
    engine.gate.set()
    await engine.close()


@pytest.fixture
async def engine() -> AsyncIterator[ScriptEngine]:
    """A started engine with one slot."""
    async for started in running(1):
        yield started


@pytest.fixture
async def tiny_batch() -> AsyncIterator[ScriptEngine]:
    """A started engine with two slots."""
    async for started in running(2):
        yield started


def request(prompt: str = "hi", max_new_tokens: int = 6, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt, GenerationParams(max_new_tokens=max_new_tokens), **kwargs)


async def collect(engine: Any, req: GenerationRequest) -> list[TextDelta]:
    return [delta async for delta in engine.generate(req)]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_text_streams_with_token_counts_and_the_finish_reason(engine: ScriptEngine) -> None:
    deltas = await collect(engine, request(max_new_tokens=4))
    assert "".join(d.text for d in deltas) == " one two three one"
    assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].tokens == 4
    eos = await collect(engine, request("say eos"))
    assert "".join(d.text for d in eos) == " one two three" and eos[-1].finish_reason is FinishReason.STOP
    stopped = await collect(engine, request(stop=[" three"]))
    assert "".join(d.text for d in stopped) == " one two" and stopped[-1].finish_reason is FinishReason.STOP


async def test_generate_ids_streams_raw_ids(engine: ScriptEngine) -> None:
    ids = [i async for chunk in engine.generate_ids(request(max_new_tokens=5)) for i in chunk]
    assert ids == [1, 2, 3, 1, 2]


async def test_a_request_before_start_says_to_start() -> None:
    engine = ScriptEngine(EngineConfig())
    with pytest.raises(RuntimeError, match=r"start\(\)"):
        await collect(engine, request())


def test_bad_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="max_batch_size=0"):
        ScriptEngine(EngineConfig(max_batch_size=0))
    with pytest.raises(ValueError, match="context_len=1"):
        ScriptEngine(EngineConfig(context_len=1))


async def test_a_request_cancelled_while_waiting_is_never_run(engine: ScriptEngine) -> None:
    engine.gate.clear()  # hold the loop: the first request takes the only slot
    first = asyncio.create_task(collect(engine, request(max_new_tokens=3)))
    await asyncio.sleep(0.05)
    waiting = engine.generate(request("second"))
    pending = asyncio.create_task(waiting.__anext__())
    await asyncio.sleep(0.05)
    pending.cancel()  # the client left before its first token
    with pytest.raises(asyncio.CancelledError):
        await pending
    engine.gate.set()
    assert (await first)[-1].finish_reason is FinishReason.LENGTH
    await wait_until(lambda: engine.waiting_rows == 0 and engine.active_rows == 0)
    assert [row.prompt_ids for row in engine.admitted] == [[1]]  # "second" never ran


async def test_a_request_cancelled_mid_stream_frees_its_slot(engine: ScriptEngine) -> None:
    leaver = engine.generate(request(max_new_tokens=1000))
    assert (await leaver.__anext__()).text
    engine.gate.clear()  # hold the loop while the first request is running
    # The only slot is taken: a second request waits until the first leaves.
    stayer = asyncio.create_task(collect(engine, request("next", max_new_tokens=3)))
    await asyncio.sleep(0.05)
    assert not stayer.done()
    await leaver.aclose()
    engine.gate.set()
    deltas = await asyncio.wait_for(stayer, 5)
    assert "".join(d.text for d in deltas) == " one two three"
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    leaver_row = engine.admitted[0]
    assert leaver_row.cancelled and leaver_row.done and leaver_row.made < 1000


async def test_a_failing_step_ends_every_waiting_request_with_the_error_and_the_engine_goes_on(
    tiny_batch: ScriptEngine,
) -> None:
    engine = tiny_batch
    engine.gate.clear()
    engine.fail_next.set()
    # Two rows admitted in the failing step, one still waiting for a slot.
    tasks = [asyncio.create_task(collect(engine, request(f"r{i}"))) for i in range(3)]
    await asyncio.sleep(0.05)
    engine.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(engine.admitted) == 2  # the third was still waiting for a slot
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 3
    for error in errors:
        assert isinstance(error, EngineError)
        assert "generation failed: RuntimeError: device lost" in str(error)
    assert engine.active_rows == 0 and engine.waiting_rows == 0
    # The engine keeps serving.
    deltas = await collect(engine, request(max_new_tokens=2))
    assert "".join(d.text for d in deltas) == " one two"


async def test_closing_the_engine_ends_running_requests_with_cancelled(tiny_batch: ScriptEngine) -> None:
    stream = tiny_batch.generate(request(max_new_tokens=100_000))
    await stream.__anext__()
    tiny_batch.gate.clear()
    closing = asyncio.create_task(tiny_batch.close())
    await asyncio.sleep(0.02)
    tiny_batch.gate.set()
    await closing
    last = [delta async for delta in stream][-1]
    assert last.finish_reason is FinishReason.CANCELLED


async def test_a_trace_keeps_prompt_ids_steps_and_how_the_stream_ended(engine: ScriptEngine) -> None:
    trace = TokenTrace(top_logits=1)
    deltas = [d async for d in engine.generate(request("a eos"), trace=trace)]
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert trace.prompt_ids == [1, 3]
    assert [step[0] for step in trace.steps] == [1, 2, 3, EOS] and trace.ended_on_eos
    cut = TokenTrace()
    [d async for d in engine.generate(request("a eos", stop=[" two"]), trace=cut)]
    assert not cut.ended_on_eos  # the stop string ended it, not EOS
