"""The plugin manager: built-ins from an explicit ordered tuple, third parties from entry points.

Plugins load once, lazily, on the first call of :func:`get_plugin_manager`. A third-party plugin
that fails to import is skipped with a warning naming it and its distribution, unless
``strict_plugins`` is set. ``CHATSTREAM_TRACE_HOOKS=1`` prints every hook call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "chatstream"

# Order matters only where a plugin relies on another's contribution; names are the module paths.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "chatstream.plugins.prompts.chatml",
    "chatstream.plugins.prompts.llama2",
    "chatstream.plugins.prompts.llama3",
    "chatstream.plugins.prompts.llama3_1",
    "chatstream.plugins.prompts.rakutenai",
    "chatstream.plugins.prompts.karasu",
    "chatstream.plugins.prompts.nekomata",
    "chatstream.plugins.prompts.hf_template",
    "chatstream.plugins.processors.penalties",
    "chatstream.plugins.processors.sampling",
    "chatstream.plugins.engines.mock",
    "chatstream.plugins.engines.transformers_engine",
    "chatstream.plugins.engines.replay",
    "chatstream.plugins.engines.openvino_engine",
    "chatstream.plugins.engines.upstream",
    "chatstream.plugins.engines.vllm_engine",
    "chatstream.plugins.handlers.simple_session",
    "chatstream.plugins.handlers.stateless",
    "chatstream.plugins.stores.memory",
    "chatstream.plugins.stores.sqlite",
    "chatstream.plugins.stores.redis",
    "chatstream.plugins.transports.fastapi",
    "chatstream.plugins.transports.openai",
    "chatstream.plugins.transports.webui",
    "chatstream.plugins.transports.ops",
)


class PluginLoadWarning(UserWarning):
    """A third-party plugin could not be loaded and was skipped."""


class PluginError(RuntimeError):
    """A plugin is broken in a way chatstream cannot work around (or ``strict_plugins`` is on)."""


@dataclass
class PluginInfo:
    """What ``chatstream plugins`` shows for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    builtin: bool
    error: str | None = None


@dataclass
class LoadedPlugins:
    """The result of loading: the manager plus what failed, for introspection."""

    pm: pluggy.PluginManager
    failed: list[PluginInfo] = field(default_factory=list)
    dist_of: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


