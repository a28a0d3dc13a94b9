"""Prompts keep a stable prefix from turn to turn, per built-in format.

The prompt the model saw at turn N (ending in the generation prompt), followed by the answer it
produced, should be exactly the start of the prompt of turn N+1: then the KV cache of turn N can
be reused. Every format is checked turn by turn, with the system prompt left at its default, set
and removed, and with answers that have leading or trailing spaces and newlines, as a model may
produce them.

Some formats cannot be stable for every answer because their reference template writes the
answer differently in the history than the model produced it after the generation prompt. For
each such format the test states, and checks, exactly what the template writes instead
(``WRITTEN_AS``) and which of the answers below stay prefix-stable (``STABLE_ANSWERS``). The same
facts are listed in docs/prompt-formats.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType
from typing import Any

import pytest

from chatstream.plugins.prompts import llama3_1
from chatstream.plugins.prompts.chatml import ChatMLPrompt
from chatstream.plugins.prompts.hf_template import HFTemplatePrompt
from chatstream.plugins.prompts.karasu import KarasuChatPrompt
from chatstream.plugins.prompts.llama2 import Llama2ChatPrompt
from chatstream.plugins.prompts.llama3 import Llama3ChatPrompt
from chatstream.plugins.prompts.llama3_1 import Llama31ChatPrompt
from chatstream.plugins.prompts.nekomata import NekomataInstructionPrompt
from chatstream.plugins.prompts.rakutenai import RakutenAIChatPrompt
from chatstream.prompt import AbstractChatPrompt
from chatstream.types import joined

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

ANSWERS: dict[str, str] = {
    "plain": "Paris is the capital of France.",
    "leading-space": " Paris is the capital.",
    "trailing-newline": "Paris.\n",
    "leading-newlines": "\n\nParis.",
    "spaces-both-ends": "  Paris.  \n",
    "multi-line": "Line one.\nLine two.",
    "empty": "",
}
NAME_OF = {text: name for name, text in ANSWERS.items()}
QUESTIONS = ["What is the capital of France?", "  And of Japan? ", "Thanks!\n", "一つ目は？"]
SYSTEMS: dict[str, str | EllipsisType | None] = {
    "default-system": ...,  # never touched: the format's default (if any)
    "system-set": "You are a terse assistant.\n",
    "system-removed": None,
}


def _hf_tokenizer(template: str, bos: str, eos: str) -> Any:
    """A tiny fast tokenizer built in the test, carrying a reference chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, bos: 1, eos: 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tokenizer


def _formats() -> dict[str, type[AbstractChatPrompt]]:
    return {
        "chatml": ChatMLPrompt,
        "llama2": Llama2ChatPrompt,
        "llama3": Llama3ChatPrompt,
        "llama3.1": Llama31ChatPrompt,
        "rakutenai": RakutenAIChatPrompt,
        "karasu": KarasuChatPrompt,
        "nekomata": NekomataInstructionPrompt,
        "hf-smollm2": HFTemplatePrompt.for_tokenizer(
            _hf_tokenizer("smollm2.jinja", "<|im_start|>", "<|im_end|>")
        ),
        "hf-llama3": HFTemplatePrompt.for_tokenizer(
            _hf_tokenizer("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>")
        ),
        "hf-llama3.1": HFTemplatePrompt.for_tokenizer(
            _hf_tokenizer("llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>")
        ),
    }


FORMATS = _formats()
MULTI_TURN = [name for name in FORMATS if name != "nekomata"]


def _strip(answer: str) -> str:
    return answer.strip()


def _after_space(answer: str) -> str:
    return " " + answer


def _space_then_stripped(answer: str) -> str:
    return " " + answer.strip()


