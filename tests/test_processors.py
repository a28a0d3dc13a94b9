"""Logits processors: penalties and sampling filters, batched, incremental, and inside model.generate."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from chatstream.plugins.processors.penalties import (
    FrequencyPenaltyProcessor,
    PresencePenaltyProcessor,
    RepetitionPenaltyProcessor,
    frequency_factory,
    presence_factory,
    repetition_factory,
)
from chatstream.plugins.processors.sampling import (
    MinPProcessor,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    min_p_factory,
    temperature_factory,
    top_k_factory,
    top_p_factory,
)
from chatstream.types import GenerationParams, RowInfo

VOCAB = 97
ALL_FACTORIES = [
    repetition_factory,
    frequency_factory,
    presence_factory,
    temperature_factory,
    top_k_factory,
    top_p_factory,
    min_p_factory,
]


def random_batch(seed: int, batch: int = 5, length: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids drawn from a small range (so repeats happen) and logits of both signs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB // 3, (batch, length), generator=gen)
    scores = torch.randn(batch, VOCAB, generator=gen) * 3
    return ids, scores


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    """Rows left-padded with -1, as the chatstream engine passes them."""
    width = max(len(row) for row in rows)
    return torch.tensor([[-1] * (width - len(row)) + row for row in rows])


def row(prompt_len: int, **params: Any) -> RowInfo:
    return RowInfo(GenerationParams(**params), prompt_len)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiplicative_repetition_equals_transformers(penalty: float, seed: int) -> None:
    ids, scores = random_batch(seed)
    assert (scores < 0).any() and (scores > 0).any()
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    got = RepetitionPenaltyProcessor(penalty)(ids, scores)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, scores)


def openai_reference(
    rows: list[list[int]], prompt_lens: list[int], scores: torch.Tensor, freq: list[float], pres: list[float]
) -> torch.Tensor:
    """logit - count * frequency - (count > 0) * presence, over generated tokens only."""
    out = scores.clone()
    for r, (tokens, prompt_len) in enumerate(zip(rows, prompt_lens, strict=True)):
        for token, count in Counter(tokens[prompt_len:]).items():
            out[r, token] -= count * freq[r] + pres[r]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_subtractive_frequency_and_presence_follow_the_openai_formula(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lengths = [30, 17, 25, 8]
    rows = [torch.randint(0, 12, (n,), generator=gen).tolist() for n in lengths]
    prompt_lens = [10, 5, 0, 8]
    freq = [0.5, 1.25, 0.0, 2.0]
    pres = [0.3, 0.0, 1.5, 0.7]
    scores = torch.randn(len(rows), VOCAB, generator=gen)
    infos = [
        row(n, frequency_penalty=f, presence_penalty=p)
        for n, f, p in zip(prompt_lens, freq, pres, strict=True)
    ]
    ids = left_pad(rows)
    frequency = frequency_factory(infos, {})
    presence = presence_factory(infos, {})
    assert frequency is not None and presence is not None
    got = presence(ids, frequency(ids, scores))
    expected = openai_reference(rows, prompt_lens, scores, freq, pres)
    torch.testing.assert_close(got, expected)


def test_multiplicative_frequency_divides_count_times() -> None:
    ids = torch.tensor([[5, 5, 5, 7]])
    scores = torch.tensor([[1.0, 0, 0, 0, 0, 2.0, 0, -2.0]])
    # With no prompt (plain use) every token of the first call is prompt; include it here.
    got = FrequencyPenaltyProcessor(2.0, "multiplicative", include_prompt=True)(ids, scores)
    assert got.tolist() == [[1.0, 0, 0, 0, 0, 2.0 / 8, 0, -4.0]]
    # A huge count stays finite: positive logits go to 0, negative ones to a very large negative.
    long_ids = torch.tensor([[5] * 500 + [7] * 500])
    far = FrequencyPenaltyProcessor(2.0, "multiplicative", include_prompt=True)(long_ids, scores)
    assert not far.isnan().any() and far[0, 5].item() == pytest.approx(0.0) and far[0, 7] < -1e20


def test_subtractive_repetition_and_multiplicative_presence() -> None:
    ids = torch.tensor([[1, 2, 2]])
    scores = torch.tensor([[3.0, 3.0, -3.0, 3.0]])
    assert RepetitionPenaltyProcessor(0.5, "subtractive")(ids, scores).tolist() == [[3.0, 2.5, -3.5, 3.0]]
    presence = PresencePenaltyProcessor(2.0, "multiplicative", include_prompt=True)
    assert presence(ids, scores).tolist() == [[3.0, 1.5, -6.0, 3.0]]


def full_pipeline(rows: list[RowInfo], options: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    options = options or {}
    built = [factory(rows, options.get(factory.__name__, {})) for factory in ALL_FACTORIES]
    return [p for p in built if p is not None]


def run(processors: list[Any], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(ids, scores)
    return scores


MIXED_ROWS: list[dict[str, Any]] = [
    dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, temperature=0.7, top_k=10),
    dict(
        repetition_penalty=0.5,
        repetition_penalty_method="subtractive",
        frequency_penalty=1.5,
        frequency_penalty_method="multiplicative",
        temperature=1.3,
        top_k=0,
        top_p=0.8,
    ),
    dict(temperature=0.0, presence_penalty=1.1, presence_penalty_method="multiplicative"),
    dict(top_k=3, min_p=0.2, presence_penalty=-0.5),
    dict(),
]


def test_batched_rows_with_different_parameters_equal_each_row_alone() -> None:
    gen = torch.Generator().manual_seed(7)
    histories = [torch.randint(0, 15, (n,), generator=gen).tolist() for n in (30, 22, 12, 26, 9)]
    prompt_lens = [12, 4, 12, 20, 3]
    rows = [row(n, **params) for n, params in zip(prompt_lens, MIXED_ROWS, strict=True)]
    scores = torch.randn(len(rows), VOCAB, generator=gen) * 2
    ids = left_pad(histories)
    batch_processors = full_pipeline(rows)
    alone = [full_pipeline([r]) for r in rows]
    for step in range(4):  # several steps, so incremental counting is compared too
        batched = run(batch_processors, ids, scores)
        for i, processors in enumerate(alone):
            single = run(processors, left_pad([histories[i]]), scores[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], single, msg=f"row {i} at step {step}")
        new = torch.randint(0, 15, (len(rows),), generator=gen).tolist()
        for history, token in zip(histories, new, strict=True):
            history.append(token)
        ids = left_pad(histories)
        scores = torch.randn(len(rows), VOCAB, generator=gen) * 2
    # The batch really mixed behaviours: some rows changed, the greedy row was not temperature-scaled.
    assert batched[2].isfinite().all()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": 5},
        {"include_prompt": True},
        {"include_prompt": False, "window": 7},
        {"include_prompt": True, "window": 1},
    ],
)
@pytest.mark.parametrize("factory", [repetition_factory, frequency_factory, presence_factory])
def test_incremental_counts_equal_a_full_recount(factory: Any, options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    histories = [torch.randint(0, 10, (n,), generator=gen).tolist() for n in (12, 6, 9)]
    prompt_lens = [12, 6, 9]  # the whole first history is prompt, as when a request joins
    params: dict[str, Any] = dict(
        repetition_penalty=1.5,
        frequency_penalty=0.7,
        presence_penalty=0.9,
        frequency_penalty_method="subtractive",
    )
    rows = [row(n, **params) for n in prompt_lens]
    incremental = factory(rows, options)
    for _ in range(40):
        for history in histories:
            history.append(int(torch.randint(0, 10, (1,), generator=gen)))
        ids = left_pad(histories)
        scores = torch.randn(len(rows), VOCAB, generator=gen)
        fresh = factory(rows, options)
        torch.testing.assert_close(incremental(ids, scores), fresh(ids, scores))


def test_window_counts_only_the_last_tokens() -> None:
    # History: prompt [4], generated [1, 1, 2, 3]; window 3 sees [1, 2, 3].
    ids = torch.tensor([[4, 1, 1, 2, 3]])
    scores = torch.zeros(1, 6)
    rows = [row(1, frequency_penalty=1.0)]
    no_window = frequency_factory(rows, {})
    windowed = frequency_factory(rows, {"window": 3})
    assert no_window is not None and windowed is not None
    assert no_window(ids, scores).tolist() == [[0.0, -2.0, -1.0, -1.0, 0.0, 0.0]]
    assert windowed(ids, scores).tolist() == [[0.0, -1.0, -1.0, -1.0, 0.0, 0.0]]
    # One more token: the first 1 left the window entirely, 2 leaves next step.
    ids = torch.tensor([[4, 1, 1, 2, 3, 5]])
    assert windowed(ids, scores).tolist() == [[0.0, 0.0, -1.0, -1.0, 0.0, -1.0]]
    # Repetition includes the prompt token 4, but only while it is inside the window.
    repetition = repetition_factory(
        [row(1, repetition_penalty=0.5, repetition_penalty_method="subtractive")], {}
    )
    windowed_repetition = repetition_factory(
        [row(1, repetition_penalty=0.5, repetition_penalty_method="subtractive")], {"window": 2}
    )
    assert repetition is not None and windowed_repetition is not None
    assert repetition(ids, scores)[0, 4] == -0.5
    assert windowed_repetition(ids, scores)[0].tolist() == [0.0, 0.0, 0.0, -0.5, 0.0, -0.5]


def test_left_padding_is_ignored() -> None:
    history = [3, 3, 8, 2]
    rows = [row(1, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5)]
    scores = torch.randn(1, 10) + 1
    padded = torch.tensor([[-1, -1, -1, *history]])
    for factory in (repetition_factory, frequency_factory, presence_factory):
        plain, with_padding = factory(rows, {}), factory(rows, {})
        unpadded_out = plain(torch.tensor([history]), scores)
        padded_out = with_padding(padded, scores)
        torch.testing.assert_close(padded_out, unpadded_out)
        # -1 must not wrap around to the last token of the vocabulary.
        assert padded_out[0, -1] == scores[0, -1]


def test_processors_do_not_modify_their_inputs() -> None:
    gen = torch.Generator().manual_seed(11)
    histories = [torch.randint(0, 15, (n,), generator=gen).tolist() for n in (30, 22, 12, 26, 9)]
    rows = [row(3, **params) for params in MIXED_ROWS]
    ids = left_pad(histories)
    scores = torch.randn(len(rows), VOCAB, generator=gen)
    processors = full_pipeline(rows)
    assert len(processors) == 7
    ids_before, scores_before = ids.clone(), scores.clone()
    for processor in processors:
        out = processor(ids, scores)
        assert out.data_ptr() != scores.data_ptr()
    assert torch.equal(ids, ids_before) and torch.equal(scores, scores_before)


def test_factories_return_none_when_no_row_needs_them() -> None:
    idle = [row(4, temperature=0.0), row(2, temperature=1.0, top_k=0)]
    assert full_pipeline(idle) == []
    neutral = [row(4, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, top_k=0)]
    assert full_pipeline(neutral) == []


def test_temperature_leaves_greedy_rows_unscaled() -> None:
    scores = torch.tensor([[2.0, -1.0], [2.0, -1.0], [2.0, -1.0]])
    processor = temperature_factory([row(1, temperature=0.0), row(1, temperature=0.5), row(1)], {})
    assert processor is not None
    assert processor(torch.zeros(3, 1, dtype=torch.long), scores).tolist() == [
        [2.0, -1.0],
        [4.0, -2.0],
        [2.0, -1.0],
    ]


def reference_top_p(scores: torch.Tensor, top_p: float) -> set[int]:
    """Tokens kept: walk down by probability until the mass above reaches top_p."""
    probs = scores.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def test_top_k_top_p_min_p_filter_per_row() -> None:
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 40, generator=gen)
    ids = torch.zeros(4, 1, dtype=torch.long)
    kept = TopKProcessor([1, 5, 0, 40])(ids, scores).isfinite().sum(-1).tolist()
    assert kept == [1, 5, 40, 40]
    top_p = [0.3, 0.9, 1.0, 0.05]
    filtered = TopPProcessor(top_p)(ids, scores)
    for i, p in enumerate(top_p):
        assert set(filtered[i].isfinite().nonzero().flatten().tolist()) == reference_top_p(scores[i], p)
    min_p = [0.0, 0.5, 0.9, 1.0]
    filtered = MinPProcessor(min_p)(ids, scores)
    probs = scores.softmax(-1)
    for i, m in enumerate(min_p):
        expected = probs[i] >= m * probs[i].max()
        assert torch.equal(filtered[i].isfinite(), expected)
        assert torch.equal(filtered[i][expected], scores[i][expected])


def test_top_p_after_top_k_matches_top_p_alone_on_the_survivors() -> None:
    gen = torch.Generator().manual_seed(9)
    scores = torch.randn(3, 500, generator=gen) * 2
    ids = torch.zeros(3, 1, dtype=torch.long)
    after_k = TopKProcessor(20)(ids, scores)
    filtered = TopPProcessor(0.6)(ids, after_k)
    for i in range(3):
        survivors = after_k[i].isfinite().nonzero().flatten()
        expected = {int(survivors[j]) for j in reference_top_p(after_k[i][survivors], 0.6)}
        assert set(filtered[i].isfinite().nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TemperatureProcessor(-0.1), "temperature=-0.1"),
        (lambda: TemperatureProcessor(math.nan), "temperature=nan"),
        (lambda: TopKProcessor(-1), "top_k=-1"),
        (lambda: TopKProcessor(2.5), "top_k=2.5"),
        (lambda: TopPProcessor(0.0), "top_p=0.0"),
        (lambda: MinPProcessor(1.5), "min_p=1.5"),
        (lambda: RepetitionPenaltyProcessor(0.0), "repetition_penalty=0.0"),
        (lambda: FrequencyPenaltyProcessor(math.inf), "frequency_penalty=inf"),
        (lambda: PresencePenaltyProcessor(1.0, "divide"), "presence_penalty_method='divide'"),
        (lambda: RepetitionPenaltyProcessor([1.2, 1.3], prompt_lens=[1]), "2 values for a batch of 1"),
        (
            lambda: repetition_factory([], {"windows": 3}),
            "'sampling.processors.repetition.windows': unknown option; known options: include_prompt, window",
        ),
        (
            lambda: frequency_factory([], {"window": 0}),
            "'sampling.processors.frequency.window': Input should be greater than or equal to 1 (got 0)",
        ),
        (
            lambda: presence_factory([], {"include_prompt": "yes"}),
            "'sampling.processors.presence.include_prompt': Input should be a valid boolean (got 'yes')",
        ),
        (
            lambda: top_k_factory([], {"k": 3}),
            "'sampling.processors.top_k.k': unknown option; top_k takes no options",
        ),
    ],
)
def test_invalid_values_are_refused_with_the_field_named(build: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)


def test_a_processor_reused_for_a_new_history_recounts() -> None:
    # model.generate callers may keep one LogitsProcessorList for several prompts.
    reused = FrequencyPenaltyProcessor(1.0, include_prompt=True)
    scores = torch.zeros(1, 8)
    reused(torch.tensor([[1, 1, 1]]), scores)
    second = torch.tensor([[2, 3, 3, 4, 5]])
    fresh = FrequencyPenaltyProcessor(1.0, include_prompt=True)
    assert reused(second, scores).tolist() == fresh(second, scores).tolist()
    assert fresh(second, scores)[0, 1] == 0.0


def test_processor_refuses_a_different_batch() -> None:
    processor = repetition_factory([row(1, repetition_penalty=1.2)] * 2, {})
    assert processor is not None
    with pytest.raises(ValueError, match="built for 2 rows but got 3"):
        processor(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 10))


# --- inside model.generate ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def greedy(model: LlamaForCausalLM, prompt: torch.Tensor, *processors: Any, new: int = 24) -> list[int]:
    out: Any = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        logits_processor=LogitsProcessorList(processors),
    )
    return out[0, prompt.shape[1] :].tolist()


def test_presence_penalty_stops_greedy_repeats_inside_generate(tiny_llama: LlamaForCausalLM) -> None:
    prompt = torch.tensor([[1, 10, 11, 12, 13]])
    plain = greedy(tiny_llama, prompt)
    assert len(set(plain)) < len(plain), "a random tiny model repeats itself when decoding greedily"
    penalized = greedy(tiny_llama, prompt, PresencePenaltyProcessor(100.0))
    assert len(set(penalized)) == len(penalized)
    frequency = greedy(tiny_llama, prompt, FrequencyPenaltyProcessor(100.0))
    assert len(set(frequency)) == len(frequency)


def test_repetition_penalty_inside_generate_matches_transformers(tiny_llama: LlamaForCausalLM) -> None:
    prompt = torch.tensor([[1, 10, 11, 12, 13]])
    plain = greedy(tiny_llama, prompt)
    ours = greedy(tiny_llama, prompt, RepetitionPenaltyProcessor(penalty=1.3, method="multiplicative"))
    theirs = greedy(tiny_llama, prompt, RepetitionPenaltyLogitsProcessor(1.3))
    assert ours == theirs
    assert ours != plain
    # A subtractive penalty this strong forbids every token already seen, prompt included.
    strict = greedy(tiny_llama, prompt, RepetitionPenaltyProcessor(100.0, "subtractive"))
    history = prompt[0].tolist() + strict
    assert len(set(history)) == len(history)
