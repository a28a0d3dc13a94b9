"""Prompt tokenization in which users cannot type control tokens.

A rendered prompt is a list of segments (:class:`chatstream.types.Segment`): the format's own
template text, whose special-token strings (``<|im_start|>``, ``[INST]``, ``</s>``) must become
control tokens, and message contents, which must stay text whatever they hold. Engines that
tokenize prompts themselves share :func:`encode_segments`, each with its tokenizer's way of encoding
a piece as plain text; :class:`HFPromptEncoder` is the whole thing for Hugging Face tokenizers.

Benign prompts (no content holds, or forms with its neighbours, a special-token string) are
encoded as one text, exactly as the tokenizer encodes the rendered prompt. Only a content segment
that would otherwise yield a control token is encoded on its own, as plain text.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from .types import Segment, joined


class SpecialStrings:
    """A set of special-token strings, with fast "is one in this text" tests (no scan per string:
    texts are searched for the strings' first two characters, of which there are few)."""

    def __init__(self, strings: Iterable[str]) -> None:
        self.strings = frozenset(s for s in strings if s)
        self.longest = max((len(s) for s in self.strings), default=0)
        self._by_head: dict[str, list[str]] = {}
        for string in sorted(self.strings, key=len, reverse=True):
            self._by_head.setdefault(string[:2], []).append(string)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def occurrences(self, text: str) -> Iterable[tuple[int, int]]:
        """``(start, end)`` of every occurrence of every string in ``text`` (overlaps included)."""
        for head, strings in self._by_head.items():
            at = text.find(head)
            while at >= 0:
                for string in strings:
                    if text.startswith(string, at):
                        yield at, at + len(string)
                at = text.find(head, at + 1)

    def found_in(self, text: str) -> bool:
        return any(True for _ in self.occurrences(text))


def plan_pieces(segments: Sequence[Segment], specials: SpecialStrings) -> list[tuple[str, bool]]:
    """``segments`` as ``(text, literal)`` pieces to encode one by one.

    A content segment becomes a literal piece when it holds a special-token string, or when one
    would span its edge with the text around it (``<|im_`` typed before the template's ``end|>``
    could not happen, but ``</`` before ``s>`` could); everything else is merged into plain pieces,
    which the tokenizer encodes with special tokens on.
    """
    text = joined(segments)
    literal = [False] * len(segments)
    start = 0
    for index, segment in enumerate(segments):
        end = start + len(segment.text)
        if segment.literal and segment.text and specials:
            literal[index] = specials.found_in(segment.text) or any(
                _crosses(text, edge, specials) for edge in (start, end)
            )
        start = end
    pieces: list[tuple[str, bool]] = []
    for segment, is_literal in zip(segments, literal, strict=True):
        if is_literal:
            pieces.append((segment.text, True))
        elif pieces and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + segment.text, False)
        elif segment.text:
            pieces.append((segment.text, False))
    return pieces


def _crosses(text: str, edge: int, specials: SpecialStrings) -> bool:
    """Whether a special-token string in ``text`` starts before ``edge`` and ends after it."""
    reach = specials.longest - 1
    if reach <= 0:
        return False
    window_start = max(0, edge - reach)
    window = text[window_start : edge + reach]
    cut = edge - window_start
    return any(a < cut < b for a, b in specials.occurrences(window))


def encode_segments(
    segments: Sequence[Segment],
    specials: SpecialStrings,
    encode_text: Callable[[str], list[int]],
    encode_piece: Callable[[str, bool], list[int]],
    encode_bare: Callable[[str], list[int]],
) -> list[int]:
    """The prompt ids of ``segments``: special tokens only where the template has them.

    ``encode_text`` encodes a whole prompt (with the tokens the tokenizer adds, e.g. BOS);
    ``encode_piece(piece, literal)`` encodes a piece with no added tokens, a literal one with every
    special-token string spelled as text; ``encode_bare`` is ``encode_text`` without added tokens,
    used to find what the tokenizer adds around the pieces.
    """
    text = joined(segments)
    pieces = plan_pieces(segments, specials)
    if not any(is_literal for _, is_literal in pieces):
        return encode_text(text)
    body = [token for piece, is_literal in pieces for token in encode_piece(piece, is_literal)]
    prefix, suffix = added_around(encode_text(text), encode_bare(text))
    return prefix + body + suffix


class HFPromptEncoder:
    """:func:`encode_segments` for a Hugging Face tokenizer (``tokenizer(text)["input_ids"]``).

    ``HFPromptEncoder.of(tokenizer)`` is the one encoder of a tokenizer (its special strings are
    read once)."""

    _by_tokenizer: ClassVar[weakref.WeakKeyDictionary[Any, HFPromptEncoder]] = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.specials = SpecialStrings(special_token_strings(tokenizer))

    @classmethod
    def of(cls, tokenizer: Any) -> HFPromptEncoder:
        try:
            return cls._by_tokenizer[tokenizer]
        except KeyError:
            encoder = cls._by_tokenizer[tokenizer] = cls(tokenizer)
            return encoder
        except TypeError:  # a tokenizer that cannot be weakly referenced
            return cls(tokenizer)

    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        """Prompt ids (``add_special_tokens`` None: the tokenizer's default for added tokens).
        A plain string is all template text."""
        segments = [Segment.template(prompt)] if isinstance(prompt, str) else prompt
        tokenizer = self.tokenizer
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}

        def encode_text(text: str) -> list[int]:
            return list(tokenizer(text, **kwargs)["input_ids"])

        def encode_piece(piece: str, literal: bool) -> list[int]:
            encoded = tokenizer(piece, add_special_tokens=False, split_special_tokens=literal)
            return list(encoded["input_ids"])

        def encode_bare(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        return encode_segments(segments, self.specials, encode_text, encode_piece, encode_bare)


def special_token_strings(tokenizer: Any) -> set[str]:
    """The strings a Hugging Face tokenizer turns into special tokens (``<|im_start|>``, ``</s>``)."""
    strings = {str(token) for token in getattr(tokenizer, "all_special_tokens", ()) or ()}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings.update(str(token) for token in decoder.values() if getattr(token, "special", False))
    return {s for s in strings if s}


def added_around(ids: list[int], bare: list[int]) -> tuple[list[int], list[int]]:
    """The ids a post-processor added before and after ``bare`` to make ``ids`` (e.g. BOS, EOS)."""
    for start in range(len(ids) - len(bare) + 1):
        if ids[start : start + len(bare)] == bare:
            return ids[:start], ids[start + len(bare) :]
    return [], []
