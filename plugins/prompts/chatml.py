"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, as SmolLM2-Instruct writes it.

Matches the ``chat_template`` of HuggingFaceTB/SmolLM2-135M-Instruct (read from the GGUF metadata
of the embedded model), including its default system prompt. Also the fallback format.
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_SYSTEM, AbstractChatPrompt
from chatstream.types import Segment

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class ChatMLPrompt(AbstractChatPrompt):
    """ChatML with SmolLM2's default system prompt, which is written whenever no system prompt is set.

    Contents are not stripped. The text starts with ``<|im_start|>`` (SmolLM2's BOS), so the
    tokenizer must not add another. For other ChatML models set your own system prompt.
    """

    stop_strs = ("<|im_end|>",)
    eos_tokens = ("<|im_end|>",)
    default_system = SMOLLM_SYSTEM
    add_special_tokens = False

    def render_segments(self) -> list[Segment]:
        """``<|im_start|>`` blocks for every message, then ``<|im_start|>assistant\\n``."""
        messages = self.rendered_messages()
        parts: list[Segment] = []
        if messages and messages[0]["role"] != ROLE_SYSTEM:
            # The reference template inserts its default even when the system prompt was removed.
            parts.append(Segment.template(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"))
        for message in messages:
            parts.append(Segment.template(f"<|im_start|>{message['role']}\n"))
            parts.append(Segment.content(message["content"]))
            parts.append(Segment.template("<|im_end|>\n"))
        parts.append(Segment.template("<|im_start|>assistant\n"))
        return parts


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    register(
        "chatml",
        ChatMLPrompt,
        model_patterns=(r"smollm",),
        description="ChatML (<|im_start|>role ... <|im_end|>) with SmolLM2's default system prompt",
    )
