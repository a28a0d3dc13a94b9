"""Llama 2 Chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``.

Matches the ``chat_template`` of meta-llama/Llama-2-7b-chat-hf (also 13b/70b chat).
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_SYSTEM, ROLE_USER, AbstractChatPrompt, PromptShapeError
from chatstream.types import Segment


class Llama2ChatPrompt(AbstractChatPrompt):
    """Llama 2 Chat. The text writes BOS itself before every ``[INST]``, so the tokenizer must not.

    The system prompt goes inside the first user turn; user and answer texts are stripped; there
    is no default system prompt. Roles must alternate user/assistant.
    """

    bos_token = "<s>"
    eos_token = "</s>"
    stop_strs = ("</s>",)
    eos_tokens = ("</s>",)
    add_special_tokens = False

    def render_segments(self) -> list[Segment]:
        """``<s>[INST] ... [/INST]`` turns, ending after the last ``[/INST]``."""
        messages = self.rendered_messages()
        system: str | None = None
        if messages and messages[0]["role"] == ROLE_SYSTEM:
            system = messages[0]["content"]
            messages = messages[1:]
        parts: list[Segment] = []
        for index, message in enumerate(messages):
            if (message["role"] == ROLE_USER) != (index % 2 == 0):
                raise PromptShapeError(
                    "the llama2 prompt format needs alternating user/assistant messages starting with a "
                    f"user message; message {index} is from {message['role']!r}"
                )
            content = message["content"]
            if message["role"] == ROLE_USER:
                parts.append(Segment.template(f"{self.bos_token}[INST] "))
                if index == 0 and system is not None:
                    # The reference strips "<<SYS>>\n{system}\n<</SYS>>\n\n{content}" as one text.
                    parts += [Segment.template("<<SYS>>\n"), Segment.content(system)]
                    if content.rstrip():
                        parts += [Segment.template("\n<</SYS>>\n\n"), Segment.content(content.rstrip())]
                    else:
                        parts.append(Segment.template("\n<</SYS>>"))
                else:
                    parts.append(Segment.content(content.strip()))
                parts.append(Segment.template(" [/INST]"))
            else:
                parts += [
                    Segment.template(" "),
                    Segment.content(content.strip()),
                    Segment.template(f" {self.eos_token}"),
                ]
        return parts


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    register(
        "llama2",
        Llama2ChatPrompt,
        model_patterns=(r"llama-?2[-_].*chat",),
        description="Llama 2 Chat ([INST] ... [/INST], system prompt in <<SYS>>)",
    )