def _split_names(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return list(value)


def new_plugin_manager() -> pluggy.PluginManager:
    """An empty manager with chatstream's hook specs; tests and embedders may register into it."""
    pm = pluggy.PluginManager("chatstream")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("CHATSTREAM_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


def load_plugins(
    pm: pluggy.PluginManager | None = None,
    *,
    load: str | Iterable[str] | None = None,
    block: Iterable[str] = (),
    strict: bool = False,
    builtins: Iterable[str] = BUILTIN_PLUGINS,
    entry_points: bool = True,
) -> LoadedPlugins:
    """Register built-ins, then third-party plugins from the ``chatstream`` entry-point group.

    ``load`` limits third-party plugins to these names (entry-point names); ``block`` names
    plugins (built-in module paths or entry-point names) not to register at all.
    """
    pm = pm or new_plugin_manager()
    result = LoadedPlugins(pm)
    _distributions[pm] = result.dist_of
    blocked = set(block)
    for module_name in builtins:
        if module_name in blocked or module_name.rsplit(".", 1)[-1] in blocked:
            pm.set_blocked(module_name)
            continue
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        result.dist_of[module_name] = ("chatstream", _version("chatstream"))
    if entry_points:
        wanted = _split_names(load)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (wanted is not None and ep.name not in wanted):
                continue
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            try:
                plugin = ep.load()
                if pm.is_registered(plugin) or pm.has_plugin(ep.name):
                    continue
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not brick the host
                message = (
                    f"plugin {ep.name!r} from distribution {dist!r} failed to load and was skipped: "
                    f"{type(exc).__name__}: {exc}. Fix or uninstall it (pip uninstall {dist}), "
                    f"or block it with CHATSTREAM_BLOCK_PLUGINS='[\"{ep.name}\"]'."
                )
                if strict:
                    raise PluginError(message) from exc
                warnings.warn(message, PluginLoadWarning, stacklevel=2)
                result.failed.append(PluginInfo(ep.name, dist, version, [], False, error=str(exc)))
                continue
            result.dist_of[ep.name] = (dist, version)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook chatstream does not define: {exc}") from exc
    return result


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_lock = threading.Lock()
_loaded: LoadedPlugins | None = None
# The plugin settings ``_loaded`` was made with; None: set by the test kit, kept as it is.
_loaded_for: tuple[Any, ...] | None = None


def _plugin_settings(settings: Any) -> tuple[Any, ...]:
    wanted = settings.plugins
    return (None if wanted is None else tuple(wanted), tuple(settings.block_plugins), settings.strict_plugins)


def get_loaded_plugins(settings: Any = None) -> LoadedPlugins:
    """The process-wide plugins, loaded once for the given settings (default: the environment's).

    Settings come first: when ``plugins``, ``block_plugins`` or ``strict_plugins`` differ from
    those the plugins were loaded with (a ``--config`` file read after the CLI started), they are
    loaded again for these settings, so whichever source set them is honoured.
    """
    global _loaded, _loaded_for
    with _lock:
        if settings is None:
            if _loaded is not None:
                return _loaded
            from .settings import Settings

            settings = Settings()
        wanted = _plugin_settings(settings)
        if _loaded is None or (_loaded_for is not None and _loaded_for != wanted):
            _loaded = load_plugins(
                load=settings.plugins, block=settings.block_plugins, strict=settings.strict_plugins
            )
            _loaded_for = wanted
        return _loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    return get_loaded_plugins().pm


def set_plugin_manager(loaded: LoadedPlugins | None) -> None:
    """Replace (or with None, reset) the process-wide plugins; used by the test kit."""
    global _loaded, _loaded_for
    with _lock:
        _loaded = loaded
        _loaded_for = None


def describe_plugins(loaded: LoadedPlugins) -> list[PluginInfo]:
    """One entry per registered plugin (and per plugin that failed to load)."""
    infos = []
    for name, plugin in loaded.pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in loaded.pm.get_hookcallers(plugin) or [])
        dist, version = loaded.dist_of.get(name, (None, None))
        builtin = isinstance(plugin, ModuleType) and plugin.__name__.startswith("chatstream.plugins.")
        infos.append(PluginInfo(name, dist, version, hooks, builtin))
    return infos + loaded.failed


def plugin_name_of(pm: pluggy.PluginManager, plugin: Any) -> str:
    """The registered name of a plugin object."""
    return pm.get_name(plugin) or repr(plugin)


# The distribution (name, version) of each plugin, per manager made by load_plugins.
_distributions: weakref.WeakKeyDictionary[pluggy.PluginManager, dict[str, tuple[str | None, str | None]]]
_distributions = weakref.WeakKeyDictionary()


def distribution_of(pm: pluggy.PluginManager, plugin_name: str) -> str | None:
    """The installed distribution that gave a plugin (``chatstream`` for built-ins), if known."""
    return _distributions.get(pm, {}).get(plugin_name, (None, None))[0]


def each_implementation(
    pm: pluggy.PluginManager, hook_name: str
) -> Iterator[tuple[pluggy.HookImpl, str, Callable[..., list[Any]]]]:
    """Each implementation of a hook, in pluggy's call order, with its plugin's name and a caller
    that calls only it, through pluggy (so hook tracing and monitoring see the call)."""
    impls = list(reversed(getattr(pm.hook, hook_name).get_hookimpls()))
    for impl in impls:
        alone = pm.subset_hook_caller(hook_name, remove_plugins=[i.plugin for i in impls if i is not impl])
        yield impl, plugin_name_of(pm, impl.plugin), alone
