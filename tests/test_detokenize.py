"""The incremental detokenizer and the stop-string filter, on a real byte-level BPE tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from chatstream.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringFilter
from chatstream.testkit_models import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tiny_tokenizer()


def stream(tokenizer: Any, text: str, context: list[int] | None = None) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, context=context or [])
    deltas = [detokenizer.add(token) for token in ids]
    deltas.append(detokenizer.flush())
    return deltas


@pytest.mark.parametrize(
    "text",
    ["日本の首都は東京です。", "Hello, world! The capital of France is Paris.", "猫 cat 犬 dog ありがとう"],
)
def test_streamed_text_joins_to_the_text_without_half_characters(tokenizer: Any, text: str) -> None:
    deltas = stream(tokenizer, text)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_japanese_characters_really_span_several_tokens(tokenizer: Any) -> None:
    # Guards the test above: with one token per character it would prove nothing.
    ids = tokenizer("東京", add_special_tokens=False)["input_ids"]
    assert any(REPLACEMENT_CHAR in tokenizer.decode([token]) for token in ids)
    deltas = stream(tokenizer, "東京")
    assert "" in deltas[:-1]  # some tokens produced no text while a character was incomplete


def test_prompt_context_is_not_repeated(tokenizer: Any) -> None:
    context = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert "".join(stream(tokenizer, "Paris is nice.", context)) == "Paris is nice."


def test_special_tokens_are_shown_so_stop_strings_can_match_them(tokenizer: Any) -> None:
    assert "".join(stream(tokenizer, "ok<|im_end|>")) == "ok<|im_end|>"


def test_a_character_cut_off_at_the_end_is_dropped_not_shown_broken(tokenizer: Any) -> None:
    ids = tokenizer("はい東", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # the stream ends between the bytes of 東
    assert REPLACEMENT_CHAR in tokenizer.decode(cut)
    detokenizer = IncrementalDetokenizer(tokenizer)
    shown = [detokenizer.add(token) for token in cut]
    shown.append(detokenizer.flush())
    assert "".join(shown) == "はい"
    assert detokenizer.flush() == ""


def feed_all(stop: list[str], pieces: list[str]) -> tuple[list[str], StopStringFilter]:
    stops = StopStringFilter(stop)
    shown = [stops.feed(piece) for piece in pieces]
    shown.append(stops.flush())
    return shown, stops


def test_a_stop_string_split_over_pieces_is_never_shown() -> None:
    shown, stops = feed_all(["<|im_end|>"], ["Paris", ".<|im", "_e", "nd|>", "more"])
    assert "".join(shown) == "Paris."
    assert stops.stopped
    assert not any("<" in piece for piece in shown)


def test_a_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    shown, stops = feed_all(["###"], ["a #", "# b", " c"])
    assert shown[0] == "a "  # "#" held: it could start "###"
    assert "".join(shown) == "a ## b c"
    assert not stops.stopped


def test_the_earliest_of_several_stop_strings_wins() -> None:
    shown, _ = feed_all(["END", "\nUser:"], ["answer\nUser: hi END"])
    assert "".join(shown) == "answer"


def test_nothing_after_a_stop_is_shown() -> None:
    stops = StopStringFilter(["STOP"])
    assert stops.feed("x STOP y") == "x "
    assert stops.feed("more") == ""
    assert stops.flush() == ""


def test_without_stop_strings_text_passes_through_at_once() -> None:
    stops = StopStringFilter([])
    assert stops.feed("abc<") == "abc<"
    assert not stops.stopped


def test_held_text_is_released_at_the_end() -> None:
    shown, stops = feed_all(["<|im_end|>"], ["done <|im"])
    assert shown[0] == "done "
    assert "".join(shown) == "done <|im"
    assert not stops.stopped


def test_token_text_stream_counts_tokens_and_stops_at_the_stop_string() -> None:
    from chatstream.detokenize import TokenTextStream
    from chatstream.testkit_models import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    ids = tokenizer.encode("Hello world. STOP and more text", add_special_tokens=False)
    stream = TokenTextStream(tokenizer, [], stop=["STOP"])
    shown = "".join(stream.add([token]) for token in ids)
    assert stream.stopped and shown + stream.finish() == "Hello world. "
    assert 0 < stream.tokens < len(ids)  # tokens after the stop string are not consumed

    plain = TokenTextStream(tokenizer, [], stop=["never"])
    text = plain.add(ids) + plain.finish()
    assert text == tokenizer.decode(ids) and plain.tokens == len(ids) and not plain.stopped
