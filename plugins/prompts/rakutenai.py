"""RakutenAI-7B-chat: ``{system} USER: {user} ASSISTANT: {answer}</s>USER: ... ASSISTANT:``.

Source: the model card of Rakuten/RakutenAI-7B-chat (README.md, "Usage"), which shows one turn:
``{system} USER: {user_input} ASSISTANT:``. Several turns are joined as in FastChat's
``vicuna_v1.1`` (the origin of the card's system sentence). The repository's own chat template,
added in September 2024, may differ; with a tokenizer that has it, ``prompt_format="hf"`` uses it.
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_SYSTEM, ROLE_USER, AbstractChatPrompt
from chatstream.types import Segment

RAKUTEN_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class RakutenAIChatPrompt(AbstractChatPrompt):
    """RakutenAI-7B-chat (Vicuna style). Contents are not stripped; the tokenizer adds BOS."""

    eos_token = "</s>"
    # "USER:" is a safety stop: the model sometimes goes on to write the user's next turn.
    stop_strs = ("</s>", "USER:")
    eos_tokens = ("</s>",)
    default_system = RAKUTEN_SYSTEM
    add_special_tokens = True

    def render_segments(self) -> list[Segment]:
        """System sentence, ``USER:``/``ASSISTANT:`` turns, ending with ``ASSISTANT:``."""
        messages = self.rendered_messages()
        system = Segment.template(RAKUTEN_SYSTEM)
        if messages and messages[0]["role"] == ROLE_SYSTEM:
            system = Segment.content(messages[0]["content"])
            messages = messages[1:]
        parts = [system, Segment.template(" ")]
        for message in messages:
            if message["role"] == ROLE_USER:
                parts += [
                    Segment.template("USER: "),
                    Segment.content(message["content"]),
                    Segment.template(" "),
                ]
            else:
                parts += [
                    Segment.template("ASSISTANT: "),
                    Segment.content(message["content"]),
                    Segment.template(self.eos_token),
                ]
        parts.append(Segment.template("ASSISTANT:"))
        return parts


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    register(
        "rakutenai",
        RakutenAIChatPrompt,
        model_patterns=(r"rakutenai-7b-chat",),
        description="RakutenAI-7B-chat (USER: ... ASSISTANT:, from the model card)",
    )
