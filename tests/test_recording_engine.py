"""The recording wrapper (chatstream.recording_engine) around a token engine and a text-only engine:
what it writes is what the replay engine serves back, delta for delta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_step_loop import EOS, ScriptEngine, collect, request

from chatstream.mock_engine import MockEngine
from chatstream.recording import RecordingStore, RecordingWriter
from chatstream.recording_engine import RecordingEngine, RecordingOptions, with_recording
from chatstream.replay_engine import engine_from_options
from chatstream.types import EngineConfig, FinishReason, GenerationRequest, TextDelta


def stream_of(deltas: list[TextDelta]) -> list[tuple[str, int, Any]]:
    return [(d.text, d.tokens, d.finish_reason) for d in deltas]


async def test_finished_requests_are_recorded_and_replay_as_the_client_saw_them(tmp_path: Path) -> None:
    engine = RecordingEngine(ScriptEngine(EngineConfig(max_batch_size=2)), RecordingWriter(tmp_path), 1)
    await engine.start()
    requests = [
        request(max_new_tokens=4),  # ends at its length limit
        request("say eos"),  # ends on EOS, which is recorded as a step
        request("cut me", stop=[" three"]),  # a stop string cuts it
    ]
    try:
        seen = [stream_of(await collect(engine, r)) for r in requests]
        leaver = engine.generate(request("leave early", max_new_tokens=10_000))
        await leaver.__anext__()
        await leaver.aclose()
        assert engine.steps > 0 and engine.active_rows in (0, 1)  # the wrapped engine's own counters
    finally:
        await engine.close()
    store = RecordingStore(tmp_path)
    assert store.manifest["engine"] == "script"
    assert {r.prompt for r in store.records} == {"hi", "say eos", "cut me"}  # the leaver is not recorded
    by_prompt = {r.prompt: r for r in store.records}
    assert by_prompt["hi"].token_ids == [1, 2, 3, 1] and by_prompt["hi"].finish_reason == "length"
    assert by_prompt["say eos"].token_ids == [1, 2, 3, EOS]
    assert by_prompt["say eos"].prompt_token_ids == [1, 3]
    assert by_prompt["cut me"].token_ids == [1, 2, 3]  # up to the token that completed the stop string
    assert by_prompt["say eos"].decoded == " one two three"
    tensors = store.load_tensors(by_prompt["hi"])
    assert tensors["top_ids"].shape == (4, 1)
    replay = engine_from_options({"dir": str(tmp_path)})
    for r, stream in zip(requests, seen, strict=True):
        assert stream_of(await collect(replay, r)) == stream


async def test_a_text_engine_is_recorded_without_token_ids(tmp_path: Path) -> None:
    options = RecordingOptions(record_dir=str(tmp_path))
    engine = with_recording(MockEngine({"texts": ["hello there world"]}), options)
    assert isinstance(engine, RecordingEngine)
    await engine.start()
    asked = GenerationRequest("p", stop=["world"])
    seen = stream_of(await collect(engine, asked))
    await engine.close()
    assert seen[-1][2] is FinishReason.STOP
    (record,) = RecordingStore(tmp_path).records
    assert record.token_ids == [] and record.prompt_token_ids is None and record.engine == "mock"
    assert stream_of(await collect(engine_from_options({"dir": str(tmp_path)}), asked)) == seen


def test_without_record_dir_the_engine_is_not_wrapped() -> None:
    engine = MockEngine()
    assert with_recording(engine, RecordingOptions()) is engine
