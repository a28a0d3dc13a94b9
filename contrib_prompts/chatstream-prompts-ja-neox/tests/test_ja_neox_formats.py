"""Each format of the pack renders exactly what its reference template (tests/data) renders."""

from __future__ import annotations

from pathlib import Path

import pytest
from chatstream_prompts_ja_neox import (
    DollyPrompt,
    LineInstructionPrompt,
    RedPajamaChatPrompt,
    RinnaNeoxSFTPrompt,
)

from chatstream.prompt import AbstractChatPrompt
from chatstream.prompt_formats import build_prompt, render_chat_template

DATA = Path(__file__).parent / "data"

# format class, reference template, bos_token, eos_token
FORMATS: dict[str, tuple[type[AbstractChatPrompt], str, str, str]] = {
    "redpajama": (RedPajamaChatPrompt, "redpajama.jinja", "<|endoftext|>", "<|endoftext|>"),
    "rinna-neox-sft": (RinnaNeoxSFTPrompt, "rinna-neox-sft.jinja", "<s>", "</s>"),
    "line-sft": (LineInstructionPrompt, "line-sft.jinja", "<s>", "</s>"),
    "dolly": (DollyPrompt, "dolly.jinja", "<|endoftext|>", "<|endoftext|>"),
}


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "one-turn": [_m("user", "Who is Alan Turing?")],
    "system": [_m("system", "Answer in one sentence."), _m("user", "What is a prime number?")],
    "rounds": [
        _m("user", "Hi"),
        _m("assistant", "Hello! How can I help?"),
        _m("user", "Tell me a joke."),
        _m("assistant", "Knock knock."),
        _m("user", "Who's there?"),
    ],
    "japanese": [
        _m("user", "日本のおすすめの観光地を教えてください。"),
        _m("assistant", "どの地域の観光地が知りたいですか?"),
        _m("user", "渋谷の観光地を教えてください。"),
    ],
    "newlines-and-spaces": [
        _m("system", " system line one\nline two "),
        _m("user", "  first\nsecond  \n"),
        _m("assistant", "\nanswer\n\n"),
        _m("user", "\u3000最後\u3000"),
    ],
}

CASES = [(fmt, conv) for fmt in FORMATS for conv in CONVERSATIONS]


def _reference(fmt: str, conversation: list[dict[str, str]]) -> str:
    _, template, bos, eos = FORMATS[fmt]
    text = (DATA / template).read_text(encoding="utf-8")
    return render_chat_template(text, conversation, bos_token=bos, eos_token=eos)


@pytest.mark.parametrize(("fmt", "conv"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_matches_reference_template(fmt: str, conv: str) -> None:
    cls = FORMATS[fmt][0]
    conversation = CONVERSATIONS[conv]
    prompt = build_prompt(cls, conversation)
    prompt.set_prompt_ttl(None)  # compare the whole conversation, also for single-turn formats
    assert prompt.create_prompt() == _reference(fmt, conversation)


def test_model_card_examples_render_byte_identical() -> None:
    redpajama = build_prompt(RedPajamaChatPrompt, [_m("user", "Who is Alan Turing?")])
    assert redpajama.create_prompt() == "<human>: Who is Alan Turing?\n<bot>:"
    rinna = build_prompt(
        RinnaNeoxSFTPrompt,
        [
            _m("user", "日本のおすすめの観光地を教えてください。"),
            _m("assistant", "どの地域の観光地が知りたいですか?"),
            _m("user", "渋谷の観光地を教えてください。"),
        ],
    )
    assert rinna.create_prompt() == (
        "ユーザー: 日本のおすすめの観光地を教えてください。<NL>システム: どの地域の観光地が知りたいですか?"
        "<NL>ユーザー: 渋谷の観光地を教えてください。<NL>システム: "
    )
    line = build_prompt(LineInstructionPrompt, [_m("user", "四国の県名を全て列挙してください。")])
    assert line.create_prompt() == "ユーザー: 四国の県名を全て列挙してください。\nシステム: "


def test_rinna_maps_newlines_both_ways_and_survives_a_round_trip() -> None:
    prompt = build_prompt(RinnaNeoxSFTPrompt, [_m("user", "一行目\n二行目")])
    assert "一行目<NL>二行目" in prompt.create_prompt()
    answer = prompt.replace_output("はい<NL>どうぞ")
    assert answer == "はい\nどうぞ"
    prompt.set_responder_last_msg(answer)
    prompt.add_requester_msg("次")
    prompt.add_responder_msg(None)
    restored = RinnaNeoxSFTPrompt.from_dict(prompt.to_dict())
    assert restored.create_prompt() == prompt.create_prompt()
    assert restored.create_prompt().endswith("システム: はい<NL>どうぞ<NL>ユーザー: 次<NL>システム: ")


@pytest.mark.parametrize("cls", [LineInstructionPrompt, DollyPrompt])
def test_single_turn_formats_render_only_the_last_request(cls: type[AbstractChatPrompt]) -> None:
    prompt = build_prompt(cls, CONVERSATIONS["rounds"])
    text = prompt.create_prompt()
    assert "Who's there?" in text and "Tell me a joke." not in text
