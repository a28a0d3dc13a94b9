"""``AbstractChatPrompt``: a conversation plus the rules that render it in one model's format.

Subclass it the documented way: set role names in ``__init__`` and override ``create_prompt``
(and ``get_stop_strs``). Instances are per conversation and serialise with ``to_dict`` /
``from_dict`` so session stores can persist them.

Built-in formats render from :meth:`AbstractChatPrompt.rendered_messages` (role/content dicts
with the input replacement rules applied), so their output can be compared character for
character with the model's own Jinja chat template.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .types import Segment, joined

log = logging.getLogger(__name__)

ROLE_SYSTEM = "system"
ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"

# Bumped when the shape of ``to_dict`` changes incompatibly.
DICT_VERSION = 1

ReplacementDirection = Literal["input", "output"]


def new_message_id() -> str:
    """A fresh message id (opaque string)."""
    return uuid.uuid4().hex


@dataclass
class ChatContent:
    """One message: who said it and what. ``message`` is None for an answer still being generated."""

    role: str
    message: str | None
    id: str = field(default_factory=new_message_id)

    def get_role(self) -> str:
        """The role name as the format writes it (the requester or responder name)."""
        return self.role

    def get_message(self) -> str | None:
        """The text, or None while the answer is being generated."""
        return self.message

    def set_message(self, message: str | None) -> None:
        """Replace the text."""
        self.message = message

    def get_id(self) -> str:
        """The message id (stable across ``to_dict``/``from_dict``)."""
        return self.id


@dataclass(frozen=True)
class ReplacementRule:
    """Replace ``src`` with ``dest``: in user-side text before rendering (``input``) or in model output
    before it is shown (``output``)."""

    src: str
    dest: str
    direction: ReplacementDirection

    def __post_init__(self) -> None:
        if not isinstance(self.src, str) or not self.src:
            raise ValueError(f"replacement rule src={self.src!r} is invalid: use a non-empty string")
        if not isinstance(self.dest, str):
            raise ValueError(f"replacement rule dest={self.dest!r} is invalid: use a string")
        if self.direction not in ("input", "output"):
            raise ValueError(
                f"replacement rule direction={self.direction!r} is invalid: use 'input' or 'output'"
            )


class OutputReplacer:
    """Applies output replacement rules to streamed text, where a ``src`` may arrive split across pieces.

    ``feed`` returns what can be shown now and holds back a tail that could still become a
    ``src``; ``flush`` returns the rest at the end of the answer. The concatenated output equals
    ``replace_output`` of the whole text when no rule's ``src`` overlaps another's.
    """

    def __init__(self, rules: list[dict[str, str]]) -> None:
        self.rules = [(rule["src"], rule["dest"]) for rule in rules if rule.get("src")]
        self._pending = ""

    def _apply(self, text: str) -> str:
        for src, dest in self.rules:
            text = text.replace(src, dest)
        return text

    def feed(self, text: str) -> str:
        """Shown text for this piece (possibly empty)."""
        if not self.rules:
            return text
        buffer = self._pending + text
        hold = 0
        for src, _ in self.rules:
            # The longest suffix of the buffer that is a proper prefix of src must wait for more text.
            for size in range(min(len(src) - 1, len(buffer)), 0, -1):
                if src.startswith(buffer[-size:]):
                    hold = max(hold, size)
                    break
        ready, self._pending = (buffer[:-hold], buffer[-hold:]) if hold else (buffer, "")
        return self._apply(ready)

    def flush(self) -> str:
        """The held-back tail, at the end of the answer."""
        rest, self._pending = self._pending, ""
        return self._apply(rest)


class PromptShapeError(ValueError):
    """The conversation has a shape this prompt format cannot render (two user turns in a row for a
    format that needs them to alternate, no user message for a task format). The client can fix it."""


class PromptFormatMismatchError(ValueError):
    """``from_dict``/``load_dict`` got a conversation saved by another prompt format."""


def format_key(cls: type[AbstractChatPrompt]) -> str:
    """The identity of a prompt format in saved conversations: ``module:QualifiedName``."""
    return f"{cls.__module__}:{cls.__qualname__}"


class AbstractChatPrompt:
    """Base class of every prompt format.

    Class attributes a format may set:

    - ``stop_strs``: strings that end the model's turn (never shown to the user);
    - ``eos_tokens``: the special-token strings that end the model's turn (a subset of what the
      engine should treat as end of sequence);
    - ``default_system``: the system prompt used when none is set;
    - ``add_special_tokens``: whether the tokenizer should add BOS to the rendered text. False when
      the rendered text already contains BOS; None leaves the tokenizer's default;
    - ``replacement_rules``: rules every conversation of this format starts with;
    - ``default_prompt_ttl``: how many exchanges to render (None = all; 1 = task prompts).
    """

    stop_strs: tuple[str, ...] = ()
    eos_tokens: tuple[str, ...] = ()
    default_system: str | None = None
    add_special_tokens: bool | None = None
    replacement_rules: tuple[ReplacementRule, ...] = ()
    default_prompt_ttl: int | None = None

    def __init__(self) -> None:
        self.system: str | None = self.default_system
        self.chat_contents: list[ChatContent] = []
        self.requester = ROLE_USER
        self.responder = ROLE_ASSISTANT
        self.chat_mode = True
        self.prompt_ttl: int | None = self.default_prompt_ttl
        self.replacements: list[ReplacementRule] = list(self.replacement_rules)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> type[AbstractChatPrompt]:
        """The class to use with this tokenizer. ChatStream calls it once the tokenizer is known.

        Most formats do not depend on the tokenizer and return ``cls``; the ``hf`` format returns a
        subclass bound to the tokenizer's own chat template.
        """
        return cls

    # -- roles and system -------------------------------------------------------------------------
    def set_system(self, system: str | None) -> None:
        """Set the system prompt (None removes it)."""
        self.system = system

    def get_system(self) -> str | None:
        """The system prompt, or None."""
        return self.system

    def set_requester(self, requester: str) -> None:
        """Set the name the format uses for the user's role."""
        self.requester = requester

    def set_responder(self, responder: str) -> None:
        """Set the name the format uses for the model's role."""
        self.responder = responder

    def set_chat_mode_enabled(self, enabled: bool) -> None:
        """False renders only the latest request (task prompts such as translation)."""
        self.chat_mode = enabled

    def is_chat_mode_enabled(self) -> bool:
        """Whether earlier exchanges are rendered."""
        return self.chat_mode

    def set_prompt_ttl(self, ttl: int | None) -> None:
        """Render only the last ``ttl`` exchanges (1 = single turn, for task prompts); None renders all.

        The history itself is kept; only what the model sees is limited.
        """
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
            raise ValueError(f"prompt_ttl={ttl!r} is invalid: use a whole number >= 1, or None for no limit")
        self.prompt_ttl = ttl

    # -- replacement rules ------------------------------------------------------------------------
    def add_replacement_rule(
        self, src: str, dest: str, *, direction: Literal["input", "output", "both"] = "both"
    ) -> None:
        """Add a text replacement.

        ``input`` replaces ``src`` with ``dest`` in every message before rendering; ``output``
        replaces ``src`` with ``dest`` in model output before it is shown; ``both`` adds the input
        rule and its inverse for output. rinna's models, for example, need
        ``add_replacement_rule("\\n", "<NL>")``.
        """
        if direction == "both":
            self.replacements.append(ReplacementRule(src, dest, "input"))
            self.replacements.append(ReplacementRule(dest, src, "output"))
        else:
            self.replacements.append(ReplacementRule(src, dest, direction))

    def get_replacement_strs(self) -> list[dict[str, str]]:
        """The output replacements as ``[{"src": ..., "dest": ...}]`` (the documented shape)."""
        return [{"src": r.src, "dest": r.dest} for r in self.replacements if r.direction == "output"]

    def replace_input(self, text: str) -> str:
        """``text`` with the input replacement rules applied, in the order they were added."""
        for rule in self.replacements:
            if rule.direction == "input":
                text = text.replace(rule.src, rule.dest)
        return text

    def replace_output(self, text: str) -> str:
        """Model output with the output replacement rules (``get_replacement_strs``) applied."""
        for rule in self.get_replacement_strs():
            text = text.replace(rule["src"], rule["dest"])
        return text

    def output_replacer(self) -> OutputReplacer:
        """A streaming version of :meth:`replace_output` for one answer."""
        return OutputReplacer(self.get_replacement_strs())

    # -- the conversation ---------------------------------------------------------------------------
    def add_requester_msg(self, message: str, message_id: str | None = None) -> ChatContent:
        """Append a user message and return it."""
        if not isinstance(message, str):
            raise TypeError(f"the user message must be a string, not {type(message).__name__}")
        content = ChatContent(self.requester, message, message_id or new_message_id())
        self.chat_contents.append(content)
        return content

    def add_responder_msg(self, message: str | None, message_id: str | None = None) -> ChatContent:
        """Append a model message; None marks the answer about to be generated."""
        if message is not None and not isinstance(message, str):
            raise TypeError(f"the model message must be a string or None, not {type(message).__name__}")
        content = ChatContent(self.responder, message, message_id or new_message_id())
        self.chat_contents.append(content)
        return content

    def set_responder_last_msg(self, message: str) -> None:
        """Fill in (or replace) the text of the last model message."""
        last = self._last_responder()
        if last is None:
            raise ValueError("there is no responder message to set; call add_responder_msg first")
        last.message = message

    def clear_last_responder_message(self) -> None:
        """Empty the last model message (to generate it again)."""
        last = self._last_responder()
        if last is not None:
            last.message = None

    def remove_last_requester_msg(self) -> None:
        """Remove the last user message and anything after it."""
        for index in range(len(self.chat_contents) - 1, -1, -1):
            if self.chat_contents[index].role == self.requester:
                del self.chat_contents[index:]
                return

    def drop_oldest_exchange(self) -> bool:
        """Forget the oldest exchange (user message and its answer) to make the prompt shorter.

        Returns False, changing nothing, when fewer than two exchanges remain.
        """
        starts = [i for i, c in enumerate(self.chat_contents) if c.role == self.requester]
        if len(starts) < 2:
            return False
        del self.chat_contents[: starts[1]]
        return True

    def clear_history(self) -> None:
        """Forget every message (the system prompt stays)."""
        self.chat_contents.clear()

    def get_contents(self, opts: dict[str, Any] | None = None) -> list[ChatContent]:
        """Every message, oldest first (the live list; the prompt TTL is not applied here).

        ``opts`` is accepted for subclasses written against the documented signature.
        """
        return self.chat_contents

    def get_content(self, message_id: str) -> ChatContent | None:
        """The message with this id, or None."""
        for content in self.chat_contents:
            if content.id == message_id:
                return content
        return None

    def get_turn(self) -> int:
        """How many user messages the conversation has."""
        return sum(1 for content in self.chat_contents if content.role == self.requester)

    def get_requester_last_msg(self) -> str | None:
        """The text of the last user message, or None."""
        for content in reversed(self.chat_contents):
            if content.role == self.requester:
                return content.message
        return None

    def get_responder_last_msg(self) -> str | None:
        """The text of the last model message, or None."""
        for content in reversed(self.chat_contents):
            if content.role == self.responder:
                return content.message
        return None

    def _last_responder(self) -> ChatContent | None:
        if self.chat_contents and self.chat_contents[-1].role == self.responder:
            return self.chat_contents[-1]
        return None

    def visible_contents(self) -> list[ChatContent]:
        """The messages the prompt renders, after chat mode and the prompt TTL are applied."""
        contents = self.chat_contents
        keep = 1 if not self.chat_mode else self.prompt_ttl
        if keep is not None:
            starts = [i for i, c in enumerate(contents) if c.role == self.requester]
            if len(starts) > keep:
                contents = contents[starts[-keep] :]
        return list(contents)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style role/content dicts (pending answer excluded).

        Chat mode and the prompt TTL are applied; replacement rules are not (this is the text as the
        user sees it, for engines that render prompts themselves).
        """
        out: list[dict[str, str]] = []
        if self.system is not None:
            out.append({"role": ROLE_SYSTEM, "content": self.system})
        for content in self.visible_contents():
            if content.message is None:
                continue
            role = ROLE_USER if content.role == self.requester else ROLE_ASSISTANT
            out.append({"role": role, "content": content.message})
        return out

    def rendered_messages(self) -> list[dict[str, str]]:
        """``messages()`` with the input replacement rules applied: what a format renders."""
        return [{"role": m["role"], "content": self.replace_input(m["content"])} for m in self.messages()]

    # -- rendering ---------------------------------------------------------------------------------
    def render_segments(self) -> list[Segment]:
        """The prompt as segments: the format's template text (its special-token strings are control
        tokens) and message contents (always plain text). Joined, they are ``create_prompt()``.

        Built-in formats build their segments directly. A subclass that implements only
        ``create_prompt()`` (the documented way) gets them from one extra rendering in which every
        message is an unguessable marker: the text between markers is template. When the format
        changes message text in a way that cannot be followed (it is not inserted as given, nor
        stripped), the whole prompt is one template segment and a warning says that special-token
        strings typed in messages cannot be kept as text for this format.
        """
        if type(self).create_prompt is AbstractChatPrompt.create_prompt:
            raise NotImplementedError(
                f"{type(self).__name__} must implement render_segments() or create_prompt()"
            )
        return _segments_by_markers(self)

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """Render the conversation; the text ends where the model should continue."""
        if type(self).render_segments is AbstractChatPrompt.render_segments:
            raise NotImplementedError(f"{type(self).__name__} must implement create_prompt()")
        return joined(self.render_segments())

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt | None = None) -> str:
        """Render the prompt for a conversation with no messages yet (system prompt only)."""
        return (chat_prompt or self).create_prompt()

    def get_stop_strs(self) -> list[str]:
        """Strings that end the model's turn; never shown to the user.

        Subclasses written against the documented API may return None (no stop strings): callers
        should treat None as an empty list.
        """
        return list(self.stop_strs)

    def get_eos_tokens(self) -> list[str]:
        """The special-token strings that end the model's turn."""
        return list(self.eos_tokens)

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe) that ``from_dict`` restores exactly."""
        return {
            "version": DICT_VERSION,
            "format": format_key(type(self)),
            "system": self.system,
            "requester": self.requester,
            "responder": self.responder,
            "chat_mode": self.chat_mode,
            "prompt_ttl": self.prompt_ttl,
            "replacements": [[r.src, r.dest, r.direction] for r in self.replacements],
            "contents": [{"role": c.role, "message": c.message, "id": c.id} for c in self.chat_contents],
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Replace this conversation with one from ``to_dict``.

        Raises :class:`PromptFormatMismatchError` when ``data`` was saved by another format, and
        ``ValueError`` naming the field when it is malformed.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a saved conversation must be a dict from to_dict(), not {type(data).__name__}")
        saved_format = data.get("format")
        mine = format_key(type(self))
        if saved_format is not None and saved_format != mine:
            raise PromptFormatMismatchError(
                f"this conversation was saved by prompt format {saved_format!r} and cannot be loaded into "
                f"{mine!r}: load it with the class that saved it, or start a new conversation "
                "(the prompt format changed since it was stored)"
            )
        version = data.get("version", DICT_VERSION)
        if version != DICT_VERSION:
            raise ValueError(
                f"saved conversation has version={version!r}; this chatstream reads {DICT_VERSION}"
            )
        contents = data.get("contents", [])
        if not isinstance(contents, list):
            raise ValueError("saved conversation field 'contents' must be a list")
        loaded: list[ChatContent] = []
        for index, item in enumerate(contents):
            try:
                role, message, message_id = item["role"], item["message"], item["id"]
            except (KeyError, TypeError):
                raise ValueError(
                    f"saved conversation field 'contents[{index}]' must have 'role', 'message' and 'id'"
                ) from None
            if not isinstance(role, str) or not (message is None or isinstance(message, str)):
                raise ValueError(
                    f"saved conversation field 'contents[{index}]' has a non-string role or message"
                )
            loaded.append(ChatContent(role, message, str(message_id)))
        ttl = data.get("prompt_ttl")
        if ttl is not None and (not isinstance(ttl, int) or ttl < 1):
            raise ValueError(
                f"saved conversation field 'prompt_ttl'={ttl!r} must be a whole number >= 1 or None"
            )
        rules = data.get("replacements")
        self.system = data.get("system")
        self.requester = data.get("requester", self.requester)
        self.responder = data.get("responder", self.responder)
        self.chat_mode = bool(data.get("chat_mode", True))
        self.prompt_ttl = ttl
        if rules is not None:
            self.replacements = [ReplacementRule(*_rule_fields(rule)) for rule in rules]
        self.chat_contents = loaded

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbstractChatPrompt:
        """A new prompt of this class holding the conversation from ``to_dict``."""
        prompt = cls()
        prompt.load_dict(data)
        return prompt


_MARK_OPEN, _MARK_CLOSE = "\uf8f0", "\uf8f1"  # private-use characters: no rule or strip touches them
_warned_formats: set[str] = set()


def _marker_digits(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 256)
        digits = chr(0xE000 + digit) + digits
        if not number:
            return digits


def _segments_by_markers(prompt: AbstractChatPrompt) -> list[Segment]:
    """Segments of a format that only implements ``create_prompt()`` (see ``render_segments``)."""
    real = prompt.create_prompt()
    nonce = "".join(chr(0xE000 + byte) for byte in secrets.token_bytes(8))  # a user cannot type it
    marked = copy.copy(prompt)
    contents: list[str] = []

    def mark(text: str) -> str:
        contents.append(prompt.replace_input(text))
        return f"{_MARK_OPEN}{nonce}{_marker_digits(len(contents) - 1)}{_MARK_CLOSE}"

    marked.system = None if prompt.system is None else mark(prompt.system)
    marked.chat_contents = [
        c if c.message is None else dataclasses.replace(c, message=mark(c.message))
        for c in prompt.chat_contents
    ]
    pattern = re.compile(f"{_MARK_OPEN}{re.escape(nonce)}([\ue000-\ue0ff]+){_MARK_CLOSE}")
    parts = pattern.split(marked.create_prompt())
    for shape in (str, str.strip):  # inserted as given, or stripped (as many templates do)
        segments: list[Segment] = []
        for index, part in enumerate(parts):
            if index % 2 == 0:
                segments.append(Segment.template(part))
            else:
                number = 0
                for char in part:
                    number = number * 256 + ord(char) - 0xE000
                if number >= len(contents):
                    break
                segments.append(Segment.content(shape(contents[number])))
        else:
            if joined(segments) == real:
                return [segment for segment in segments if segment.text]
    key = format_key(type(prompt))
    if key not in _warned_formats:
        _warned_formats.add(key)
        log.warning(
            "prompt format %s changes message text while rendering, so chatstream cannot tell it from "
            "the template: special-token strings typed in messages may become control tokens. "
            "Implement render_segments() to keep message content plain text.",
            key,
        )
    return [Segment.template(real)]


def _rule_fields(rule: Iterable[Any]) -> tuple[str, str, ReplacementDirection]:
    fields = list(rule)
    if len(fields) != 3:
        raise ValueError(f"saved replacement rule {fields!r} must be [src, dest, direction]")
    return fields[0], fields[1], fields[2]
