"""Streaming text out of token ids: an incremental detokenizer and a stop-string filter.

Both are plain objects, one per request, shared by every engine that produces token ids
(or text) one piece at a time. Neither imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens to decode in front of the first generated one: enough for tokenizers that
# drop a word's leading space when it starts the decoded text (SentencePiece) to keep it.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a character.

    Each :meth:`add` decodes a short window of recent tokens twice (with and without the new
    ones) and returns only the new text, and returns nothing while the decoded text ends in an
    incomplete multibyte character (U+FFFD), so a client never sees half a character. Pass the
    prompt's ids as ``context`` so the first generated word keeps its leading space.
    """

    def __init__(
        self,
        tokenizer: Any,
        context: Sequence[int] = (),
        *,
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:]) if context else []
        # ids[prefix:read] is text already returned, decoded as context for what follows.
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )
        return text

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append one or more token ids; return the text that is now complete (may be empty)."""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            # Either nothing printable yet, or a character whose remaining bytes are still to come.
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """Text still held back at the end of the stream.

        A character left incomplete (the stream ended between its bytes, e.g. at
        ``max_new_tokens``) is dropped rather than shown as U+FFFD.
        """
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)


class StopStringFilter:
    """Cuts a text stream at the first stop string, never showing any part of it.

    :meth:`feed` returns the text that is safe to show: it holds back a tail that could still be
    the start of a stop string until the next text decides. After a stop string is found,
    :attr:`stopped` is True and everything from the stop string on is dropped.
    """

    def __init__(self, stop: Iterable[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self._held = ""
        self._longest = max((len(s) for s in self.stop), default=0)

    def feed(self, text: str) -> str:
        """Add streamed text; return what may be shown now."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        buffer = self._held + text
        # The earliest match wins, wherever it starts, so nothing after a stop string leaks.
        cut = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        hold = self._partial_match_len(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def _partial_match_len(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that begins some stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0

    def flush(self) -> str:
        """At the end of the stream: the held-back tail (it turned out not to be a stop string)."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held


class TokenTextStream:
    """Token ids in, text a user may see out: :class:`IncrementalDetokenizer` followed by
    :class:`StopStringFilter`, counting tokens. One per request; engines that sample token ids
    feed it and wrap what it returns in ``TextDelta``.

    A special token the model generates (``<|endoftext|>``, ``<|im_start|>``) is never shown as
    text: one whose string is a stop string ends the answer there, any other is left out.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Iterable[str] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, context=prompt_ids)
        self._stops = StopStringFilter(stop)
        self._special = special_token_text(tokenizer)
        self.tokens = 0

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; later tokens are neither counted nor shown."""
        return self._stops.stopped

    def add(self, token_ids: Iterable[int]) -> str:
        """The text these new tokens make visible; stops at the token that completes a stop string."""
        parts: list[str] = []
        for token in token_ids:
            if self._stops.stopped:
                break
            self.tokens += 1
            special = self._special(int(token))
            if special is None:
                parts.append(self._stops.feed(self._detokenizer.add(token)))
            elif special in self._stops.stop:
                parts.append(self._stops.feed(self._detokenizer.flush() + special))
        return "".join(parts)

    def finish(self) -> str:
        """At the end of generation: the text still held back (nothing after a stop string)."""
        if self._stops.stopped:
            return ""
        return self._stops.feed(self._detokenizer.flush()) + self._stops.flush()


def special_token_text(tokenizer: Any) -> Callable[[int], str | None]:
    """``id -> its string`` for the tokenizer's special tokens (None for every other id).

    A tokenizer may bring its own ``special_text`` (the OpenVINO adapter does); for a Hugging
    Face tokenizer the map is read once from its special and added special tokens.
    """
    own = getattr(tokenizer, "special_text", None)
    if callable(own):
        return own
    table: dict[int, str] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, token in decoder.items():
        if getattr(token, "special", False):
            table[int(token_id)] = str(token)
    ids = getattr(tokenizer, "all_special_ids", None) or []
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        for token_id in ids:
            text = convert(int(token_id))
            if isinstance(text, str):
                table.setdefault(int(token_id), text)
    return table.get
