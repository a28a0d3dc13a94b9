"""Karasu (lightblue/karasu-7B-chat, -chat-plus): the Llama-2-style template of its base model Shisa.

No chat template of karasu itself was found. Source used: the ``chat_template`` of
augmxnt/shisa-7b-v1 (Karasu's base model, per Lightblue's announcement "Karasu and Qarasu" on
note.com/peter_lightblue), as reproduced in github.com/AUGMXNT/shisa
``eval/generations/default-gen.py`` (commit 703a876). mmnga's GGUF conversion of
karasu-7B-chat-plus-unleashed documents the same shape:
``[INST] <<SYS>>あなたはAIアシスタントです。 <</SYS>> イギリスの首相は誰ですか? [/INST]``.
Treat it as a well-founded candidate, not as the model's official format.
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_SYSTEM, ROLE_USER, AbstractChatPrompt
from chatstream.types import Segment


class KarasuChatPrompt(AbstractChatPrompt):
    """Shisa/Karasu: ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ...``.

    Only the system turn opens the first ``[INST]``; the first user message (position 0 or 1) gets
    no ``[INST]`` of its own, later ones get ``<s>[INST]``. Contents are not stripped. The text has
    no BOS at the start, so the tokenizer adds it.
    """

    bos_token = "<s>"
    eos_token = "</s>"
    # "[INST]" is a safety stop: the model sometimes goes on to write the user's next turn.
    stop_strs = ("</s>", "[INST]")
    eos_tokens = ("</s>",)
    add_special_tokens = True

    def render_segments(self) -> list[Segment]:
        """The Shisa turns, ending after the last `` [/INST]``."""
        parts: list[Segment] = []
        for index, message in enumerate(self.rendered_messages()):
            content = Segment.content(message["content"])
            if message["role"] == ROLE_USER:
                if index > 1:
                    parts += [Segment.template(f"{self.bos_token}[INST] "), content]
                else:
                    parts.append(content)
                parts.append(Segment.template(" [/INST]"))
            elif message["role"] == ROLE_SYSTEM:
                parts += [Segment.template("[INST] <<SYS>>\n"), content, Segment.template("\n<</SYS>>\n\n")]
            else:
                parts += [Segment.template(" "), content, Segment.template(f" {self.eos_token}")]
        return parts


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    register(
        "karasu",
        KarasuChatPrompt,
        model_patterns=(r"karasu-7b", r"shisa-7b-v1"),
        description="Karasu / Shisa 7B (Llama-2 style [INST] with <<SYS>>; candidate from Shisa's template)",
    )
