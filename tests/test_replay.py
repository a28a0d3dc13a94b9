"""Record generations of a tiny model, then replay them byte for byte with no model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner

from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.mock_transformer import MockTransformer, MockTransformerError
from chatstream.pipeline import make_pipeline_builder, processor_registry
from chatstream.plugins.engines import replay, transformers_engine
from chatstream.plugins.engines.replay import ReplayEngine, engine_from_options
from chatstream.plugins.engines.transformers_engine import TransformersEngine
from chatstream.recording import (
    GENERATIONS_DIR,
    GenerationRecord,
    RecordedDelta,
    RecordingFormatError,
    RecordingNotFoundError,
    RecordingStore,
    RecordingWriter,
)
from chatstream.recording_engine import RecordingEngine
from chatstream.registry import collect
from chatstream.settings import SamplingSettings, SettingsError, load_settings
from chatstream.testing import isolated_plugins
from chatstream.testing_replay import make_replay_chatstream
from chatstream.types import EngineConfig, GenerationParams, GenerationRequest, TextDelta

CHATML_PROMPT = "<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n"
GREEDY = GenerationParams(max_new_tokens=20, temperature=0)
SEEDED = GenerationParams(max_new_tokens=20, temperature=0.9, top_k=40, seed=123)
PENALIZED = GenerationParams(
    max_new_tokens=24, temperature=0, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3
)
CONSOLE_OPTIONS: dict[str, Any] = {"temperature": 0, "max_new_tokens": 12}


def as_json(deltas: list[TextDelta]) -> list[list[Any]]:
    """A stream as comparable data: text, token count, finish reason."""
    return [[d.text, d.tokens, d.finish_reason.value if d.finish_reason else None] for d in deltas]


def request_json(request: GenerationRequest) -> dict[str, Any]:
    return {"prompt": request.prompt, "params": request.params.model_dump(), "stop": list(request.stop)}


@dataclass
class Recorded:
    """What the recording phase produced: the directory and every stream a client saw."""

    directory: Path
    streams: list[tuple[GenerationRequest, list[list[Any]]]]
    cancelled_prompt: str
    console_input: str
    console_answer: str


async def _collect(engine: Any, request: GenerationRequest) -> list[TextDelta]:
    return [delta async for delta in engine.generate(request)]


async def _record(tiny_model: tuple[Any, Any], directory: Path) -> Recorded:
    model, tokenizer = tiny_model
    build = make_pipeline_builder(SamplingSettings(), processor_registry(isolated_plugins().pm))
    engine = transformers_engine.create_engine(
        EngineConfig(
            model=model,
            tokenizer=tokenizer,
            device="cpu",
            max_batch_size=4,
            build_pipeline=build,
            options={"record_dir": str(directory)},
        )
    )
    assert isinstance(engine, RecordingEngine) and isinstance(engine.engine, TransformersEngine)
    await engine.start()
    streams: list[tuple[GenerationRequest, list[list[Any]]]] = []
    try:
        for request in (
            GenerationRequest("Hello, how are", GREEDY),
            GenerationRequest("The quick brown fox", SEEDED),
            GenerationRequest(CHATML_PROMPT, PENALIZED),
        ):
            streams.append((request, as_json(await _collect(engine, request))))
        # A stop string taken from the middle of a greedy answer: the recording holds the cut stream.
        answer = "".join(text for text, _, _ in streams[0][1])
        stop = answer[len(answer) // 2 : len(answer) // 2 + 2]
        cut = GenerationRequest("Hello, how are", GREEDY, stop=[stop])
        streams.append((cut, as_json(await _collect(engine, cut))))
        # Two at once, sharing the batch.
        together = [
            GenerationRequest("What is the capital of France?", GREEDY),
            GenerationRequest("A language model", SEEDED),
        ]
        results = await asyncio.gather(*(_collect(engine, r) for r in together))
        streams += [(r, as_json(d)) for r, d in zip(together, results, strict=True)]
        # A request the client leaves early is not recorded.
        leaver = engine.generate(GenerationRequest("Streaming text one token", GREEDY))
        await leaver.__anext__()
        await leaver.aclose()
    finally:
        await engine.close()
    # A conversation through ChatStream, recorded through the settings.
    settings = load_settings(plugin_config={"transformers": {"record_dir": str(directory)}})
    chat = ChatStream(
        model=model, tokenizer=tokenizer, settings=settings, plugins=isolated_plugins(), **CONSOLE_OPTIONS
    )
    console_answer = ""
    try:
        async for text in chat.handle_console_input("Hello"):
            console_answer = text
    finally:
        await chat.close()
    return Recorded(directory, streams, "Streaming text one token", "Hello", console_answer)


@pytest.fixture(scope="module")
def recorded(tiny_model: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    return asyncio.run(_record(tiny_model, tmp_path_factory.mktemp("recording")))


# -- the recording ---------------------------------------------------------------------------------


def test_every_finished_request_is_recorded_with_tokens_top_logits_and_timing(recorded: Recorded) -> None:
    store = RecordingStore(recorded.directory)
    assert store.manifest["version"] == 1
    assert "<|im_start|>" in store.tokenizer_info["chat_template"]
    assert len(store.records) == len(recorded.streams) + 1  # + the ChatStream turn
    assert recorded.cancelled_prompt not in {r.prompt for r in store.records}
    for request, stream in recorded.streams:
        (record,) = store.find(request.prompt, request.params, request.stop)
        assert [[d.text, d.tokens, d.finish_reason] for d in record.deltas] == stream
        offsets = [d.t for d in record.deltas]
        assert offsets == sorted(offsets) and offsets[-1] > 0
        tensors = store.load_tensors(record)
        assert tensors["top_ids"].shape == tensors["top_logits"].shape == (len(record.token_ids), 5)
        assert (tensors["top_logits"][:, :-1] >= tensors["top_logits"][:, 1:]).all()
        if request.params.greedy:
            # A greedy step picks the highest score: the sampled token heads its own top list.
            assert tensors["top_ids"][:, 0].tolist() == record.token_ids
        assert record.prompt_token_ids and record.prompt_token_ids[0] == 0  # BOS <s> was added
        if not request.stop:
            assert record.decoded is not None and record.decoded.rstrip("\ufffd") == record.text


def test_a_stop_string_is_recorded_as_the_client_saw_it(recorded: Recorded) -> None:
    full = "".join(text for text, _, _ in recorded.streams[0][1])
    request, stream = recorded.streams[3]
    cut = "".join(text for text, _, _ in stream)
    assert full.startswith(cut) and len(cut) < len(full)
    assert request.stop[0] not in cut and stream[-1][2] == "stop"


def test_no_temporary_files_are_left(recorded: Recorded) -> None:
    names = os.listdir(recorded.directory / GENERATIONS_DIR)
    assert names and not [n for n in names if n.startswith(".") or n.endswith(".tmp")]


def test_bad_recording_options_are_named(tiny_model: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_model

    def build(options: dict[str, Any]) -> Any:
        return transformers_engine.create_engine(
            EngineConfig(model=model, tokenizer=tokenizer, options=options)
        )

    with pytest.raises(ValueError, match=r"'plugin_config\.transformers\.record_top_logits': .*\(got -1\)"):
        build({"record_top_logits": -1})
    with pytest.raises(ValueError, match=r"'plugin_config\.transformers\.record_dir': .*\(got 3\)"):
        build({"record_dir": 3})
    # Recording is the factory's wrapper: the bare engine refuses the option rather than ignore it.
    with pytest.raises(ValueError, match=r"record_dir is applied by the engine's registered factory"):
        TransformersEngine(EngineConfig(model=model, tokenizer=tokenizer, options={"record_dir": "x"}))


# -- replay in a fresh process, from a copy ----------------------------------------------------------

_FRESH_PROCESS = textwrap.dedent(
    """
    import asyncio, json, sys
    from chatstream.chatstream import ChatStream
    from chatstream.mock_transformer import MockTransformer
    from chatstream.plugin_manager import load_plugins
    from chatstream.plugins.engines.replay import engine_from_options
    from chatstream.types import GenerationParams, GenerationRequest

    job = json.load(open(sys.argv[1]))

    async def one(engine, spec):
        request = GenerationRequest(spec["prompt"], GenerationParams(**spec["params"]), stop=spec["stop"])
        return [[d.text, d.tokens, d.finish_reason.value if d.finish_reason else None]
                async for d in engine.generate(request)]

    async def main():
        engine = engine_from_options({"dir": job["dir"]})
        # Every request at once: each must get its own recording.
        streams = await asyncio.gather(*(one(engine, spec) for spec in job["requests"]))
        mock = MockTransformer(job["dir"])
        chat = ChatStream(model=mock.model, tokenizer=mock.tokenizer,
                          plugins=load_plugins(entry_points=False), **job["console_options"])
        answer = ""
        async for answer in chat.handle_console_input(job["console_input"]):
            pass
        await chat.close()
        return streams, answer

    streams, answer = asyncio.run(main())
    print(json.dumps({"streams": streams, "console": answer,
                      "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
    """
)


def test_a_copied_recording_replays_identically_in_a_fresh_process_without_torch(
    recorded: Recorded, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "other-machine" / "recording"
    shutil.copytree(recorded.directory, elsewhere)
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "dir": str(elsewhere),
                "requests": [request_json(r) for r, _ in recorded.streams],
                "console_input": recorded.console_input,
                "console_options": CONSOLE_OPTIONS,
            }
        )
    )
    script = tmp_path / "replay_job.py"
    script.write_text(_FRESH_PROCESS)
    done = subprocess.run(
        [sys.executable, str(script), str(job)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["streams"] == [stream for _, stream in recorded.streams]
    assert result["console"] == recorded.console_answer and recorded.console_answer
    assert result["torch"] is False
    assert result["transformers"] is False


# -- matching, errors and fallbacks ------------------------------------------------------------------


async def test_an_unrecorded_prompt_names_the_nearest_recorded_prompt(recorded: Recorded) -> None:
    engine = engine_from_options({"dir": str(recorded.directory)})
    with pytest.raises(RecordingNotFoundError) as caught:
        engine.generate(GenerationRequest("Hello, how is", GREEDY))
    assert "'Hello, how are'" in str(caught.value)
    assert caught.value.nearest_prompt == "Hello, how are"
    assert caught.value.status == 404


async def test_a_recorded_prompt_with_other_settings_says_which_differ(recorded: Recorded) -> None:
    engine = engine_from_options({"dir": str(recorded.directory)})
    with pytest.raises(RecordingNotFoundError, match=r"temperature recorded 0\.0, requested 0\.5"):
        engine.generate(GenerationRequest("Hello, how are", GREEDY.model_copy(update={"temperature": 0.5})))


async def test_greedy_requests_match_whatever_their_seed_and_filters(recorded: Recorded) -> None:
    engine = engine_from_options({"dir": str(recorded.directory)})
    request, stream = recorded.streams[0]
    other = GenerationRequest(request.prompt, request.params.model_copy(update={"seed": 5, "top_k": 3}))
    assert as_json(await _collect(engine, other)) == stream


@pytest.mark.parametrize(
    ("fallback", "expected"), [("mock", None), ("I was not recorded.", "I was not recorded.")]
)
async def test_the_fallback_answers_unrecorded_prompts(
    recorded: Recorded, fallback: str, expected: str | None
) -> None:
    engine = engine_from_options({"dir": str(recorded.directory), "fallback": fallback})
    deltas = await _collect(engine, GenerationRequest("never recorded", GREEDY))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason is not None
    if expected is None:
        assert text.startswith("Hello! I am a mock assistant")
    else:
        assert text == expected
    # Recorded prompts still replay their recording.
    request, stream = recorded.streams[0]
    assert as_json(await _collect(engine, request)) == stream


def test_count_tokens_knows_recorded_prompts_only(recorded: Recorded) -> None:
    engine = engine_from_options({"dir": str(recorded.directory)})
    record = RecordingStore(recorded.directory).find("Hello, how are", GREEDY)[0]
    assert record.prompt_token_ids is not None
    assert engine.count_tokens("Hello, how are") == len(record.prompt_token_ids)
    assert engine.count_tokens("never recorded") is None


def test_bad_replay_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'plugin_config\.replay\.dir': Field required"):
        engine_from_options({})
    with pytest.raises(RecordingFormatError, match="does not exist"):
        engine_from_options({"dir": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"'plugin_config\.replay\.timing': .*\(got 'fast'\)"):
        engine_from_options({"dir": str(tmp_path), "timing": "fast"})
    with pytest.raises(ValueError, match=r"'plugin_config\.replay\.speed': unknown option; known options"):
        engine_from_options({"dir": str(tmp_path), "speed": 2})
    with pytest.raises(ValueError, match=r"'plugin_config\.replay\.timing': .*\(got 'fast'\)"):
        MockTransformer(tmp_path, timing="fast")


def write_record(directory: Path, prompt: str, texts: list[str], step_s: float = 0.0) -> GenerationRecord:
    """A hand-made recording: one delta per text, ``step_s`` apart."""
    deltas = [RecordedDelta(text, i + 1, step_s * (i + 1)) for i, text in enumerate(texts)]
    deltas.append(RecordedDelta("", len(texts), step_s * (len(texts) + 1), "stop"))
    record = GenerationRecord(prompt=prompt, params=GREEDY.model_dump(), deltas=deltas, finish_reason="stop")
    RecordingWriter(directory).write(record)
    return record


async def test_recorded_timing_is_reproduced_only_when_asked(tmp_path: Path) -> None:
    write_record(tmp_path, "slow", ["a", "b", "c"], step_s=0.08)
    for timing, at_least, below in (("recorded", 0.3, 5.0), ("none", 0.0, 0.2)):
        engine = engine_from_options({"dir": str(tmp_path), "timing": timing})
        started = time.monotonic()
        deltas = await _collect(engine, GenerationRequest("slow", GREEDY))
        elapsed = time.monotonic() - started
        assert "".join(d.text for d in deltas) == "abc"
        assert at_least <= elapsed < below, (timing, elapsed)


async def test_several_recordings_of_one_request_replay_in_turn(tmp_path: Path) -> None:
    write_record(tmp_path, "again", ["first"])
    write_record(tmp_path, "again", ["second"])
    engine = engine_from_options({"dir": str(tmp_path)})
    texts = [
        "".join(d.text for d in await _collect(engine, GenerationRequest("again", GREEDY))) for _ in range(3)
    ]
    assert texts == ["first", "second", "first"]


async def test_a_recording_added_while_replaying_is_found(tmp_path: Path) -> None:
    write_record(tmp_path, "early", ["one"])
    engine = engine_from_options({"dir": str(tmp_path)})
    write_record(tmp_path, "late", ["two"])
    assert "".join(d.text for d in await _collect(engine, GenerationRequest("late", GREEDY))) == "two"


def test_a_newer_format_version_is_refused_with_the_file_named(tmp_path: Path) -> None:
    record = write_record(tmp_path, "x", ["y"])
    path = tmp_path / GENERATIONS_DIR / f"{record.name}.json"
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(RecordingFormatError, match=rf"{record.name}\.json has format version 99"):
        RecordingStore(tmp_path)


# -- MockTransformer, the engine registry, HTTP, the CLI ---------------------------------------------


def test_mock_transformer_stands_in_for_model_and_tokenizer(
    recorded: Recorded, tiny_model: tuple[Any, Any]
) -> None:
    _, real_tokenizer = tiny_model
    model, tokenizer = MockTransformer(recorded.directory).model_and_tokenizer()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "こんにちは"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        real_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    )
    assert tokenizer.eos_token == real_tokenizer.eos_token
    assert tokenizer("Hello, how are")["input_ids"] == real_tokenizer("Hello, how are")["input_ids"]
    with pytest.raises(MockTransformerError, match="not a model"):
        model(input_ids=[[1]])
    with pytest.raises(MockTransformerError, match="only encode recorded prompts"):
        tokenizer("never recorded")


def test_both_engine_names_build_the_replay_engine(recorded: Recorded) -> None:
    plugins = isolated_plugins()
    engines = collect(plugins.pm, "engines")
    by_options = engines["replay"].obj(EngineConfig(options={"dir": str(recorded.directory)}))
    mock = MockTransformer(recorded.directory, fallback="mock")
    by_stand_in = engines["transformers"].obj(EngineConfig(model=mock.model, tokenizer=mock.tokenizer))
    assert isinstance(by_options, ReplayEngine) and isinstance(by_stand_in, ReplayEngine)
    assert by_stand_in.fallback == "mock" and by_stand_in.tokenizer is mock.tokenizer


def test_a_stand_in_model_reaches_the_replay_engine_only_through_the_registry(recorded: Recorded) -> None:
    mock = MockTransformer(recorded.directory)
    config = EngineConfig(model=mock.model, tokenizer=mock.tokenizer)
    blocked = collect(isolated_plugins(block=("chatstream.plugins.engines.replay",)).pm, "engines")
    assert "replay" not in blocked
    with pytest.raises(SettingsError, match=r"only the 'replay' engine serves.*unblock"):
        blocked["transformers"].obj(replace(config, engines=blocked))
    engines = collect(isolated_plugins().pm, "engines")
    assert isinstance(engines["transformers"].obj(replace(config, engines=engines)), ReplayEngine)


async def test_chatstream_over_http_streams_the_recorded_answer(recorded: Recorded, live_server: Any) -> None:
    app = create_app(
        chatstream=make_replay_chatstream(recorded.directory, timing="recorded", **CONSOLE_OPTIONS)
    )
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            async with client.stream(
                "POST", "/chat_stream", json={"user_input": recorded.console_input}
            ) as r:
                assert r.status_code == 200
                chunks = [chunk async for chunk in r.aiter_text()]
        async with httpx.AsyncClient(base_url=url) as stranger:
            unrecorded = await stranger.post("/chat_stream", json={"user_input": "never recorded"})
    assert chunks[-1] == recorded.console_answer
    assert len(chunks) > 1  # it streamed, not one block
    assert unrecorded.status_code == 404
    assert unrecorded.json()["error"] == "recording_not_found"
    assert "nearest recorded prompt" in unrecorded.json()["message"]


async def test_the_fixture_builds_a_replaying_chatstream(
    recorded: Recorded,
    replay_chatstream: Any,
) -> None:
    chat = replay_chatstream(recorded.directory, **CONSOLE_OPTIONS)
    answer = ""
    async for text in chat.handle_console_input(recorded.console_input):
        answer = text
    await chat.close()
    assert answer == recorded.console_answer


def test_the_recordings_command_lists_prompts_and_answers(recorded: Recorded) -> None:
    group = click.Group()
    replay.register_commands(cli=group)
    result = CliRunner().invoke(group, ["recordings", str(recorded.directory), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {row["prompt"] for row in rows} >= {"Hello, how are", "A language model"}
