"""rinna nekomata instruction models: a single-turn Alpaca-style task prompt in Japanese.

Source: the model card of rinna/nekomata-14b-instruction (README.md, "How to use the model"),
whose prompt is ``\\n以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。…\\n\\n### 指示:\\n
{instruction}\\n\\n### 入力:\\n{input}\\n\\n### 応答:\\n``. The model ships no chat template.
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_SYSTEM, ROLE_USER, AbstractChatPrompt, PromptShapeError
from chatstream.types import Segment

PREAMBLE = (
    "\n以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。\n\n"
)


class NekomataInstructionPrompt(AbstractChatPrompt):
    """nekomata-7b/14b-instruction: system prompt = 指示 (the task), last user message = 入力 (its input).

    A task prompt: only the last exchange is rendered (``prompt_ttl`` 1) and answers are not
    part of the prompt. Without a system prompt the user message becomes the 指示 and the 入力
    section is left out. Set the task with ``set_system``, e.g. ``次の日本語を英語に翻訳してください。``.
    The card encodes without special tokens.
    """

    stop_strs = ("<|endoftext|>",)
    eos_tokens = ("<|endoftext|>",)
    add_special_tokens = False
    default_prompt_ttl = 1

    def render_segments(self) -> list[Segment]:
        """Preamble, 指示, optional 入力, then ``### 応答:\\n``."""
        messages = self.rendered_messages()
        instruction = messages[0]["content"] if messages and messages[0]["role"] == ROLE_SYSTEM else None
        inputs = [m["content"] for m in messages if m["role"] == ROLE_USER]
        if not inputs:
            raise PromptShapeError("the nekomata prompt format needs a user message (the text for the task)")
        parts = [Segment.template(f"{PREAMBLE}### 指示:\n")]
        if instruction is not None:
            parts += [Segment.content(instruction), Segment.template("\n\n### 入力:\n")]
        parts += [Segment.content(inputs[-1]), Segment.template("\n\n### 応答:\n")]
        return parts


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    register(
        "nekomata",
        NekomataInstructionPrompt,
        model_patterns=(r"nekomata-\d+b-instruction",),
        description="rinna nekomata instruction (single-turn 指示/入力/応答 task prompt)",
    )
