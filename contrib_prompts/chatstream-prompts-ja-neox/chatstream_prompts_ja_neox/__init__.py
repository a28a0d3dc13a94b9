"""chatstream prompt formats for GPT-NeoX-era chat and instruction models.

Registered formats (``chatstream prompts`` lists them):

- ``redpajama``: togethercomputer/RedPajama-INCITE-Chat-3B-v1 and -7B-Chat
- ``rinna-neox-sft``: rinna/japanese-gpt-neox-3.6b-instruction-sft (and -sft-v2)
- ``line-sft``: line-corporation/japanese-large-lm-1.7b/3.6b-instruction-sft
- ``dolly``: databricks/dolly-v2-3b/7b/12b

None of these models ships a chat template; each format cites the model card it follows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatstream import hookspecs
from chatstream.prompt import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER, AbstractChatPrompt

__all__ = ["DollyPrompt", "LineInstructionPrompt", "RedPajamaChatPrompt", "RinnaNeoxSFTPrompt"]


class RedPajamaChatPrompt(AbstractChatPrompt):
    """RedPajama-INCITE-Chat: ``<human>: {user}\\n<bot>: {answer}\\n<human>: ...\\n<bot>:``.

    Source: huggingface.co/togethercomputer/RedPajama-INCITE-Chat-3B-v1, README.md: "To prompt the
    chat model, use the following format: ``<human>: [Instruction]\\n<bot>:``". Several turns are
    joined with newlines (OpenChatKit style). The card has no system prompt; one that is set is
    written as a plain first line. The model tends to write the next ``<human>:`` turn itself,
    so that is a stop string too.
    """

    stop_strs = ("<|endoftext|>", "\n<human>:")
    eos_tokens = ("<|endoftext|>",)
    # GPT-NeoX tokenizer: BOS = EOS = <|endoftext|>, and it adds neither.
    add_special_tokens = None

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """``<human>:``/``<bot>:`` lines ending with ``<bot>:`` (no space)."""
        labels = {ROLE_SYSTEM: "", ROLE_USER: "<human>: ", ROLE_ASSISTANT: "<bot>: "}
        lines = [labels[m["role"]] + m["content"] + "\n" for m in self.rendered_messages()]
        return "".join(lines) + "<bot>:"


class RinnaNeoxSFTPrompt(AbstractChatPrompt):
    """rinna japanese-gpt-neox-3.6b-instruction-sft: ``ユーザー: …<NL>システム: …<NL>システム: ``.

    Source: huggingface.co/rinna/japanese-gpt-neox-3.6b-instruction-sft, README.md ("I/O Format"):
    utterances ``ユーザー: {text}`` and ``システム: {text}`` joined by ``<NL>``, every newline inside
    a text written as ``<NL>``, and the prompt ends with ``<NL>システム: `` (trailing space). The
    replacement rule ``\\n`` <-> ``<NL>`` applies both ways: to the conversation before rendering
    and to the model's output before it is shown. The card has no system prompt; one that is set
    becomes a first utterance without a speaker (better left unset). The card encodes with
    ``add_special_tokens=False``.
    """

    stop_strs = ("</s>",)
    eos_tokens = ("</s>",)
    add_special_tokens = False

    def __init__(self) -> None:
        super().__init__()
        self.add_replacement_rule("\n", "<NL>")

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """Utterances joined by ``<NL>``, then ``<NL>システム: ``."""
        labels = {ROLE_SYSTEM: "", ROLE_USER: "ユーザー: ", ROLE_ASSISTANT: "システム: "}
        return (
            "<NL>".join(labels[m["role"]] + m["content"] for m in self.rendered_messages()) + "<NL>システム: "
        )


class LineInstructionPrompt(AbstractChatPrompt):
    """LINE japanese-large-lm instruction-sft: ``ユーザー: {input}\\nシステム: ``.

    Source: huggingface.co/line-corporation/japanese-large-lm-3.6b-instruction-sft, README.md
    ("How to use"), whose prompt is ``f"ユーザー: {input_text}\\nシステム: "``. The card shows one
    turn only, so only the last exchange is rendered by default (``prompt_ttl`` 1); with more,
    turns are joined by newlines (authored choice). A system prompt, which the card does not
    document, is written as a plain first line.
    """

    stop_strs = ("</s>", "\nユーザー:")
    eos_tokens = ("</s>",)
    default_prompt_ttl = 1

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """``ユーザー:``/``システム:`` lines ending with ``システム: ``."""
        labels = {ROLE_SYSTEM: "", ROLE_USER: "ユーザー: ", ROLE_ASSISTANT: "システム: "}
        lines = [labels[m["role"]] + m["content"] + "\n" for m in self.rendered_messages()]
        return "".join(lines) + "システム: "


DOLLY_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


class DollyPrompt(AbstractChatPrompt):
    """Databricks Dolly v2: the single-turn instruction prompt of its generation pipeline.

    Source: github.com/databrickslabs/dolly ``training/consts.py`` (``PROMPT_FOR_GENERATION_FORMAT``),
    used by ``instruct_pipeline.py`` in the model repositories (huggingface.co/databricks/dolly-v2-12b):
    ``{intro}\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n``; the model ends its answer
    with ``### End``. The last user message is the instruction; earlier turns and the system
    prompt are not part of the format.
    """

    stop_strs = ("### End", "<|endoftext|>")
    eos_tokens = ("<|endoftext|>",)
    default_prompt_ttl = 1

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """Intro, ``### Instruction:``, the last user message, ``### Response:``."""
        instructions = [m["content"] for m in self.rendered_messages() if m["role"] == ROLE_USER]
        if not instructions:
            raise ValueError("the dolly prompt format needs a user message (the instruction)")
        return f"{DOLLY_INTRO}\n\n### Instruction:\n{instructions[-1]}\n\n### Response:\n"


@hookspecs.hookimpl
def register_prompt_formats(register: Callable[..., None]) -> None:
    """Register this pack's formats."""
    register(
        "redpajama",
        RedPajamaChatPrompt,
        model_patterns=(r"redpajama-incite-.*chat",),
        description="RedPajama-INCITE-Chat (<human>: ... <bot>:)",
    )
    register(
        "rinna-neox-sft",
        RinnaNeoxSFTPrompt,
        model_patterns=(r"japanese-gpt-neox-3\.6b-instruction-sft",),
        description="rinna japanese-gpt-neox instruction-sft (ユーザー:/システム: joined by <NL>)",
    )
    register(
        "line-sft",
        LineInstructionPrompt,
        model_patterns=(r"japanese-large-lm-\d+\.\d+b-instruction-sft",),
        description="LINE japanese-large-lm instruction-sft (ユーザー: ... システム: )",
    )
    register(
        "dolly",
        DollyPrompt,
        model_patterns=(r"dolly-v2-\d+b",),
        description="Databricks Dolly v2 (### Instruction: / ### Response:, single turn)",
    )
