"""The OpenVINO engine's tokenizer: GenAI's converted tokenizer behind the part of the Hugging Face
tokenizer interface chatstream uses (prompt formats, the detokenizer, token counting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class OpenVINOTokenizer:
    """GenAI's converted tokenizer with the small part of the Hugging Face interface chatstream uses.

    ``__call__``/``decode``/``apply_chat_template``/``chat_template``/``eos_token``/``bos_token``,
    enough for prompt formats (``hf``), the detokenizer and token counting.

    GenAI's tokenizer always turns a special-token string (``<|im_start|>``) into its control
    token and has no switch to keep it as text, so :meth:`encode_plain` does that here: it cuts
    the text at the special-token strings and spells each one with ordinary tokens.
    """

    def __init__(self, tokenizer: Any, name_or_path: str) -> None:
        self.genai = tokenizer
        self.name_or_path = name_or_path
        self.chat_template: str | None = tokenizer.chat_template or None
        self.eos_token: str = tokenizer.get_eos_token()
        self.bos_token: str = tokenizer.get_bos_token()
        self.eos_token_id: int = int(tokenizer.get_eos_token_id())
        self._special_text: dict[int, str | None] = {}  # token id -> its string when special
        self._plain_spelling: dict[str, list[int]] = {}  # special string -> ordinary token ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        if not text and not add_special_tokens:
            return []  # GenAI cannot tokenize nothing
        encoded = self.genai.encode(text, add_special_tokens=add_special_tokens)
        return [int(i) for i in encoded.input_ids.data[0]]

    def _learn_specials(self, ids: Sequence[int]) -> None:
        """Find out which of ``ids`` are special tokens (two batched decodes of the new ones).

        A special token is one that decoding with ``skip_special_tokens`` drops although it has
        text of its own (a byte-fallback piece of a character has none, and is not special).
        """
        new = sorted({int(i) for i in ids} - self._special_text.keys())
        if not new:
            return
        texts = self.genai.decode([[i] for i in new], skip_special_tokens=False)
        kept = self.genai.decode([[i] for i in new], skip_special_tokens=True)
        for token_id, text, visible in zip(new, texts, kept, strict=True):
            self._special_text[token_id] = text if text and not visible else None

    def special_text(self, token_id: int) -> str | None:
        """The string of ``token_id`` when it is a special token (``<|im_start|>``), else None."""
        self._learn_specials([token_id])
        return self._special_text[token_id]

    def special_strings(self, ids: Sequence[int]) -> set[str]:
        """The special-token strings among ``ids``."""
        self._learn_specials(ids)
        return {text for i in set(ids) if (text := self._special_text[int(i)])}

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with every special-token string in it spelled as plain text.

        Text between special-token strings is tokenized as usual; benign text gives exactly
        ``encode(text, add_special_tokens=False)``.
        """
        ids = self.encode(text, add_special_tokens=False)
        specials = {s for s in self.special_strings(ids) if s in text}
        if not specials:
            return ids
        out: list[int] = []
        cursor = 0
        while cursor < len(text):
            # The earliest special string, the longest at that place (as the tokenizer matches).
            found = [(text.find(s, cursor), -len(s), s) for s in specials]
            hits = sorted(hit for hit in found if hit[0] >= 0)
            if not hits:
                break
            start, _, special = hits[0]
            out += self.encode(text[cursor:start], add_special_tokens=False)
            out += self._spell(special)
            cursor = start + len(special)
        return out + self.encode(text[cursor:], add_special_tokens=False)

    def _spell(self, special: str) -> list[int]:
        """Ordinary token ids that decode to ``special``: the fewest over every cut into two parts
        that holds no special token (fewest puts the cut where the tokenizer's own pre-splitting
        would, so this is what a tokenizer that can split special tokens gives)."""
        if special in self._plain_spelling:
            return self._plain_spelling[special]
        best: list[int] | None = None
        for cut in range(1, len(special)):
            ids = self.encode(special[:cut], False) + self.encode(special[cut:], False)
            if any(self.special_text(i) for i in ids):
                continue
            if best is None or len(ids) < len(best):
                best = ids
        if best is None:  # no clean cut: one character at a time, leaving out any that is special
            best = [i for ch in special for i in self.encode(ch, False) if not self.special_text(i)]
        self._plain_spelling[special] = best
        return best

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Text of ``ids``. GenAI leaves out a trailing incomplete UTF-8 character (never U+FFFD)."""
        text: str = self.genai.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        """The chat template rendered by GenAI (text only)."""
        if tokenize:
            raise ValueError("OpenVINOTokenizer.apply_chat_template renders text only: use tokenize=False")
        text: str = self.genai.apply_chat_template(list(messages), add_generation_prompt)
        return text

    def __len__(self) -> int:
        # get_vocab_vector() fails on byte-level vocabularies (tokens that are not valid UTF-8).
        return len(self.genai.get_vocab())
