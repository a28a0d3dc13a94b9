"""Prompt tokenization in which users cannot type control tokens.

A rendered prompt mixes the format's own markers (``<|im_start|>``, ``[INST]``, ``</s>``) with
message contents. The markers must become special tokens; a special-token string inside a message
must stay text. Engines that tokenize prompts themselves share :func:`encode_with_literal_spans`,
each with its tokenizer's way of encoding a piece as plain text; :func:`encode_hf_prompt` is the
whole thing for Hugging Face tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def encode_with_literal_spans(
    text: str,
    ids: list[int],
    literal_spans: Sequence[str],
    specials: Iterable[str],
    encode_piece: Callable[[str, bool], list[int]],
    encode_bare: Callable[[str], list[int]],
) -> list[int]:
    """The ids of prompt ``text`` with special-token strings inside ``literal_spans`` kept as text.

    ``ids`` is the plain encoding of ``text``, returned as it is when no span holds one of the
    ``specials``. Otherwise the text is cut into pieces, each encoded by ``encode_piece(piece,
    literal)`` without added tokens, and the tokens the tokenizer adds around a whole text (BOS,
    EOS: ``ids`` against ``encode_bare(text)``) are put back around them.
    """
    if not literal_spans:
        return ids
    pieces = split_literal_spans(text, literal_spans, set(specials))
    if not any(literal for _, literal in pieces):
        return ids
    body = [token for piece, literal in pieces for token in encode_piece(piece, literal)]
    prefix, suffix = added_around(ids, encode_bare(text))
    return prefix + body + suffix


def encode_hf_prompt(
    tokenizer: Any, text: str, add_special_tokens: bool | None = None, literal_spans: Sequence[str] = ()
) -> list[int]:
    """Prompt ids from a Hugging Face tokenizer (``None``: the tokenizer's default for added tokens),
    with special-token strings in ``literal_spans`` (message contents, in prompt order) as text."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    ids: list[int] = list(tokenizer(text, **kwargs)["input_ids"])

    def encode_piece(piece: str, literal: bool) -> list[int]:
        return list(tokenizer(piece, add_special_tokens=False, split_special_tokens=literal)["input_ids"])

    def encode_bare(whole: str) -> list[int]:
        return list(tokenizer(whole, add_special_tokens=False)["input_ids"])

    return encode_with_literal_spans(
        text, ids, literal_spans, special_token_strings(tokenizer), encode_piece, encode_bare
    )


def special_token_strings(tokenizer: Any) -> set[str]:
    """The strings a Hugging Face tokenizer turns into special tokens (``<|im_start|>``, ``</s>``)."""
    strings = {str(token) for token in getattr(tokenizer, "all_special_tokens", ()) or ()}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings.update(str(token) for token in decoder.values() if getattr(token, "special", False))
    return {s for s in strings if s}


def split_literal_spans(text: str, spans: Sequence[str], specials: set[str]) -> list[tuple[str, bool]]:
    """``text`` cut into ``(piece, literal)`` pieces: a literal piece is one of ``spans`` that holds a
    special-token string.

    Spans are found in order, each after the previous one; every span (literal or not) moves the
    search on, so a message is looked for only in the template text just before it. A span not
    found is skipped (the prompt was trimmed to fit the context, or rewritten by the format).
    """
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for span in spans:
        if not span:
            continue
        start = text.find(span, cursor)
        if start < 0:
            continue
        if any(special in span for special in specials):
            if start > cursor:
                pieces.append((text[cursor:start], False))
            pieces.append((span, True))
        else:
            pieces.append((text[cursor : start + len(span)], False))
        cursor = start + len(span)
    if cursor < len(text):
        pieces.append((text[cursor:], False))
    return pieces


def added_around(ids: list[int], bare: list[int]) -> tuple[list[int], list[int]]:
    """The ids a post-processor added before and after ``bare`` to make ``ids`` (e.g. BOS, EOS)."""
    for start in range(len(ids) - len(bare) + 1):
        if ids[start : start + len(bare)] == bare:
            return ids[:start], ids[start + len(bare) :]
    return [], []