# What the next prompt holds right after the previous prompt, where the model's answer was.
# Identity: prefix-stable. Anything else is the reference template's own rule:
WRITTEN_AS: dict[str, Callable[[str], str]] = {
    "chatml": lambda answer: answer,  # ChatML writes contents as given
    "hf-smollm2": lambda answer: answer,
    # Llama 3 / 3.1 templates write ``content | trim``: surrounding whitespace of an answer is lost.
    "llama3": _strip,
    "llama3.1": _strip,
    "hf-llama3": _strip,
    "hf-llama3.1": _strip,
    # Llama 2 writes ``' ' + content.strip() + ' ' + eos`` after `` [/INST]``.
    "llama2": _space_then_stripped,
    # The generation prompt ends ``ASSISTANT:`` (karasu: `` [/INST]``) but a past answer is written
    # ``ASSISTANT: `` + content (karasu: `` [/INST] `` + content): one space more than the model saw.
    "rakutenai": _after_space,
    "karasu": _after_space,
}

ALL = set(ANSWERS)
STABLE_ANSWERS: dict[str, set[str]] = {
    "chatml": ALL,
    "hf-smollm2": ALL,
    "llama3": {"plain", "multi-line", "empty"},
    "llama3.1": {"plain", "multi-line", "empty"},
    "hf-llama3": {"plain", "multi-line", "empty"},
    "hf-llama3.1": {"plain", "multi-line", "empty"},
    # " Paris is the capital." is written back as " Paris is the capital." followed by " </s>".
    "llama2": {"leading-space", "empty"},
    # Only an empty answer (nothing to differ) survives the extra space.
    "rakutenai": {"empty"},
    "karasu": {"empty"},
}


def _new(fmt: str, system: str | EllipsisType | None) -> AbstractChatPrompt:
    prompt = FORMATS[fmt]()
    if system is not Ellipsis:
        prompt.set_system(system)
    return prompt


def _turns(fmt: str, system: Any, answers: list[str], *, restart: bool = False) -> list[tuple[str, str, str]]:
    """``(prompt seen, answer produced, next prompt)`` for each turn after the first.

    With ``restart`` the conversation goes through ``to_dict``/``from_dict`` between turns, as
    when a server restarts and loads the session from its store.
    """
    prompt = _new(fmt, system)
    cls = type(prompt)
    pairs = []
    seen: tuple[str, str] | None = None
    for turn, answer in enumerate([*answers, None]):
        if restart:
            prompt = cls.from_dict(prompt.to_dict())
        prompt.add_requester_msg(QUESTIONS[turn % len(QUESTIONS)])
        prompt.add_responder_msg(None)
        text = prompt.create_prompt()
        assert joined(prompt.render_segments()) == text
        if seen is not None:
            pairs.append((seen[0], seen[1], text))
        if answer is None:
            break
        prompt.set_responder_last_msg(answer)
        seen = (text, answer)
    return pairs


@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("fmt", MULTI_TURN)
def test_the_next_prompt_starts_with_the_last_prompt_and_answer(fmt: str, system: str) -> None:
    for name, answer in ANSWERS.items():
        for seen, produced, following in _turns(fmt, SYSTEMS[system], [ANSWERS["plain"], answer, answer]):
            # What the template writes in place of the answer comes right after the old prompt ...
            assert following.startswith(seen + WRITTEN_AS[fmt](produced)), (name, seen, following)
            # ... so the old prompt plus the model's own answer is a prefix exactly when that is the answer.
            stable = following.startswith(seen + produced)
            assert stable is (NAME_OF[produced] in STABLE_ANSWERS[fmt]), (fmt, name, produced)


@pytest.mark.parametrize("fmt", MULTI_TURN)
def test_prefix_stable_answers_survive_a_restart_between_turns(fmt: str) -> None:
    answers = [ANSWERS[name] for name in sorted(STABLE_ANSWERS[fmt])]
    pairs = _turns(fmt, "Be kind.", answers, restart=True)
    assert len(pairs) == len(answers)
    for seen, produced, following in pairs:
        assert following.startswith(seen + produced)


