"""The plugin contract as a third party meets it: every hook called as specified, registries built
once through pluggy, typed options with errors naming their full path, replacing one built-in
contribution, blocking a built-in for real, and no built-in reaching into another."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from every_hook_plugin import EveryHook, ProcessorOptions, StoreOptions, TransportOptions

from chatstream import hookspecs
from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.cli import cli
from chatstream.hookspecs import Feedback, RequestFinishedInfo, hookimpl
from chatstream.plugin_manager import PluginError
from chatstream.registry import UnknownNameError, registry
from chatstream.settings import SettingsError, load_settings
from chatstream.testing import isolated_plugins, run_live_server

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s" * 32
HOOKS = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "chatstream_spec"))


def every_hook() -> EveryHook:
    return EveryHook(registry(isolated_plugins().pm, "engines")["mock"].obj)


def every_hook_settings(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "engine": "every_hook_engine",
        "prompt_format": "every_hook_format",
        "session_store": "every_hook_store",
        "request_handler": "every_hook_handler",
        "transports": ["fastapi", "every_hook_transport"],
        "session_secret": SECRET,
        "sampling": {
            "pipeline": ["every_hook_processor", "temperature"],
            "processors": {"every_hook_processor": {"scale": 2}},
        },
        "plugin_config": {
            "every_hook_store": {"max_sessions": 7},
            "every_hook_transport": {"greeting": "hi"},
        },
        "roles": {"default": ["*"]},
    }
    return load_settings(**(values | overrides))


# -- every hook, called as specified ----------------------------------------------------------------
def test_every_hook_has_a_test_implementation() -> None:
    implemented = sorted(
        name for name, member in inspect.getmembers(EveryHook) if hasattr(member, "chatstream_impl")
    )
    assert len(HOOKS) >= 11
    assert implemented == HOOKS, "add the new hook to tests/every_hook_plugin.py and test it here"


def test_every_hook_is_called_with_what_its_spec_promises() -> None:
    plugin = every_hook()
    plugins = isolated_plugins(plugin)
    cs = ChatStream(settings=every_hook_settings(), plugins=plugins)
    with run_live_server(create_app(chatstream=cs)) as url, httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post("/chat_stream", params={"format": "delta"}, json={"user_input": "hello"})
        message_id = client.get("/get_prompt").json()["messages"][1]["id"]
        feedback = client.post("/set_feedback", json={"message_id": message_id, "type": "like"})
        greeting = client.get("/every_hook").json()
    result = CliRunner().invoke(_cli_with(plugins), ["every-hook"])

    assert answer.status_code == 200 and answer.text and feedback.status_code == 200
    assert result.exit_code == 0 and "every hook command ran" in result.output
    assert set(HOOKS) <= set(plugin.calls), f"never called: {set(HOOKS) - set(plugin.calls)}"
    # Registries were built once each, though the ChatStream and the app both read them.
    for hook in HOOKS:
        if hook.startswith("register_") and hook != "register_commands":
            assert len(plugin.calls[hook]) == 1, hook
    # Typed options arrive as model instances with the configured values.
    assert plugin.calls["store_factory"][0]["options"] == StoreOptions(max_sessions=7)
    assert plugin.calls["transport_install"][0]["options"] == TransportOptions(greeting="hi")
    assert greeting == {"greeting": "hi"}
    assert ProcessorOptions(scale=2) in [call["options"] for call in plugin.calls["processor_factory"]]
    assert cs.session_store.max_sessions == 7
    # Event hooks get the ChatStream and every documented key, no more, no fewer.
    assert [call["chatstream"] for call in plugin.calls["startup"]] == [cs]
    assert [call["chatstream"] for call in plugin.calls["shutdown"]] == [cs]
    (finished,) = plugin.calls["on_request_finished"]
    assert finished["reason"] == "success" and finished["request_id"] == answer.headers["x-request-id"]
    assert set(finished["info"]) == set(RequestFinishedInfo.__annotations__)
    assert finished["info"]["transport"] == "chat_stream" and finished["info"]["tokens"] > 0
    (given,) = plugin.calls["on_feedback"]
    assert set(given["feedback"]) == set(Feedback.__annotations__)
    assert given["feedback"]["message_id"] == message_id and given["feedback"]["message"] == answer.text


def _cli_with(plugins: Any) -> Any:
    import click

    group = click.Group("chatstream", commands=dict(cli.commands))
    plugins.pm.hook.register_commands(cli=group)
    return group


# -- registries ---------------------------------------------------------------------------------------
def test_registries_are_built_once_through_pluggy_and_traced() -> None:
    plugins = isolated_plugins(every_hook())
    traced: list[str] = []
    plugins.pm.trace.root.setwriter(traced.append)
    undo = plugins.pm.enable_tracing()
    try:
        first = registry(plugins.pm, "engines")
        assert registry(plugins.pm, "engines") is first  # read again: not rebuilt
    finally:
        undo()
    calls = [line for line in traced if "register_engines" in line]
    builtin_engine_plugins = {c.plugin for c in first.values() if c.distribution == "chatstream"}
    assert len(calls) >= len(builtin_engine_plugins) + 1  # one traced call per implementation
    assert first["mock"].plugin == "chatstream.plugins.engines.mock"
    assert first["mock"].distribution == "chatstream"
    assert first["every_hook_engine"].plugin == "EveryHook"

    class Late:
        @hookimpl
        def register_engines(self, register: Any) -> None:
            register("late", lambda config: None)

    plugins.pm.register(Late())
    assert "late" in registry(plugins.pm, "engines")  # a plugin registered later is seen


# -- typed options ------------------------------------------------------------------------------------
def test_a_typed_option_error_names_its_full_path_the_value_and_the_variable() -> None:
    plugins = isolated_plugins(every_hook())
    bad = every_hook_settings(plugin_config={"every_hook_store": {"max_sessions": 0}})
    with pytest.raises(SettingsError) as info:
        ChatStream(settings=bad, plugins=plugins)
    message = str(info.value)
    assert "setting 'plugin_config.every_hook_store.max_sessions'" in message and "(got 0)" in message
    assert "CHATSTREAM_PLUGIN_CONFIG__EVERY_HOOK_STORE__MAX_SESSIONS" in message

    unknown = every_hook_settings(plugin_config={"every_hook_store": {"max_session": 3}})
    with pytest.raises(
        SettingsError, match=r"'plugin_config\.every_hook_store\.max_session': unknown option; "
    ):
        ChatStream(settings=unknown, plugins=plugins)

    processor = every_hook_settings(
        sampling={"pipeline": ["every_hook_processor"], "processors": {"every_hook_processor": {"scale": -1}}}
    )
    with pytest.raises(
        SettingsError, match=r"'sampling\.processors\.every_hook_processor\.scale'.*\(got -1\)"
    ):
        ChatStream(settings=processor, plugins=plugins)


def test_a_bad_builtin_option_from_the_environment_stops_serve_with_its_path(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CHATSTREAM_PLUGIN_CONFIG__MEMORY__TTL_S": "-5",
        "CHATSTREAM_PORT": "1",
    }
    code = "import sys; from chatstream.cli import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "serve", "--mock"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "setting 'plugin_config.memory.ttl_s'" in done.stderr and "(got -5)" in done.stderr
    assert "Traceback" not in done.stderr


# -- replacing one built-in contribution ----------------------------------------------------------------
class OwnMemoryStore:
    @hookimpl
    def register_session_stores(self, register: Any) -> None:
        register("memory", lambda options: OwnStore())


class OwnStore(dict[str, Any]):
    async def load(self, session_id: str) -> Any:
        return self.get(session_id)

    async def save(self, session_id: str, data: Any) -> None:
        self[session_id] = data

    async def delete(self, session_id: str) -> None:
        self.pop(session_id, None)

    async def close(self) -> None:
        return None


def test_a_third_party_replaces_one_builtin_contribution_by_its_name() -> None:
    plugins = isolated_plugins(OwnMemoryStore())
    stores = registry(plugins.pm, "session_stores")
    assert stores["memory"].plugin == "OwnMemoryStore"
    assert stores["sqlite"].plugin == "chatstream.plugins.stores.sqlite"  # the rest stays built-in
    cs = ChatStream(settings=load_settings(session_store="memory"), plugins=plugins, use_mock_response=True)
    assert isinstance(cs.session_store, OwnStore)


def test_tryfirst_replaces_another_third_party_and_equal_priority_is_an_error() -> None:
    class Replacement:
        @hookimpl(tryfirst=True)
        def register_session_stores(self, register: Any) -> None:
            register("memory", lambda options: "replacement")

    stores = registry(isolated_plugins(OwnMemoryStore(), Replacement()).pm, "session_stores")
    assert stores["memory"].plugin == "Replacement"

    class Rival:
        @hookimpl
        def register_session_stores(self, register: Any) -> None:
            register("memory", lambda options: "rival")

    with pytest.raises(PluginError, match=r"'memory' is registered by both '(Rival|OwnMemoryStore)' and"):
        registry(isolated_plugins(OwnMemoryStore(), Rival()).pm, "session_stores")


# -- blocking ----------------------------------------------------------------------------------------
def test_a_blocked_builtin_is_never_imported_and_its_contributions_are_gone() -> None:
    code = (
        "import sys\n"
        "from chatstream.plugin_manager import load_plugins\n"
        "from chatstream.registry import registry\n"
        "pm = load_plugins(block=['memory', 'chatstream.plugins.transports.webui'], entry_points=False).pm\n"
        "print(sorted(registry(pm, 'session_stores')), sorted(registry(pm, 'transports')))\n"
        "print('chatstream.plugins.stores.memory' in sys.modules,\n"
        "      'chatstream.plugins.transports.webui' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.splitlines() == ["['redis', 'sqlite'] ['fastapi', 'openai', 'ops']", "False False"]

    plugins = isolated_plugins(block=("memory",))
    with pytest.raises(UnknownNameError, match=r"unknown session store 'memory'.*unblock it"):
        ChatStream(settings=load_settings(), plugins=plugins, use_mock_response=True)


def test_webui_without_the_fastapi_transport_says_it_is_blocked() -> None:
    plugins = isolated_plugins(block=("chatstream.plugins.transports.fastapi",))
    cs = ChatStream(settings=load_settings(transports=["webui"]), plugins=plugins, use_mock_response=True)
    with pytest.raises(
        SettingsError, match=r"webui .* no plugin provides a 'fastapi' transport .*block_plugins"
    ):
        create_app(chatstream=cs)


def test_blocking_ops_removes_its_routes_but_not_request_ids() -> None:
    plugins = isolated_plugins(block=("ops",))
    settings = load_settings(transports=["fastapi", "ops"], session_secret=SECRET)
    cs = ChatStream(settings=settings, plugins=plugins, use_mock_response=True)
    with pytest.raises(UnknownNameError, match=r"unknown transport 'ops'"):
        create_app(chatstream=cs)
    cs = ChatStream(settings=load_settings(transports=["fastapi"]), plugins=plugins, use_mock_response=True)
    with run_live_server(create_app(chatstream=cs)) as url:
        assert httpx.get(f"{url}/health").status_code == 404
        load = httpx.get(f"{url}/get_load")
    assert load.status_code == 200 and load.headers["x-request-id"]


def _imports(path: Path) -> list[str]:
    """Absolute module names a source file imports (relative imports resolved)."""
    module = _module_name(path)
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    parts[0] = {"core": "chatstream", "plugins": "chatstream.plugins"}[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_builtin_reaches_into_another_and_core_imports_no_plugin() -> None:
    """Blocking a built-in must remove it: so core never imports a plugin, and a plugin imports
    only its own modules (chatstream.plugins.<kind>.<name>...), never another plugin's."""
    offending = []
    for path in sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py")):
        module = _module_name(path)
        if module == "chatstream":
            continue  # its lazy aliases (chatstream.SimpleSessionRequestHandler) register nothing
        family = ".".join(module.split(".")[:4]) if module.startswith("chatstream.plugins.") else None
        for name in _imports(path):
            if not name.startswith("chatstream.plugins.") or name.count(".") < 3:
                continue
            target = ".".join(name.split(".")[:4])
            if family is None or target != family:
                offending.append(f"{module} imports {name}")
    assert not offending, "\n".join(sorted(set(offending)))


def test_plugins_options_lists_each_contribution_with_its_typed_options() -> None:
    code = "import sys; from chatstream.cli import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "plugins", "--options", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = {(row["kind"], row["name"]): row for row in json.loads(done.stdout)}
    memory = rows[("session_stores", "memory")]
    assert memory["plugin"] == "chatstream.plugins.stores.memory" and memory["distribution"] == "chatstream"
    assert memory["options_path"] == "plugin_config.memory"
    ttl = next(option for option in memory["options"] if option["name"] == "ttl_s")
    assert ttl["type"] == "float" and ttl["default"] == "3600.0" and "expires" in ttl["description"]
    window = next(o for o in rows[("logits_processors", "repetition")]["options"] if o["name"] == "window")
    assert window["type"] == "int | None" and rows[("logits_processors", "repetition")]["options_path"] == (
        "sampling.processors.repetition"
    )
    builtins = [row for row in rows.values() if row["distribution"] == "chatstream" and row["options_path"]]
    assert [row["name"] for row in builtins if not row["typed_options"]] == []  # every built-in is typed
