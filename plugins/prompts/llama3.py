"""Llama 3 Instruct: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` blocks.

Matches the ``chat_template`` of meta-llama/Meta-Llama-3-8B-Instruct (also 70B). Llama 3.1 and
later differ (a dated system block is always written): they have their own format, ``llama3.1``.
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.prompt import AbstractChatPrompt
from chatstream.types import Segment


class Llama3ChatPrompt(AbstractChatPrompt):
    """Llama 3 Instruct. BOS is written before the first message; contents are stripped; no default system."""

    bos_token = "<|begin_of_text|>"
    stop_strs = ("<|eot_id|>", "<|end_of_text|>")
    eos_tokens = ("<|eot_id|>", "<|end_of_text|>")
    add_special_tokens = False

    def render_segments(self) -> list[Segment]:
        """Header blocks for every message, then the assistant header."""
        parts: list[Segment] = []
        for index, message in enumerate(self.rendered_messages()):
            header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
            parts += [
                Segment.template(self.bos_token + header if index == 0 else header),
                Segment.content(message["content"].strip()),
                Segment.template("<|eot_id|>"),
            ]
        parts.append(Segment.template("<|start_header_id|>assistant<|end_header_id|>\n\n"))
        return parts


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    # "Llama-3-" followed by a size: Llama 3.1/3.2/3.3 ids have a dot after the 3 and do not match
    # (they are the llama3.1 format's).
    register(
        "llama3",
        Llama3ChatPrompt,
        model_patterns=(r"llama-?3-\d+b.*instruct",),
        description="Llama 3 Instruct (<|start_header_id|> blocks, <|eot_id|>)",
    )