def test_formats_listed_here_are_every_builtin_multi_turn_format() -> None:
    assert set(WRITTEN_AS) == set(STABLE_ANSWERS) == set(MULTI_TURN)


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_nekomata_is_a_task_prompt_and_never_prefix_stable(system: str) -> None:
    # Expected difference: the nekomata card's prompt is single-turn (指示/入力/応答). Each prompt
    # holds only the last user message; earlier turns and every answer are left out, so no prefix
    # carries over (beyond the fixed preamble) and there is no KV cache to reuse.
    pairs = _turns("nekomata", SYSTEMS[system], list(ANSWERS.values()))
    for seen, produced, following in pairs:
        assert not following.startswith(seen + produced)
        assert produced == "" or produced not in following
        common = len(seen) - len(seen.split("### 指示:\n", 1)[1])
        assert following[:common] == seen[:common]  # the preamble is all they share


# -- llama3.1: the date of the conversation -----------------------------------------------------------


def _on(monkeypatch: pytest.MonkeyPatch, day: datetime.date) -> None:
    monkeypatch.setattr(llama3_1, "_today", lambda: day)


def test_llama3_1_keeps_the_first_days_date_on_later_days(monkeypatch: pytest.MonkeyPatch) -> None:
    _on(monkeypatch, datetime.date(2025, 3, 9))
    prompt = Llama31ChatPrompt()
    prompt.add_requester_msg("hi")
    prompt.add_responder_msg(None)
    first = prompt.create_prompt()
    assert "Today Date: 09 Mar 2025\n\n" in first
    prompt.set_responder_last_msg("Hello!")
    _on(monkeypatch, datetime.date(2025, 3, 10))
    prompt.add_requester_msg("still there?")
    prompt.add_responder_msg(None)
    second = prompt.create_prompt()
    assert second.startswith(first + "Hello!")
    assert "10 Mar 2025" not in second
    # A conversation started on the new day is dated with it.
    assert "Today Date: 10 Mar 2025\n\n" in Llama31ChatPrompt().create_prompt()


def test_llama3_1_date_survives_to_dict_and_from_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    _on(monkeypatch, datetime.date(2024, 12, 31))
    prompt = Llama31ChatPrompt()
    prompt.add_requester_msg("hi")
    prompt.add_responder_msg("hello")
    data = prompt.to_dict()
    assert data["date_string"] == "31 Dec 2024"
    _on(monkeypatch, datetime.date(2025, 1, 1))  # the server restarts the next day
    restored = Llama31ChatPrompt.from_dict(data)
    assert restored.date_string == "31 Dec 2024"
    assert restored.to_dict() == data
    assert restored.create_prompt() == prompt.create_prompt()


def test_llama3_1_loads_a_conversation_saved_without_a_date(monkeypatch: pytest.MonkeyPatch) -> None:
    _on(monkeypatch, datetime.date(2024, 7, 1))
    data = Llama31ChatPrompt().to_dict()
    del data["date_string"]  # saved before conversations had a date
    _on(monkeypatch, datetime.date(2025, 2, 3))
    restored = Llama31ChatPrompt.from_dict(data)
    assert restored.date_string == "03 Feb 2025"  # dated when loaded, then kept
    assert Llama31ChatPrompt.from_dict(restored.to_dict()).date_string == "03 Feb 2025"
    data["date_string"] = 20250203
    with pytest.raises(ValueError, match="date_string"):
        Llama31ChatPrompt.from_dict(data)


@pytest.mark.parametrize(
    ("day", "text"),
    [(datetime.date(2024, 7, 26), "26 Jul 2024"), (datetime.date(2023, 1, 5), "05 Jan 2023")],
)
def test_llama3_1_date_is_written_as_the_template_writes_it(day: datetime.date, text: str) -> None:
    # ``strftime("%d %b %Y")`` in English, whatever the process locale.
    assert llama3_1.date_string(day) == text
