"""Trimming a long conversation in large steps, so that its prompt keeps a stable prefix.

Over a simulated 40-turn conversation in a small context: every prompt fits; the first kept
message changes only a few times (at most total size / half the budget) and between changes the
prompt of each turn starts with the previous prompt and its answer; right after a change the prompt
is about half the budget plus the newest exchange; the system prompt is always first. Nothing is
kept between turns: a copy of the conversation (as a stateless client resends it) gets the same
prompt. The cost stays linear in the conversation.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from chatstream.errors import ChatStreamError
from chatstream.mock_engine import MockEngine
from chatstream.plugins.prompts.chatml import ChatMLPrompt
from chatstream.plugins.prompts.llama2 import Llama2ChatPrompt
from chatstream.plugins.prompts.llama3_1 import Llama31ChatPrompt
from chatstream.prompt import AbstractChatPrompt
from chatstream.prompt_fit import FittedPrompt, fit_prompt, measure, render
from chatstream.sessions import ChatSession
from chatstream.testkit_models import make_tiny_tokenizer
from chatstream.tokenization import HFPromptEncoder
from chatstream.types import Segment

SYSTEM = "You answer questions about numbers."
# Exchanges are about a tenth of the budget: tokens of the generator mock (about 35 an exchange)
# and of the tiny tokenizer (about 85).
MAX_NEW = 40
MOCK_CONTEXT = 280 + MAX_NEW
TOKENIZER_CONTEXT = 800 + MAX_NEW
TURNS = 40


class TinyEncoder:
    """A tokenizing engine: segments -> ids with the tiny byte-level BPE tokenizer."""

    def __init__(self) -> None:
        self.tokenizer = make_tiny_tokenizer()
        self._encoder = HFPromptEncoder(self.tokenizer)

    def encode(self, prompt: Any, add_special_tokens: bool | None = None) -> list[int]:
        segments = [Segment.template(prompt)] if isinstance(prompt, str) else prompt
        return self._encoder.encode(segments, add_special_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))


def question(i: int, rng: random.Random) -> str:
    return f"Q{i}: what about " + " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 12))) + "?"


def answer(i: int, rng: random.Random, lead: str = "") -> str:
    return f"{lead}A{i}: " + " ".join(["it is even"] * rng.randint(1, 6)) + "."


def first_kept(text: str) -> int:
    """The number of the oldest question in a rendered prompt."""
    return min(int(n) for n in re.findall(r"Q(\d+):", text))


def exchange_tokens(cls: type[AbstractChatPrompt], engine: Any, q: str, a: str) -> int:
    """What one exchange adds to a prompt that has only the system prompt."""
    prompt = cls()
    prompt.set_system(SYSTEM)
    _, alone = measure(engine, render(prompt), cls.add_special_tokens)
    prompt.add_requester_msg(q)
    prompt.add_responder_msg(a)
    _, added = measure(engine, render(prompt), cls.add_special_tokens)
    return (added or 0) - (alone or 0)


def simulate(
    cls: type[AbstractChatPrompt], engine: Any, fit: Callable[[AbstractChatPrompt], FittedPrompt], lead: str
) -> tuple[AbstractChatPrompt, list[tuple[FittedPrompt, str]], list[int]]:
    """40 turns; each prompt fitted, then answered (answers start with ``lead``). Returns the
    conversation, the (fitted, answer) of each turn and the token count of each exchange alone."""
    rng = random.Random(20240726)
    prompt = cls()
    prompt.set_system(SYSTEM)
    turns: list[tuple[FittedPrompt, str]] = []
    sizes = []
    for i in range(TURNS):
        q, a = question(i, rng), answer(i, rng, lead)
        prompt.add_requester_msg(q)
        prompt.add_responder_msg(None)
        fitted = fit(prompt)
        # Nothing is kept between turns: the conversation as a client resends it gets the same prompt.
        assert fit(type(prompt).from_dict(prompt.to_dict())).text == fitted.text
        prompt.set_responder_last_msg(a)
        turns.append((fitted, a))
        sizes.append(exchange_tokens(cls, engine, q, a))
    return prompt, turns, sizes


def check_large_steps(
    cls: type[AbstractChatPrompt],
    engine: Any,
    fit: Callable[[AbstractChatPrompt], FittedPrompt],
    system_head: str,
    budget: int,
    lead: str = "",
) -> None:
    prompt, turns, sizes = simulate(cls, engine, fit, lead)
    whole = measure(engine, render(prompt), cls.add_special_tokens)[1]
    assert whole is not None and whole > 3 * budget  # long enough to be cut several times
    firsts = [first_kept(fitted.text) for fitted, _ in turns]
    changes = [i for i in range(1, TURNS) if firsts[i] != firsts[i - 1]]
    assert changes, "the conversation never had to be trimmed"
    assert firsts == sorted(firsts)  # a cut only moves forward
    # Each change moves the cut by one grid step (half the budget) or more.
    assert len(changes) <= math.ceil(whole / (budget // 2))
    largest = max(sizes)
    for i, (fitted, _) in enumerate(turns):
        assert fitted.tokens is not None and fitted.tokens <= budget, i
        assert fitted.text.startswith(system_head), i
        assert f"Q{i}:" in fitted.text  # the last exchange is always kept
        if i in changes:
            # About half the budget plus the newest exchange (and one exchange of grid rounding).
            assert fitted.tokens <= budget // 2 + 2 * largest, (i, fitted.tokens)
        elif i:
            previous, previous_answer = turns[i - 1]
            assert fitted.text.startswith(previous.text + previous_answer), i


def fitter(
    engine: Any, add_special_tokens: bool | None, context_len: int = MOCK_CONTEXT
) -> Callable[[AbstractChatPrompt], FittedPrompt]:
    def fit(prompt: AbstractChatPrompt) -> FittedPrompt:
        return fit_prompt(
            prompt,
            engine,
            context_len=context_len,
            max_new_tokens=MAX_NEW,
            add_special_tokens=add_special_tokens,
        )

    return fit


CHATML_HEAD = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
LLAMA2_HEAD = f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nQ"  # the system prompt joins the first kept turn
LLAMA31_HEAD = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date"


@pytest.mark.parametrize(
    ("cls", "head", "lead"),
    [
        (ChatMLPrompt, CHATML_HEAD, ""),
        (Llama31ChatPrompt, LLAMA31_HEAD, ""),
        # Llama 2 writes a past answer as " " + answer.strip(): answers as the model writes them.
        (Llama2ChatPrompt, LLAMA2_HEAD, " "),
    ],
)
def test_cuts_move_rarely_on_the_generator_mock(cls: type[AbstractChatPrompt], head: str, lead: str) -> None:
    engine = MockEngine()
    check_large_steps(cls, engine, fitter(engine, cls.add_special_tokens), head, MOCK_CONTEXT - MAX_NEW, lead)


def test_cuts_move_rarely_on_a_tokenizer() -> None:
    engine = TinyEncoder()
    fit = fitter(engine, ChatMLPrompt.add_special_tokens, TOKENIZER_CONTEXT)
    check_large_steps(ChatMLPrompt, engine, fit, CHATML_HEAD, TOKENIZER_CONTEXT - MAX_NEW)


def test_cuts_move_rarely_through_chatstream(mock_chatstream: Any) -> None:
    cs = mock_chatstream(context_len=MOCK_CONTEXT, max_new_tokens=MAX_NEW, chat_prompt_clazz=ChatMLPrompt)

    def fit(prompt: AbstractChatPrompt) -> FittedPrompt:
        request = asyncio.run(cs.prepare_generation(ChatSession(None, prompt), cs.generation_params()))
        assert request.segments is not None
        return FittedPrompt(request.segments, request.prompt_ids, request.prompt_tokens)

    check_large_steps(ChatMLPrompt, cs.engine, fit, CHATML_HEAD, MOCK_CONTEXT - MAX_NEW)


def test_a_last_exchange_that_alone_does_not_fit_is_refused() -> None:
    engine = MockEngine()
    prompt = ChatMLPrompt()
    for i in range(10):
        prompt.add_requester_msg(f"Q{i}: short")
        prompt.add_responder_msg("ok")
    prompt.add_requester_msg("word " * (MOCK_CONTEXT - MAX_NEW))
    prompt.add_responder_msg(None)
    with pytest.raises(ChatStreamError) as refused:
        fitter(engine, False)(prompt)
    assert refused.value.status == 400 and refused.value.code == "prompt_too_long"
    # With one long exchange among short ones, the rest is cut just before it.
    prompt.set_responder_last_msg("ok")
    prompt.add_requester_msg("Q99: and now?")
    prompt.add_responder_msg(None)
    fitted = fitter(engine, False)(prompt)
    assert (
        fitted.tokens is not None
        and fitted.tokens <= (MOCK_CONTEXT - MAX_NEW)
        and first_kept(fitted.text) == 99
    )


class CountingEngine(MockEngine):
    """The mock, counting every token it is asked to count."""

    def __init__(self) -> None:
        super().__init__()
        self.counted = 0

    def count_tokens(self, text: str) -> int | None:
        tokens = super().count_tokens(text) or 0
        self.counted += tokens
        return tokens


def test_the_cost_is_linear_in_the_conversation() -> None:
    ratios = []
    for exchanges in (100, 400):
        engine = CountingEngine()
        prompt = ChatMLPrompt()
        prompt.set_system(SYSTEM)
        rng = random.Random(exchanges)
        for i in range(exchanges):
            prompt.add_requester_msg(question(i, rng))
            prompt.add_responder_msg(answer(i, rng))
        prompt.add_requester_msg("Q999: last?")
        prompt.add_responder_msg(None)
        whole = engine.count_tokens("".join(s.text for s in render(prompt))) or 1
        engine.counted = 0
        fitted = fitter(engine, False)(prompt)
        assert fitted.tokens is not None and fitted.tokens <= (MOCK_CONTEXT - MAX_NEW)
        ratios.append(engine.counted / whole)
    # The whole prompt once, each dropped exchange measured on its own (once, and twice over, with
    # the format's fixed text around it), and the rest at one or two cut points: a fixed multiple of
    # the conversation, the same for a conversation four times as long.
    assert max(ratios) <= 8
    assert ratios[1] <= ratios[0] * 1.2
