"""Prompt formats from plugins: the registry, choosing one for a model, and helpers for format authors.

A plugin registers a format with ``register(name, cls, model_patterns=(...), description="...")``
in its ``register_prompt_formats`` hook. :func:`select_prompt_format` picks one: an explicit name,
else the first format whose pattern matches the model id, else the tokenizer's own chat template
(``hf``), else ``chatml`` with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import pluggy

from .plugin_manager import PluginError, get_plugin_manager
from .prompt import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER, AbstractChatPrompt
from .registry import Contribution, UnknownNameError, lookup, registry

log = logging.getLogger(__name__)

KIND = "prompt_formats"
HF_FORMAT = "hf"
FALLBACK_FORMAT = "chatml"
_META_KEYS = {"model_patterns", "description"}


def _validate(contribution: Contribution[Any]) -> None:
    where = f"prompt format {contribution.name!r} from plugin {contribution.plugin!r}"
    obj = contribution.obj
    if not (isinstance(obj, type) and issubclass(obj, AbstractChatPrompt)):
        raise PluginError(
            f"{where} must be an AbstractChatPrompt subclass, got {obj!r}: register the class itself"
        )
    unknown = set(contribution.meta) - _META_KEYS
    if unknown:
        raise PluginError(
            f"{where} passed unknown register() options {sorted(unknown)}; use model_patterns and description"
        )
    patterns = contribution.meta.get("model_patterns", ())
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise PluginError(f"{where}: model_patterns must be a tuple of regular expressions, got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern, re.IGNORECASE)
        except (re.error, TypeError) as exc:
            raise PluginError(
                f"{where}: model pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from None
    if not isinstance(contribution.meta.get("description", ""), str):
        raise PluginError(f"{where}: description must be a string")


def prompt_format_registry(pm: pluggy.PluginManager | None = None) -> dict[str, Contribution[Any]]:
    """Every registered prompt format by name; ``obj`` is the ``AbstractChatPrompt`` subclass.

    A contribution that is not such a class, or has an invalid model pattern, is a
    ``PluginError`` naming the plugin.
    """
    return registry(pm or get_plugin_manager(), KIND, check=_validate)


def model_patterns(contribution: Contribution[Any]) -> tuple[str, ...]:
    """The model-id patterns a format was registered with."""
    return tuple(contribution.meta.get("model_patterns", ()))


def select_prompt_format(
    formats: Mapping[str, Contribution[Any]],
    *,
    name: str | None = None,
    model_id: str | None = None,
    tokenizer: Any = None,
) -> tuple[Contribution[Any], str]:
    """The format to use and why, in this order.

    1. ``name`` given: that format ("explicit setting"); unknown -> ``UnknownNameError`` listing
       the known names.
    2. ``model_id`` matches a format's pattern (case-insensitive ``re.search``); formats are tried
       in registry order, where a third-party plugin's come before the built-ins.
    3. ``tokenizer`` has a ``chat_template``: ``hf``.
    4. ``chatml``, with a reason that says it is a guess.

    The choice is logged (INFO; WARNING for the fallback).
    """
    if name is not None:
        chosen = lookup(dict(formats), "prompt format", name, "prompt_format")
        reason = "explicit setting"
        log.info("prompt format %r: %s", chosen.name, reason)
        return chosen, reason
    if model_id:
        for contribution in formats.values():
            for pattern in model_patterns(contribution):
                if re.search(pattern, model_id, re.IGNORECASE):
                    reason = (
                        f"model id {model_id!r} matches pattern {pattern!r} of format {contribution.name!r}"
                    )
                    log.info("prompt format %r: %s", contribution.name, reason)
                    return contribution, reason
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and HF_FORMAT in formats:
        reason = f"tokenizer has a chat_template -> {HF_FORMAT}"
        log.info("prompt format %r: %s", HF_FORMAT, reason)
        return formats[HF_FORMAT], reason
    if FALLBACK_FORMAT not in formats:
        known = ", ".join(sorted(formats)) or "(none)"
        raise UnknownNameError(
            f"no prompt format matches model {model_id!r} and the fallback {FALLBACK_FORMAT!r} is not "
            f"registered; set prompt_format to one of: {known}"
        )
    reason = (
        f"no format matches model id {model_id!r} and the tokenizer has no chat_template; "
        f"falling back to {FALLBACK_FORMAT} (set prompt_format if the answers look wrong)"
    )
    log.warning("prompt format %r: %s", FALLBACK_FORMAT, reason)
    return formats[FALLBACK_FORMAT], reason


class PromptFormatRow(NamedTuple):
    """One line of ``chatstream prompts``."""

    name: str
    plugin: str
    description: str


def describe_prompt_formats(formats: Mapping[str, Contribution[Any]]) -> list[PromptFormatRow]:
    """Rows ``(name, plugin, description)`` sorted by name; a missing description becomes the class name."""
    rows = []
    for contribution in formats.values():
        description = contribution.meta.get("description") or contribution.obj.__name__
        rows.append(PromptFormatRow(contribution.name, contribution.plugin, description))
    return sorted(rows)


# -- helpers for format authors (used by chatstream's own tests and by prompt packs) -----------------


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs: Any,
) -> str:
    """Render a Jinja chat template the way ``tokenizer.apply_chat_template(..., tokenize=False)`` does.

    ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
    ``loopcontrols`` extension and a ``raise_exception`` global. Use it to compare a format's
    ``create_prompt()`` with the model's reference template.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **kwargs,
    )


def build_prompt(cls: type[AbstractChatPrompt], messages: Sequence[Mapping[str, str]]) -> AbstractChatPrompt:
    """A conversation of format ``cls`` holding ``messages`` (role/content dicts), ready to render.

    An optional leading ``system`` message sets the system prompt (without one, the format's
    default stays); then user and assistant messages in order. When the last message is from the
    user, a pending answer is added, as ChatStream does before generating.
    """
    prompt = cls()
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}]['content'] must be a string, got {content!r}")
        if role == ROLE_SYSTEM and index == 0:
            prompt.set_system(content)
        elif role == ROLE_USER:
            prompt.add_requester_msg(content)
        elif role == ROLE_ASSISTANT:
            prompt.add_responder_msg(content)
        else:
            raise ValueError(
                f"messages[{index}]['role']={role!r} is not supported: use an optional first 'system', "
                "then 'user' and 'assistant'"
            )
    if messages and messages[-1].get("role") == ROLE_USER:
        prompt.add_responder_msg(None)
    return prompt
