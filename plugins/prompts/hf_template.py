"""``hf``: the tokenizer's own chat template, rendered by ``tokenizer.apply_chat_template``.

ChatStream binds the format to the model's tokenizer through :meth:`HFTemplatePrompt.for_tokenizer`;
the bound class renders ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.
It is picked automatically for a tokenizer that has a ``chat_template`` when no built-in format
matches the model id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.prompt import ROLE_USER, AbstractChatPrompt


class HFTemplatePrompt(AbstractChatPrompt):
    """Renders with the bound tokenizer's ``chat_template``.

    Use ``HFTemplatePrompt.for_tokenizer(tokenizer)`` (ChatStream does this); the unbound class
    cannot render. The bound class stops on the tokenizer's EOS token and tells the engine not to
    add special tokens when the template writes BOS itself.
    """

    tokenizer: Any = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> type[AbstractChatPrompt]:
        """A subclass bound to ``tokenizer``; saved conversations load into any bound subclass."""
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise ValueError(
                f"prompt format 'hf' needs a tokenizer with a chat_template, and {name!r} has none: "
                "pick a prompt format by name (setting prompt_format, see `chatstream prompts`)"
            )
        base = cls.__dict__.get("_unbound", cls)
        eos = getattr(tokenizer, "eos_token", None)
        eos_tokens = (eos,) if isinstance(eos, str) and eos else ()
        attrs: dict[str, Any] = {
            "tokenizer": tokenizer,
            "_unbound": base,
            "eos_tokens": eos_tokens,
            "stop_strs": eos_tokens,
            "add_special_tokens": _add_special_tokens(tokenizer),
            # Same identity as the unbound class, so to_dict/from_dict work across processes.
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        return type(base.__name__, (base,), attrs)

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``."""
        if self.tokenizer is None:
            raise RuntimeError(
                "prompt format 'hf' is not bound to a tokenizer: "
                "use HFTemplatePrompt.for_tokenizer(tokenizer)"
            )
        return _render(self.tokenizer, self.rendered_messages())


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # pragma: no cover - transformers returns str with tokenize=False
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _add_special_tokens(tokenizer: Any) -> bool | None:
    """False when the template writes BOS itself (a second would be added), else the tokenizer's default."""
    bos = getattr(tokenizer, "bos_token", None)
    if not isinstance(bos, str) or not bos:
        return None
    try:
        probe = _render(tokenizer, [{"role": ROLE_USER, "content": "hello"}])
    except Exception:  # a template that refuses a lone user message tells us nothing about BOS
        return None
    return False if bos in probe else None


@hookimpl(trylast=True)
def register_prompt_formats(register: Callable[..., None]) -> None:
    register(
        "hf",
        HFTemplatePrompt,
        description="the tokenizer's own chat_template (apply_chat_template)",
    )
