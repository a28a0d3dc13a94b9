"""Llama 3 Instruct: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` blocks.

Matches the ``chat_template`` of meta-llama/Meta-Llama-3-8B-Instruct (also 70B). Llama 3.1 and
later differ (a dated system block is always written): they use their tokenizer's template (``hf``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.prompt import AbstractChatPrompt


class Llama3ChatPrompt(AbstractChatPrompt):
    """Llama 3 Instruct. BOS is written before the first message; contents are stripped; no default system."""

    bos_token = "<|begin_of_text|>"
    stop_strs = ("<|eot_id|>", "<|end_of_text|>")
    eos_tokens = ("<|eot_id|>", "<|end_of_text|>")
    add_special_tokens = False

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """Header blocks for every message, then the assistant header."""
        parts: list[str] = []
        for index, message in enumerate(self.rendered_messages()):
            header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
            block = f"{header}{message['content'].strip()}<|eot_id|>"
            parts.append(self.bos_token + block if index == 0 else block)
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)


@hookimpl
def register_prompt_formats(register: Callable[..., None]) -> None:
    # "Llama-3-" followed by a size: Llama 3.1/3.2/3.3 ids have a dot after the 3 and do not match.
    register(
        "llama3",
        Llama3ChatPrompt,
        model_patterns=(r"llama-?3-\d+b.*instruct",),
        description="Llama 3 Instruct (<|start_header_id|> blocks, <|eot_id|>)",
    )
