"""Every built-in prompt format renders exactly what its reference chat template renders.

The reference templates and their sources are in tests/data/chat_templates/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chatstream.plugins.prompts.chatml import ChatMLPrompt
from chatstream.plugins.prompts.karasu import KarasuChatPrompt
from chatstream.plugins.prompts.llama2 import Llama2ChatPrompt
from chatstream.plugins.prompts.llama3 import Llama3ChatPrompt
from chatstream.plugins.prompts.llama3_1 import Llama31ChatPrompt
from chatstream.plugins.prompts.nekomata import NekomataInstructionPrompt
from chatstream.plugins.prompts.rakutenai import RakutenAIChatPrompt
from chatstream.prompt import AbstractChatPrompt
from chatstream.prompt_formats import build_prompt, render_chat_template

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# format class, reference template, bos_token, eos_token (from the README's table)
FORMATS: dict[str, tuple[type[AbstractChatPrompt], str, str, str]] = {
    "llama2": (Llama2ChatPrompt, "llama2.jinja", "<s>", "</s>"),
    "llama3": (Llama3ChatPrompt, "llama3.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": (Llama31ChatPrompt, "llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "chatml": (ChatMLPrompt, "smollm2.jinja", "<|im_start|>", "<|im_end|>"),
    "rakutenai": (RakutenAIChatPrompt, "rakutenai.jinja", "<s>", "</s>"),
    "karasu": (KarasuChatPrompt, "karasu.jinja", "<s>", "</s>"),
    "nekomata": (NekomataInstructionPrompt, "nekomata.jinja", "<|endoftext|>", "<|endoftext|>"),
}

Conversation = list[dict[str, str]]


def _sys(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


CONVERSATIONS: dict[str, Conversation] = {
    "no-system-one-turn": [_user("What is the capital of France?")],
    "system-one-turn": [_sys("You are a terse assistant."), _user("Name three primes.")],
    "system-three-rounds": [
        _sys("You are a helpful assistant."),
        _user("Hi!"),
        _bot("Hello! How can I help?"),
        _user("Tell me a joke."),
        _bot("Why did the chicken cross the road? To get to the other side."),
        _user("Another one, please."),
    ],
    "no-system-two-rounds": [_user("1+1?"), _bot("2"), _user("2+2?")],
    "japanese": [
        _sys("あなたは親切なアシスタントです。"),
        _user("日本の首都はどこですか?"),
        _bot("東京です。"),
        _user("次の日本語を英語に翻訳してください:猫が好きです。"),
    ],
    "newlines-and-spaces": [
        _sys("  Line one of the system prompt.\nLine two.  \n"),
        _user("  first line\nsecond line\n\n  "),
        _bot(" an answer\nwith two lines \n"),
        _user("\u3000全角スペースで囲む\u3000\n"),
    ],
    "ends-with-answer": [_user("Say hi."), _bot("hi")],
}

CASES = [(fmt, conv) for fmt in FORMATS for conv in CONVERSATIONS]


def _reference(fmt: str, conversation: Conversation, prompt: AbstractChatPrompt | None = None) -> str:
    """The reference template's text; for a dated format, with the date of ``prompt``."""
    _, template, bos, eos = FORMATS[fmt]
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    extra = {"date_string": prompt.date_string} if isinstance(prompt, Llama31ChatPrompt) else {}
    return render_chat_template(text, conversation, bos_token=bos, eos_token=eos, **extra)


