"""Composing the logits pipeline from settings, sampling the next token, clamping request parameters."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chatstream.hookspecs import hookimpl
from chatstream.pipeline import (
    SamplingLimits,
    apply_pipeline,
    clamp_params,
    make_generator,
    make_pipeline_builder,
    processor_registry,
    sample_next_tokens,
)
from chatstream.plugin_manager import PluginError
from chatstream.plugins.processors.penalties import RepetitionPenaltyProcessor
from chatstream.plugins.processors.sampling import TemperatureProcessor, TopKProcessor
from chatstream.settings import DEFAULT_PIPELINE, SamplingSettings, SettingsError
from chatstream.testing import isolated_plugins
from chatstream.types import GenerationParams, RowInfo


@pytest.fixture(scope="module")
def registry() -> dict[str, Any]:
    return processor_registry(isolated_plugins().pm)


def row(**params: Any) -> RowInfo:
    return RowInfo(GenerationParams(**params), prompt_len=2)


def test_builtin_processors_cover_the_default_pipeline(registry: dict[str, Any]) -> None:
    assert set(DEFAULT_PIPELINE) <= set(registry)
    assert registry["repetition"].plugin == "chatstream.plugins.processors.penalties"
    assert registry["top_p"].plugin == "chatstream.plugins.processors.sampling"


def test_unknown_pipeline_name_lists_the_known_ones(registry: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as info:
        make_pipeline_builder(SamplingSettings(pipeline=["repetition", "top_n"]), registry)
    message = str(info.value)
    assert "'top_n'" in message
    assert "sampling.pipeline" in message and "CHATSTREAM_SAMPLING__PIPELINE" in message
    for name in DEFAULT_PIPELINE:
        assert name in message


def test_options_for_a_processor_not_in_the_pipeline_are_refused(registry: dict[str, Any]) -> None:
    settings = SamplingSettings(pipeline=["temperature"], processors={"repetition": {"window": 64}})
    with pytest.raises(SettingsError, match=r"'repetition'.*add the processor to sampling.pipeline"):
        make_pipeline_builder(settings, registry)


def test_bad_operator_options_fail_at_start_up(registry: dict[str, Any]) -> None:
    settings = SamplingSettings(processors={"frequency": {"window": -3}})
    with pytest.raises(SettingsError) as info:
        make_pipeline_builder(settings, registry)
    assert "'sampling.processors.frequency.window'" in str(info.value) and "(got -3)" in str(info.value)


def test_a_name_twice_is_refused(registry: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match="'top_k' more than once"):
        make_pipeline_builder(SamplingSettings(pipeline=["top_k", "temperature", "top_k"]), registry)


def test_build_follows_the_configured_order_and_skips_idle_processors(registry: dict[str, Any]) -> None:
    build = make_pipeline_builder(SamplingSettings(pipeline=["top_k", "temperature", "repetition"]), registry)
    processors = build([row(temperature=0.5, top_k=5, repetition_penalty=1.2), row()])
    assert [type(p) for p in processors] == [TopKProcessor, TemperatureProcessor, RepetitionPenaltyProcessor]
    assert build([row(temperature=0.0)]) == []  # greedy without penalties costs nothing


def test_operator_options_reach_the_processor(registry: dict[str, Any]) -> None:
    settings = SamplingSettings(pipeline=["frequency"], processors={"frequency": {"include_prompt": True}})
    build = make_pipeline_builder(settings, registry)
    rows = [RowInfo(GenerationParams(frequency_penalty=1.0), prompt_len=3)]
    ids = torch.tensor([[4, 4, 5]])  # all prompt
    scores = apply_pipeline(build(rows), ids, torch.zeros(1, 6))
    assert scores.tolist() == [[0.0, 0.0, 0.0, 0.0, -2.0, -1.0]]
    # Default options (OpenAI's): the prompt does not count.
    default = make_pipeline_builder(SamplingSettings(pipeline=["frequency"]), registry)
    assert apply_pipeline(default(rows), ids, torch.zeros(1, 6)).tolist() == [[0.0] * 6]


class _BadPlugin:
    @hookimpl
    def register_logits_processors(self, register: Any) -> None:
        register("broken", "not a factory")


def test_a_non_callable_factory_is_refused_naming_it() -> None:
    with pytest.raises(PluginError, match=r"'broken'.*callable factory"):
        processor_registry(isolated_plugins(_BadPlugin()).pm)


def test_greedy_rows_take_the_argmax_and_filtered_tokens_are_never_sampled() -> None:
    scores = torch.tensor([[0.0, 5.0, 1.0, float("-inf")]] * 3)
    rows = [row(temperature=0.0), row(temperature=1.0), row(temperature=1.0)]
    for _ in range(200):
        tokens = sample_next_tokens(scores, rows)
        assert tokens.dtype == torch.long and tokens[0] == 1
        assert (tokens != 3).all()


@pytest.mark.parametrize("vocab", [4, 400])
def test_sampling_follows_the_softmax(vocab: int) -> None:
    # With vocab 400 the four candidates are all that survive filtering, as after top-k.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    where = torch.tensor([0, 1, 2, 3]) if vocab == 4 else torch.tensor([3, 77, 150, 399])
    one = torch.full((vocab,), float("-inf"))
    one[where] = probs.log()
    draws = 4000
    torch.manual_seed(0)
    free = sample_next_tokens(one.expand(draws, vocab), [row()] * draws)
    seeded_generator = make_generator(5)
    seeded = torch.stack(
        [sample_next_tokens(one[None], [row()], [seeded_generator])[0] for _ in range(draws // 4)]
    )
    for tokens, n in ((free, draws), (seeded, draws // 4)):
        counts = torch.bincount(tokens, minlength=vocab)
        assert counts.sum() == counts[where].sum()  # nothing outside the survivors
        torch.testing.assert_close(counts[where] / n, probs, atol=0.05, rtol=0)


def test_seeded_sampling_is_reproducible_whatever_the_neighbours() -> None:
    gen = torch.Generator().manual_seed(1)
    mine = torch.randn(1, 50, generator=gen)

    def my_tokens(neighbours: int, seed_neighbours: bool, seed: int = 1234) -> list[int]:
        generator = make_generator(seed)
        others = torch.randn(neighbours, 50)
        tokens = []
        for step in range(20):
            scores = torch.cat([others, mine]) if step % 2 else torch.cat([mine, others])
            rows = [row() for _ in range(neighbours + 1)]
            mine_at = neighbours if step % 2 else 0
            generators: list[torch.Generator | None] = [
                make_generator(step) if seed_neighbours else None for _ in range(neighbours + 1)
            ]
            generators[mine_at] = generator
            tokens.append(int(sample_next_tokens(scores, rows, generators)[mine_at]))
        return tokens

    alone = my_tokens(0, False)
    assert len(set(alone)) > 3  # really sampling, not a constant
    assert my_tokens(5, False) == alone
    assert my_tokens(3, True) == alone
    assert my_tokens(2, False, seed=99) != alone  # the seed is what fixes them


def test_sample_next_tokens_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 rows for scores with 3 rows"):
        sample_next_tokens(torch.zeros(3, 4), [row(), row()])


def test_clamp_params_holds_requests_to_the_limits() -> None:
    limits = SamplingLimits(max_new_tokens=100, max_temperature=1.5, max_top_k=40, max_penalty=2.0)
    wild = GenerationParams(
        max_new_tokens=5000,
        temperature=3.0,
        top_k=0,
        repetition_penalty=10.0,
        frequency_penalty=-7.0,
        presence_penalty=0.1,
        presence_penalty_method="multiplicative",
    )
    held = clamp_params(wild, limits)
    assert (held.max_new_tokens, held.temperature, held.top_k) == (100, 1.5, 40)
    assert (held.repetition_penalty, held.frequency_penalty, held.presence_penalty) == (2.0, -2.0, 0.5)
    modest = GenerationParams(max_new_tokens=10, temperature=0.7, top_k=5, repetition_penalty=1.1)
    assert clamp_params(modest, {"max_new_tokens": 100, "max_penalty": 2.0}) == modest
    with pytest.raises(ValueError, match="max_penalty"):
        SamplingLimits(max_penalty=0.5)
