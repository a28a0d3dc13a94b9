"""Typed plugin options: a contribution declares a pydantic model, core validates its section.

A contribution registered with ``options=SomeOptions`` (a :class:`PluginOptions` subclass) gets
its settings section (``plugin_config.<name>``, or ``sampling.processors.<name>`` for a logits
processor) validated before it is built, and receives the model instance instead of a dict.
Errors read like those of core settings: the full dotted path, the problem, the value given and
the environment variable to set. Unknown keys are refused, with the known ones listed.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

from .settings import SettingsError

M = TypeVar("M", bound=BaseModel)


class PluginOptions(BaseModel):
    """Base for a contribution's options: unknown keys are refused and the result is read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(PluginOptions):
    """For a contribution that takes no options: any key in its settings section is refused."""


def describe_error(exc: ValidationError, model: type[BaseModel], path: str) -> str:
    """One line per bad option: ``setting 'plugin_config.x.opt': problem (got v); set it with ...``."""
    known = ", ".join(model.model_fields)
    lines = []
    for error in exc.errors():
        name = path + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
        # A list item is set with its whole list (JSON): the variable stops at the first index.
        settable = [path]
        for part in error["loc"]:
            if isinstance(part, int):
                break
            settable.append(str(part))
        env = "CHATSTREAM_" + "__".join(part.replace(".", "__") for part in settable).upper()
        if error["type"] == "extra_forbidden":
            what = path.rsplit(".", 1)[-1]
            problem = (
                f"unknown option; known options: {known}"
                if known
                else f"unknown option; {what} takes no options"
            )
        else:
            problem = error["msg"]
        given = error.get("input")
        shown = "" if isinstance(given, dict) or error["type"] == "missing" else f" (got {given!r})"
        lines.append(f"setting {name!r}: {problem}{shown}; set it with {env} or --config")
    return "invalid settings:\n  " + "\n  ".join(lines)


def parse_options(model: type[M], value: M | Mapping[str, Any] | None, path: str) -> M:
    """``value`` as a ``model``: an instance as it is, a mapping (or None: empty) validated.

    ``path`` is where the options live in the settings (``plugin_config.redis``); a bad value
    raises :class:`~chatstream.core.settings.SettingsError` naming ``<path>.<option>``.
    """
    if isinstance(value, model):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise SettingsError(
            f"invalid settings:\n  setting {path!r}: must be a table of options (got {value!r}); "
            "set it with --config or CHATSTREAM_" + path.replace(".", "__").upper() + "__<OPTION>"
        )
    try:
        return model.model_validate(dict(value or {}))
    except ValidationError as exc:
        raise SettingsError(describe_error(exc, model, path)) from None


@dataclass(frozen=True)
class OptionInfo:
    """One option as ``chatstream plugins --options`` shows it."""

    name: str
    type: str
    default: str
    description: str


def describe_options(model: type[BaseModel] | None) -> list[OptionInfo]:
    """Each field of an options model: name, type, default (``required`` when none) and description."""
    if model is None:
        return []
    rows = []
    for name, field in model.model_fields.items():
        shown_type = type_name(field.annotation)
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        elif field.default_factory is not None:
            default = json.dumps(field.default_factory(), default=str)  # type: ignore[call-arg]
        else:
            default = json.dumps(field.default, default=str)
        rows.append(OptionInfo(name, shown_type, default, field.description or ""))
    return rows


def type_name(annotation: Any) -> str:
    """A type as an operator reads it: ``int | None``, ``'dynamic' | 'slots'``, ``list[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin is not None:
        inner = ", ".join(type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
