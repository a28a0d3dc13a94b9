"""Named contributions from ``register_*`` hooks: built once per set of plugins, through pluggy.

Each kind's registry is built the first time it is read: every implementation of its
``register_<kind>`` hook is called once, through pluggy (so ``CHATSTREAM_TRACE_HOOKS`` shows the
call), with a ``register`` callback that knows which plugin and distribution is calling. Later
reads return the same registry until a plugin is registered or unregistered.

Two plugins giving the same name: the one pluggy calls first wins when the other's
implementation has a lower priority (``tryfirst`` > normal > ``trylast``), so a third party
replaces one built-in contribution by registering its name from a ``tryfirst`` implementation,
or any ``trylast`` built-in from a normal one. Equal priority is an error naming both plugins.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy
from pydantic import BaseModel

from .options import parse_options
from .plugin_manager import PluginError, distribution_of, each_implementation

T = TypeVar("T")

KINDS = {
    "prompt_formats": "register_prompt_formats",
    "logits_processors": "register_logits_processors",
    "engines": "register_engines",
    "session_stores": "register_session_stores",
    "request_handlers": "register_request_handlers",
    "transports": "register_transports",
}

# Where each kind's options live in the settings; ``{name}`` is the contribution's name.
OPTIONS_PATH = {
    "logits_processors": "sampling.processors.{name}",
    "engines": "plugin_config.{name}",
    "session_stores": "plugin_config.{name}",
    "request_handlers": "plugin_config.{name}",
    "transports": "plugin_config.{name}",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Contribution(Generic[T]):
    """One named thing a plugin registered.

    ``options`` is the pydantic model its settings section is validated against (None: the
    contribution takes a plain dict); ``distribution`` the installed package that gave it.
    """

    kind: str
    name: str
    obj: T
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)
    options: type[BaseModel] | None = None
    distribution: str | None = None
    priority: int = 0  # 1: tryfirst, 0: normal, -1: trylast

    def options_path(self) -> str:
        """Where this contribution's options live in the settings, e.g. ``plugin_config.redis``."""
        return OPTIONS_PATH.get(self.kind, "plugin_config.{name}").format(name=self.name)

    def parse_options(self, raw: Any) -> Any:
        """The options this contribution is built with: ``raw`` (its settings section) validated
        against its options model, or a plain dict when it declared none. A bad value raises
        ``SettingsError`` naming ``<options_path>.<option>``."""
        if self.options is None:
            return dict(raw or {})
        return parse_options(self.options, raw, self.options_path())


class UnknownNameError(KeyError, ValueError):
    """A setting named a contribution no plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def _priority(impl: pluggy.HookImpl) -> int:
    return 1 if impl.tryfirst else -1 if impl.trylast else 0


def _check(contribution: Contribution[Any]) -> None:
    where = f"plugin {contribution.plugin!r}, {contribution.kind[:-1]} {contribution.name!r}"
    if contribution.kind != "prompt_formats" and not callable(contribution.obj):
        raise PluginError(
            f"{where}: register it with a callable factory (or class), got {type(contribution.obj).__name__}"
        )
    model = contribution.options
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise PluginError(f"{where}: options= must be a pydantic model class (PluginOptions), got {model!r}")


def collect(
    pm: pluggy.PluginManager, kind: str, check: Callable[[Contribution[Any]], None] | None = None
) -> dict[str, Contribution[Any]]:
    """Call every implementation of ``register_<kind>``, one at a time through pluggy, and gather
    the contributions by name, in call order. ``check`` vets each one (raise ``PluginError``)."""
    hook_name = KINDS[kind]
    found: dict[str, Contribution[Any]] = {}
    for impl, plugin, call in each_implementation(pm, hook_name):
        distribution = distribution_of(pm, plugin)
        priority = _priority(impl)

        def register(
            name: str,
            obj: Any,
            *,
            options: type[BaseModel] | None = None,
            _plugin: str = plugin,
            _distribution: str | None = distribution,
            _priority: int = priority,
            **meta: Any,
        ) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(
                    f"plugin {_plugin!r} registered a {kind[:-1]} with the invalid name {name!r}: "
                    "use letters, digits, '_', '-' or '.'"
                )
            contribution = Contribution(
                kind, name, obj, _plugin, dict(meta), options, _distribution, _priority
            )
            _check(contribution)
            if check is not None:
                check(contribution)
            earlier = found.get(name)
            if earlier is not None:
                if earlier.priority > _priority:
                    return  # a higher-priority implementation already gave this name: it wins
                raise PluginError(
                    f"{kind[:-1]} {name!r} is registered by both {earlier.plugin!r} and {_plugin!r}: "
                    "block one of them (block_plugins), rename it, or register the replacement from a "
                    "tryfirst hook implementation"
                )
            found[name] = contribution

        call(register=register)
    return found


# Registries already built, per plugin manager, with the plugin set each was built for.
_built: weakref.WeakKeyDictionary[pluggy.PluginManager, dict[str, tuple[Any, dict[str, Contribution[Any]]]]]
_built = weakref.WeakKeyDictionary()
_built_lock = threading.RLock()


def _plugin_set(pm: pluggy.PluginManager) -> tuple[Any, ...]:
    return tuple((name, id(plugin)) for name, plugin in pm.list_name_plugin())


def registry(
    pm: pluggy.PluginManager, kind: str, check: Callable[[Contribution[Any]], None] | None = None
) -> dict[str, Contribution[Any]]:
    """The contributions of one kind, built once for the plugins now registered (see module doc).

    ``check`` vets each contribution when the registry is built; a failing check is raised on every
    read, since nothing is kept. The result is shared: treat it as read-only.
    """
    key = _plugin_set(pm)
    with _built_lock:
        per_kind = _built.setdefault(pm, {})
        cached = per_kind.get(kind)
        if cached is not None and cached[0] == key:
            return cached[1]
        built = collect(pm, kind, check)
        per_kind[kind] = (key, built)
        return built


def lookup(contributions: dict[str, Contribution[T]], kind: str, name: str, setting: str) -> Contribution[T]:
    """The contribution called ``name``, or an error that lists the known names and the setting to fix."""
    try:
        return contributions[name]
    except KeyError:
        known = ", ".join(sorted(contributions)) or "(none)"
        raise UnknownNameError(
            f"unknown {kind} {name!r} in setting {setting!r}; known: {known}. "
            "Install the plugin that provides it, unblock it (block_plugins), or pick a known name."
        ) from None
