"""Named contributions from ``register_*`` hooks, with the plugin that gave each one."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from .plugin_manager import PluginError, plugin_name_of

T = TypeVar("T")

KINDS = {
    "prompt_formats": "register_prompt_formats",
    "logits_processors": "register_logits_processors",
    "engines": "register_engines",
    "session_stores": "register_session_stores",
    "request_handlers": "register_request_handlers",
    "transports": "register_transports",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Contribution(Generic[T]):
    """One named thing a plugin registered."""

    kind: str
    name: str
    obj: T
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)


class UnknownNameError(KeyError, ValueError):
    """A setting named a contribution no plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def collect(
    pm: pluggy.PluginManager, kind: str, check: Callable[[str, Any], None] | None = None
) -> dict[str, Contribution[Any]]:
    """Call every implementation of ``register_<kind>`` and gather contributions by name.

    A name given by two plugins is an error naming both, except that a contribution from a
    ``trylast`` implementation (a fallback) gives way silently to one from a normal implementation.
    """
    hook_name = KINDS[kind]
    found: dict[str, Contribution[Any]] = {}
    caller = getattr(pm.hook, hook_name)
    # get_hookimpls() is in reverse call order; fallbacks (trylast) come first.
    for impl in reversed(caller.get_hookimpls()):
        plugin = plugin_name_of(pm, impl.plugin)

        def register(
            name: str, obj: Any, _plugin: str = plugin, _fallback: bool = impl.trylast, **meta: Any
        ) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(
                    f"plugin {_plugin!r} registered a {kind[:-1]} with the invalid name {name!r}: "
                    "use letters, digits, '_', '-' or '.'"
                )
            if check is not None:
                check(name, obj)
            if name in found:
                if _fallback:
                    return
                raise PluginError(
                    f"{kind[:-1]} {name!r} is registered by both {found[name].plugin!r} and {_plugin!r}: "
                    f"block one of them (CHATSTREAM_BLOCK_PLUGINS) or rename it"
                )
            found[name] = Contribution(kind, name, obj, _plugin, dict(meta))

        kwargs = {arg: register for arg in impl.argnames if arg == "register"}
        impl.function(**kwargs)
    return found


def lookup(contributions: dict[str, Contribution[T]], kind: str, name: str, setting: str) -> Contribution[T]:
    """The contribution called ``name``, or an error that lists the known names and the setting to fix."""
    try:
        return contributions[name]
    except KeyError:
        known = ", ".join(sorted(contributions)) or "(none)"
        raise UnknownNameError(
            f"unknown {kind} {name!r} in setting {setting!r}; known: {known}. "
            "Install the plugin that provides it or pick a known name."
        ) from None
