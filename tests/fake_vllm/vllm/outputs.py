"""Stand-in for ``vllm.outputs``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One sequence of a request: its text and token ids (so far, or since the last output)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: int | str | None = None  # the stop string that ended it, if one did


@dataclass
class RequestOutput:
    """What ``AsyncLLMEngine.generate`` yields after each engine step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