@pytest.mark.parametrize(("fmt", "conv"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_create_prompt_matches_reference_template(fmt: str, conv: str) -> None:
    cls = FORMATS[fmt][0]
    conversation = CONVERSATIONS[conv]
    prompt = build_prompt(cls, conversation)
    assert prompt.create_prompt() == _reference(fmt, conversation, prompt)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_single_turn_ttl_renders_only_the_last_exchange(fmt: str) -> None:
    cls = FORMATS[fmt][0]
    conversation = CONVERSATIONS["system-three-rounds"]
    prompt = build_prompt(cls, conversation)
    prompt.set_prompt_ttl(1)
    assert prompt.create_prompt() == _reference(fmt, [conversation[0], conversation[-1]], prompt)
    # The history is kept: lifting the limit renders everything again.
    prompt.set_prompt_ttl(None)
    if fmt != "nekomata":  # a task prompt ignores earlier turns either way
        assert prompt.create_prompt() == _reference(fmt, conversation, prompt)


def test_chatml_writes_smollm2_default_system_even_when_removed() -> None:
    prompt = ChatMLPrompt()
    prompt.set_system(None)
    prompt.add_requester_msg("hi")
    prompt.add_responder_msg(None)
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.create_prompt() == expected == _reference("chatml", [_user("hi")])


def test_llama2_literal_example() -> None:
    # Written out by hand so that a bug shared by the format and the renderer cannot hide.
    prompt = build_prompt(Llama2ChatPrompt, [_sys("S"), _user(" u1 "), _bot("a1"), _user("u2")])
    # Only the whole first turn is stripped: the user text keeps its leading space after <</SYS>>.
    assert (
        prompt.create_prompt() == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n u1 [/INST] a1 </s><s>[INST] u2 [/INST]"
    )


def test_llama2_rejects_two_user_messages_in_a_row() -> None:
    prompt = Llama2ChatPrompt()
    prompt.add_requester_msg("a")
    prompt.add_requester_msg("b")
    with pytest.raises(ValueError, match="alternating user/assistant"):
        prompt.create_prompt()


def test_nekomata_literal_example_and_needs_a_user_message() -> None:
    prompt = NekomataInstructionPrompt()
    prompt.set_system("次の日本語を英語に翻訳してください。")
    with pytest.raises(ValueError, match="needs a user message"):
        prompt.create_prompt()
    prompt.add_requester_msg("猫が好きです。")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == (
        "\n以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
        "### 指示:\n次の日本語を英語に翻訳してください。\n\n### 入力:\n猫が好きです。\n\n### 応答:\n"
    )


@pytest.mark.parametrize(
    ("cls", "add_special_tokens", "eos"),
    [
        (Llama2ChatPrompt, False, ("</s>",)),
        (Llama3ChatPrompt, False, ("<|eot_id|>", "<|end_of_text|>")),
        (Llama31ChatPrompt, False, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
        (ChatMLPrompt, False, ("<|im_end|>",)),
        (RakutenAIChatPrompt, True, ("</s>",)),
        (KarasuChatPrompt, True, ("</s>",)),
        (NekomataInstructionPrompt, False, ("<|endoftext|>",)),
    ],
)
def test_special_token_settings(
    cls: type[AbstractChatPrompt], add_special_tokens: bool, eos: tuple[str, ...]
) -> None:
    assert cls.add_special_tokens is add_special_tokens
    assert cls.eos_tokens == eos
    prompt = cls()
    assert set(eos) <= set(prompt.get_stop_strs())
    if add_special_tokens is False and cls is not NekomataInstructionPrompt:
        # The rendered text starts with the model's BOS, so the tokenizer must not add another.
        bos = FORMATS[next(k for k, v in FORMATS.items() if v[0] is cls)][2]
        assert build_prompt(cls, [_user("x")]).create_prompt().startswith(bos)


def test_llama3_1_literal_example_with_and_without_system() -> None:
    # Written out by hand (the template's default date is the one this conversation carries).
    prompt = build_prompt(
        Llama31ChatPrompt, [_sys("  Be brief. "), _user(" hi\n"), _bot(" hello "), _user("bye")]
    )
    prompt.date_string = "26 Jul 2024"
    head = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    )
    assert prompt.create_prompt() == (
        f"{head}Be brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Without a system prompt the dated block is still written, empty after the date.
    bare = build_prompt(Llama31ChatPrompt, [_user("hi")])
    bare.date_string = "26 Jul 2024"
    assert (
        bare.create_prompt()
        == (
            f"{head}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        == _reference("llama3.1", [_user("hi")])
    )
