"""AbstractChatPrompt: the conversation API, persistence, replacement rules, documented subclasses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream.plugins.prompts.chatml import ChatMLPrompt
from chatstream.plugins.prompts.llama3 import Llama3ChatPrompt
from chatstream.prompt import AbstractChatPrompt, PromptFormatMismatchError


class DocumentedPrompt(AbstractChatPrompt):
    """A prompt class written the way the ChatStream documentation shows (RedPajama-INCITE-Chat)."""

    def __init__(self):
        super().__init__()
        self.set_system("")
        self.set_requester("<human>")
        self.set_responder("<bot>")

    def get_stop_strs(self):
        if not self.chat_mode:
            return None
        return ["<|endoftext|>", "\n<"]

    def get_replacement_strs(self):
        return [{"src": "<NL>", "dest": "\n"}]

    def create_prompt(self, opts={}):  # noqa: B006
        if self.chat_mode is False:
            return self.get_requester_last_msg()
        ret = self.system
        for chat_content in self.get_contents(opts):
            role = chat_content.get_role()
            message = chat_content.get_message()
            if role:
                if message:
                    ret += role + ": " + message + "\n"
                else:
                    ret += role + ":"
        return ret


def test_documented_subclass_works_unchanged() -> None:
    prompt = DocumentedPrompt()
    prompt.add_requester_msg("Who is Alan Turing?")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == "<human>: Who is Alan Turing?\n<bot>:"
    assert prompt.get_stop_strs() == ["<|endoftext|>", "\n<"]
    assert prompt.replace_output("a<NL>b") == "a\nb"

    prompt.set_responder_last_msg("A mathematician.")
    prompt.add_requester_msg("Thanks")
    prompt.add_responder_msg(None)
    assert prompt.create_prompt() == (
        "<human>: Who is Alan Turing?\n<bot>: A mathematician.\n<human>: Thanks\n<bot>:"
    )
    assert prompt.get_turn() == 2
    assert prompt.messages() == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Who is Alan Turing?"},
        {"role": "assistant", "content": "A mathematician."},
        {"role": "user", "content": "Thanks"},
    ]

    restored = DocumentedPrompt.from_dict(json.loads(json.dumps(prompt.to_dict())))
    assert restored.create_prompt() == prompt.create_prompt()
    assert restored.to_dict() == prompt.to_dict()

    prompt.set_chat_mode_enabled(False)
    assert prompt.create_prompt() == "Thanks"
    assert prompt.get_stop_strs() is None


def _conversation() -> AbstractChatPrompt:
    prompt = Llama3ChatPrompt()
    prompt.set_system("sys")
    for i in range(3):
        prompt.add_requester_msg(f"q{i}")
        prompt.add_responder_msg(f"a{i}")
    prompt.add_requester_msg("q3")
    prompt.add_responder_msg(None)
    return prompt


def test_regenerate_and_undo() -> None:
    prompt = _conversation()
    prompt.set_responder_last_msg("first try")
    prompt.clear_last_responder_message()
    assert prompt.get_contents()[-1].message is None
    assert prompt.create_prompt().endswith("q3<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    prompt.remove_last_requester_msg()
    assert [c.message for c in prompt.get_contents()][-2:] == ["q2", "a2"]
    assert prompt.get_turn() == 3

    prompt.clear_history()
    assert prompt.get_contents() == []
    assert prompt.system == "sys"


def test_set_responder_last_msg_without_pending_answer_is_an_error() -> None:
    prompt = ChatMLPrompt()
    prompt.add_requester_msg("hi")
    with pytest.raises(ValueError, match="add_responder_msg"):
        prompt.set_responder_last_msg("x")


def test_message_ids_are_unique_stable_and_findable() -> None:
    prompt = _conversation()
    ids = [c.id for c in prompt.get_contents()]
    assert len(set(ids)) == len(ids)
    restored = Llama3ChatPrompt.from_dict(prompt.to_dict())
    assert [c.id for c in restored.get_contents()] == ids
    target = restored.get_content(ids[2])
    assert target is not None and target.message == "q1"
    assert restored.get_content("missing") is None
    given = restored.add_requester_msg("x", message_id="my-id")
    assert given.get_id() == "my-id"


def test_to_dict_round_trips_exactly_through_json() -> None:
    prompt = _conversation()
    prompt.set_prompt_ttl(2)
    prompt.set_chat_mode_enabled(True)
    prompt.add_replacement_rule("\n", "<NL>")
    data = prompt.to_dict()
    restored = Llama3ChatPrompt.from_dict(json.loads(json.dumps(data)))
    assert restored.to_dict() == data
    assert restored.create_prompt() == prompt.create_prompt()


def test_from_dict_of_another_format_names_both() -> None:
    data = _conversation().to_dict()
    with pytest.raises(PromptFormatMismatchError) as info:
        ChatMLPrompt.from_dict(data)
    assert "Llama3ChatPrompt" in str(info.value) and "ChatMLPrompt" in str(info.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"contents": "nope"}, "contents"),
        ({"contents": [{"role": "user"}]}, "contents[0]"),
        ({"prompt_ttl": 0}, "prompt_ttl"),
        ({"version": 99}, "version"),
    ],
)
def test_malformed_saved_conversation_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        ChatMLPrompt.from_dict(data)


def test_prompt_ttl_limits_what_is_rendered_not_the_history() -> None:
    prompt = _conversation()
    prompt.set_prompt_ttl(1)
    assert [m["content"] for m in prompt.messages()] == ["sys", "q3"]
    assert len(prompt.get_contents()) == 8
    with pytest.raises(ValueError, match="prompt_ttl=0"):
        prompt.set_prompt_ttl(0)


def test_chat_mode_off_renders_the_latest_request_only() -> None:
    prompt = _conversation()
    prompt.set_chat_mode_enabled(False)
    assert not prompt.is_chat_mode_enabled()
    assert "q2" not in prompt.create_prompt() and "q3" in prompt.create_prompt()


def test_drop_oldest_exchange_shortens_the_prompt_until_one_exchange_is_left() -> None:
    prompt = _conversation()
    dropped = 0
    while prompt.drop_oldest_exchange():
        dropped += 1
    assert dropped == 3
    assert [c.message for c in prompt.get_contents()] == ["q3", None]


def test_replacement_rules_apply_to_rendered_input_and_to_output() -> None:
    prompt = ChatMLPrompt()
    prompt.add_replacement_rule("\n", "<NL>")
    prompt.add_requester_msg("a\nb")
    prompt.add_responder_msg(None)
    assert "a<NL>b" in prompt.create_prompt()
    assert prompt.messages()[-1]["content"] == "a\nb"  # what the user sees is untouched
    assert prompt.replace_output("x<NL>y") == "x\ny"
    assert prompt.get_replacement_strs() == [{"src": "<NL>", "dest": "\n"}]
    prompt.add_replacement_rule("<br>", "\n", direction="output")
    assert prompt.replace_output("1<br>2") == "1\n2"
    with pytest.raises(ValueError, match="direction"):
        prompt.add_replacement_rule("a", "b", direction="sideways")
    with pytest.raises(ValueError, match="src"):
        prompt.add_replacement_rule("", "b")


def test_base_class_cannot_render_and_for_tokenizer_defaults_to_itself() -> None:
    with pytest.raises(NotImplementedError, match="create_prompt"):
        AbstractChatPrompt().create_prompt()
    assert ChatMLPrompt.for_tokenizer(object()) is ChatMLPrompt


def test_build_initial_prompt_renders_the_system_prompt_only() -> None:
    prompt = Llama3ChatPrompt()
    prompt.set_system("Be brief.")
    assert prompt.build_initial_prompt() == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize(
    "pieces", [["はい<NL>どうぞ<NL"], ["はい<N", "L>ど", "うぞ<", "NL"], list("はい<NL>どうぞ<NL")]
)
def test_streamed_output_replacement_equals_whole_text_replacement(pieces: list[str]) -> None:
    prompt = ChatMLPrompt()
    prompt.add_replacement_rule("\n", "<NL>")
    replacer = prompt.output_replacer()
    shown = [replacer.feed(piece) for piece in pieces]
    shown.append(replacer.flush())
    assert "".join(shown) == prompt.replace_output("".join(pieces)) == "はい\nどうぞ<NL"
    # A "<NL>" that may still be completing is held back, never shown half-way.
    assert all("<" not in piece for piece in shown[:-1])


def test_output_replacer_without_rules_passes_text_through() -> None:
    replacer = ChatMLPrompt().output_replacer()
    assert replacer.feed("a<NL") == "a<NL" and replacer.flush() == ""
