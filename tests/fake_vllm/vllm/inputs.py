"""Stand-in for ``vllm.inputs``: a tokenized prompt is a dict with ``prompt_token_ids``."""

from typing import TypedDict


class TokensPrompt(TypedDict):
    """A prompt given as token ids."""

    prompt_token_ids: list[int]
