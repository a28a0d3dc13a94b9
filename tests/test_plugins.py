"""Plugin discovery: built-ins, third-party distributions, broken plugins, duplicates, listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from chatstream.hookspecs import hookimpl
from chatstream.plugin_manager import (
    BUILTIN_PLUGINS,
    PluginError,
    PluginLoadWarning,
    describe_plugins,
    load_plugins,
)
from chatstream.registry import collect
from chatstream.testing import isolated_plugins

GOOD_PLUGIN = """
from chatstream import AbstractChatPrompt, hookimpl

class ShoutPrompt(AbstractChatPrompt):
    def create_prompt(self):
        return "".join(f"{c.role.upper()}: {c.message or ''}\\n" for c in self.get_contents())

@hookimpl
def register_prompt_formats(register):
    register("shout", ShoutPrompt, description="a test format")
"""


def write_distribution(root: Path, dist: str, module: str, source: str, ep_name: str) -> Path:
    """Write an installed-looking distribution (module + .dist-info with an entry point) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[chatstream]\n{ep_name} = {module}\n")
    return root


@pytest.fixture
def site_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_builtins_register_in_the_declared_order() -> None:
    loaded = isolated_plugins()
    names = [info.name for info in describe_plugins(loaded) if info.builtin]
    assert sorted(names) == sorted(BUILTIN_PLUGINS)
    engines = collect(loaded.pm, "engines")
    assert {"mock", "transformers"} <= set(engines)
    assert engines["mock"].plugin == "chatstream.plugins.engines.mock"


def test_third_party_plugin_is_found_through_its_entry_point(site_dir: Path) -> None:
    write_distribution(site_dir, "chatstream-shout", "chatstream_shout", GOOD_PLUGIN, "shout")
    loaded = load_plugins()
    info = {i.name: i for i in describe_plugins(loaded)}["shout"]
    assert (info.distribution, info.version) == ("chatstream-shout", "1.2.3")
    assert info.hooks == ["register_prompt_formats"]
    formats = collect(loaded.pm, "prompt_formats")
    assert formats["shout"].plugin == "shout"


def test_plugins_setting_limits_and_blocks_third_party_plugins(site_dir: Path) -> None:
    write_distribution(site_dir, "chatstream-shout", "chatstream_shout", GOOD_PLUGIN, "shout")
    names = {i.name for i in describe_plugins(load_plugins(load=[]))}
    assert "shout" not in names
    names = {i.name for i in describe_plugins(load_plugins(block=["shout"]))}
    assert "shout" not in names
    names = {i.name for i in describe_plugins(load_plugins(block=["mock"]))}
    assert "chatstream.plugins.engines.mock" not in names and "shout" in names


def test_broken_plugin_warns_with_its_name_and_distribution(site_dir: Path) -> None:
    write_distribution(
        site_dir, "chatstream-broken", "chatstream_broken", "import not_a_module_xyz\n", "broken"
    )
    with pytest.warns(PluginLoadWarning, match=r"'broken' from distribution 'chatstream-broken'"):
        loaded = load_plugins()
    failed = {i.name: i for i in describe_plugins(loaded)}["broken"]
    assert failed.error and "not_a_module_xyz" in failed.error
    assert "chatstream.plugins.engines.mock" in {i.name for i in describe_plugins(loaded)}


def test_broken_plugin_is_fatal_in_strict_mode(site_dir: Path) -> None:
    write_distribution(
        site_dir, "chatstream-broken", "chatstream_broken", "raise RuntimeError('boom')\n", "broken"
    )
    with pytest.raises(PluginError, match="boom"):
        load_plugins(strict=True)


def test_a_third_party_contribution_replaces_the_trylast_builtin_of_that_name() -> None:
    class Rival:
        @hookimpl
        def register_engines(self, register: object) -> None:
            register("mock", lambda config: None)  # type: ignore[operator]

    engines = collect(isolated_plugins(Rival()).pm, "engines")
    assert engines["mock"].plugin == "Rival"
    assert engines["transformers"].plugin == "chatstream.plugins.engines.transformers_engine"


def test_two_contributions_of_equal_priority_name_both_plugins() -> None:
    class Fallback:
        @hookimpl(trylast=True)
        def register_engines(self, register: object) -> None:
            register("mock", lambda config: None)  # type: ignore[operator]

    loaded = isolated_plugins(Fallback())
    with pytest.raises(
        PluginError,
        match=r"'mock' is registered by both .*'Fallback'.*engines\.mock|engines\.mock.*'Fallback'",
    ):
        collect(loaded.pm, "engines")


def test_unknown_hook_is_refused_at_load() -> None:
    class Typo:
        @hookimpl
        def register_engine(self, register: object) -> None:  # missing "s"
            pass

    with pytest.raises(PluginError, match="register_engine"):
        isolated_plugins(Typo())


def run_cli(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    code = "import sys; from chatstream.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_plugins_command_lists_plugins_while_one_is_broken(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_distribution(site, "chatstream-shout", "chatstream_shout", GOOD_PLUGIN, "shout")
    write_distribution(site, "chatstream-broken", "chatstream_broken", "import not_a_module_xyz\n", "broken")
    result = run_cli("plugins", "--json", extra_path=site)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["shout"]["distribution"] == "chatstream-shout" and rows["shout"]["version"] == "1.2.3"
    assert rows["broken"]["error"]
    assert "register_engines" in rows["chatstream.plugins.engines.mock"]["hooks"]
    assert "chatstream-broken" in result.stderr  # the warning names the distribution


def test_pip_installed_plugin_distribution_is_discovered(tmp_path: Path) -> None:
    project = tmp_path / "chatstream-hello"
    (project / "chatstream_hello").mkdir(parents=True)
    (project / "chatstream_hello" / "__init__.py").write_text(GOOD_PLUGIN.replace('"shout"', '"hello"'))
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "chatstream-hello"
            version = "0.0.1"
            [project.entry-points.chatstream]
            hello = "chatstream_hello"
            """
        )
    )
    target = tmp_path / "target"
    with warnings.catch_warnings():
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(target),
                str(project),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert pip.returncode == 0, pip.stderr
    result = run_cli("plugins", "--json", extra_path=target)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["hello"]["distribution"] == "chatstream-hello"
    assert rows["hello"]["hooks"] == ["register_prompt_formats"]


def test_block_plugins_in_a_config_file_blocks(tmp_path: Path) -> None:
    """Plugins load after settings: a ``--config`` TOML's ``block_plugins`` is honoured even when
    the process loaded its plugins from the environment first (as the CLI does at start-up)."""
    from chatstream import ChatStream
    from chatstream.plugin_manager import get_loaded_plugins, set_plugin_manager
    from chatstream.registry import UnknownNameError
    from chatstream.settings import load_settings

    config = tmp_path / "chatstream.toml"
    config.write_text('block_plugins = ["mock"]\n')
    set_plugin_manager(None)
    try:
        assert get_loaded_plugins().pm.has_plugin("chatstream.plugins.engines.mock")  # environment first
        settings = load_settings(config)
        with pytest.raises(UnknownNameError, match="unknown engine 'mock'"):
            ChatStream(settings=settings, use_mock_response=True)
        assert not get_loaded_plugins().pm.has_plugin("chatstream.plugins.engines.mock")
    finally:
        set_plugin_manager(None)
