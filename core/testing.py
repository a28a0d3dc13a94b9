"""The test kit for plugin authors, installed as a pytest plugin (``-p chatstream.testing`` is automatic).

Fixtures:
- ``chatstream_plugins``: factory for an isolated set of plugins (built-ins plus the plugin objects
  you pass), never touching the process-wide plugin manager or installed entry points.
- ``mock_chatstream``: factory for a ``ChatStream`` on the generator mock with isolated plugins.
- ``chatstream_client``: factory for an ``httpx.AsyncClient`` talking to an app in-process.
- ``live_server``: context-manager factory that runs an app with uvicorn on a free loopback port
  and yields its base URL (for real streaming and disconnects).
- ``tiny_model``: a tiny random Llama and its tokenizer (built in-process, no download).
- ``replay_chatstream``: factory for a ``ChatStream`` that replays a recording (no model, no torch).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from .plugin_manager import BUILTIN_PLUGINS, LoadedPlugins, load_plugins, new_plugin_manager
from .testing_replay import make_replay_chatstream, replay_chatstream

__all__ = [
    "chatstream_client",
    "chatstream_plugins",
    "isolated_plugins",
    "live_server",
    "make_replay_chatstream",
    "mock_chatstream",
    "replay_chatstream",
    "run_live_server",
    "run_server_process",
    "tiny_model",
]


def isolated_plugins(
    *extra: Any, block: tuple[str, ...] = (), builtins: tuple[str, ...] = BUILTIN_PLUGINS
) -> LoadedPlugins:
    """Built-in plugins plus ``extra`` plugin objects (modules or instances), no entry points."""
    pm = new_plugin_manager()
    for plugin in extra:
        pm.register(plugin, name=getattr(plugin, "__name__", None) or type(plugin).__name__)
    return load_plugins(pm, builtins=builtins, block=block, entry_points=False)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_live_server(app: Any, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields ``http://127.0.0.1:PORT``."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


@contextlib.contextmanager
def run_server_process(
    command: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
    quiet: bool = False,
) -> Iterator[str]:
    """Run a server command (it must listen on 127.0.0.1:``port``) in a child process; yields its
    base URL once ``GET /ready`` answers 200, and stops the process afterwards. ``quiet`` drops
    its output."""
    import subprocess

    import httpx

    output = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(
        list(command), env=dict(env) if env is not None else None, stdout=output, stderr=output
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(command)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready in {timeout_s} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def chatstream_plugins() -> Callable[..., LoadedPlugins]:
    """Factory: ``chatstream_plugins(my_plugin_module, block=("name",))`` -> isolated plugins."""
    return isolated_plugins


@pytest.fixture
def mock_chatstream() -> Callable[..., Any]:
    """Factory: ``mock_chatstream(plugins=None, **options)`` -> a ChatStream on the generator mock."""
    from .chatstream import ChatStream

    def make(*, plugins: LoadedPlugins | None = None, **options: Any) -> ChatStream:
        options.setdefault("use_mock_response", True)
        return ChatStream(plugins=plugins or isolated_plugins(), **options)

    return make


@pytest.fixture
def chatstream_client() -> Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]:
    """Factory: ``async with chatstream_client(app) as client:`` -> httpx.AsyncClient in-process.

    Runs the app's lifespan. The in-process transport buffers whole responses; use
    ``live_server`` to observe streaming or disconnects.
    """
    import httpx

    @contextlib.asynccontextmanager
    async def make(app: Any) -> AsyncIterator[httpx.AsyncClient]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield client

    return make


@pytest.fixture
def live_server() -> Callable[[Any], contextlib.AbstractContextManager[str]]:
    """Factory: ``with live_server(app) as base_url:`` serves ``app`` over real HTTP."""
    return run_live_server


@pytest.fixture(scope="session")
def tiny_model() -> tuple[Any, Any]:
    """A tiny random Llama (fp32, CPU) and its byte-level BPE tokenizer; the same for the whole session."""
    from .testkit_models import make_tiny_llama

    return make_tiny_llama()
