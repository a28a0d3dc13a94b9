"""Llama 3.1 / 3.2 / 3.3 Instruct: Llama 3's header blocks after a dated system block.

Matches the ``chat_template`` of meta-llama/Llama-3.1-8B-Instruct without tools: the text starts
with ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date:
December 2023\\nToday Date: {date}\\n\\n{system|trim}<|eot_id|>``, written even when no system
prompt is set, then one ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>``
block per message. Tool calling (the ``ipython`` role, ``<|python_tag|>``) is not supported.

The date is the conversation's: it is fixed when the conversation starts and saved with it
(``to_dict``), so the prompt of a later turn, also after a server restart, starts with the prompt
of the earlier one.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_SYSTEM, AbstractChatPrompt
from chatstream.types import Segment

KNOWLEDGE_CUTOFF = "December 2023"
DATE_FIELD = "date_string"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _today() -> datetime.date:
    """The local date (the day a new conversation is dated with)."""
    return datetime.date.today()


def date_string(day: datetime.date) -> str:
    """``day`` as the template writes it (``strftime("%d %b %Y")`` in English): ``26 Jul 2024``."""
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


class Llama31ChatPrompt(AbstractChatPrompt):
    """Llama 3.1 and later Instruct (no tools). BOS is written first; contents are stripped.

    ``date_string`` is the ``Today Date`` of the system block: today's date when the conversation
    is created, kept by ``to_dict``/``from_dict``. A conversation saved without one gets the date
    of the day it is loaded.
    """

    bos_token = "<|begin_of_text|>"
    stop_strs = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    eos_tokens = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    add_special_tokens = False

    def __init__(self) -> None:
        super().__init__()
        self.date_string = date_string(_today())

    def render_segments(self) -> list[Segment]:
        """The dated system block, header blocks for every other message, then the assistant header."""
        messages = self.rendered_messages()
        system = ""
        if messages and messages[0]["role"] == ROLE_SYSTEM:
            system = messages[0]["content"].strip()
            messages = messages[1:]
        parts = [
            Segment.template(
                f"{self.bos_token}<|start_header_id|>system<|end_header_id|>\n\n"
                f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {self.date_string}\n\n"
            )
        ]
        if system:
            parts.append(Segment.content(system))
        parts.append(Segment.template("<|eot_id|>"))
        for message in messages:
            parts += [
                Segment.template(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"),
                Segment.content(message["content"].strip()),
                Segment.template("<|eot_id|>"),
            ]
        parts.append(Segment.template("<|start_header_id|>assistant<|end_header_id|>\n\n"))
        return parts

    def to_dict(self) -> dict[str, Any]:
        """The base fields plus ``date_string``."""
        return {**super().to_dict(), DATE_FIELD: self.date_string}

    def load_dict(self, data: dict[str, Any]) -> None:
        """The base fields; ``date_string`` when saved, else the date of today."""
        saved = data.get(DATE_FIELD) if isinstance(data, dict) else None
        if saved is not None and (not isinstance(saved, str) or not saved.strip()):
            raise ValueError(f"saved conversation field {DATE_FIELD!r}={saved!r} must be a non-empty string")
        super().load_dict(data)
        self.date_string = saved if saved is not None else date_string(_today())


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    # "Llama-3.1-", "Llama-3.2-", "Llama-3.3-" (a dot after the 3); not the 3.2 Vision models,
    # whose template differs. Plain "Llama-3-8B" ids keep llama3.
    register(
        "llama3.1",
        Llama31ChatPrompt,
        model_patterns=(r"llama-?3\.[123](?!\d)(?!.*vision).*instruct",),
        description="Llama 3.1 / 3.2 / 3.3 Instruct (dated system block, <|start_header_id|> blocks)",
    )
