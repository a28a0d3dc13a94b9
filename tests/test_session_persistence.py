"""Cookie conversations that outlive one process: two replicas sharing Redis, a restart on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis_server import RedisServer, redis_server_or_skip

from chatstream import AbstractChatPrompt, ChatStream
from chatstream.app import create_app
from chatstream.plugin_manager import BUILTIN_PLUGINS
from chatstream.plugins.stores.redis import RedisSessionStore
from chatstream.plugins.stores.sqlite import SQLiteSessionStore
from chatstream.sessions import SessionStore
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins

SECRET = "a-long-random-secret-shared-by-every-replica"
STORE_PLUGINS = ("chatstream.plugins.stores.sqlite", "chatstream.plugins.stores.redis")


class TurnPrompt(AbstractChatPrompt):
    """A plain two-role format, enough for the mock engine."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("USER")
        self.set_responder("BOT")

    def create_prompt(self) -> str:
        return "\n".join(f"{c.role}: {c.message or ''}" for c in self.get_contents())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server_or_skip(tmp_path) as server:
        yield server


def make_app(mock_chatstream: Any, store: SessionStore) -> tuple[FastAPI, ChatStream]:
    cs = mock_chatstream(
        settings=load_settings(session_secret=SECRET),
        session_store=store,
        chat_prompt_clazz=TurnPrompt,
        mock_params={"type": "echo"},
    )
    return create_app(chatstream=cs), cs


async def say(client: httpx.AsyncClient, base_url: str, text: str) -> str:
    """One turn; returns the session id from the cookie the server set."""
    response = await client.post(f"{base_url}/chat_stream", json={"user_input": text})
    assert response.status_code == 200
    cookie = client.cookies.get("chatstream_session")
    assert cookie is not None
    return cookie.split(".")[0]


def messages(record: dict[str, Any] | None) -> list[str]:
    assert record is not None
    return [c["message"] for c in record["prompt"]["contents"]]


async def test_two_replicas_sharing_redis_continue_one_conversation(
    mock_chatstream: Any, live_server: Any, redis_server: RedisServer
) -> None:
    app_a, _ = make_app(mock_chatstream, RedisSessionStore(redis_server.url))
    app_b, _ = make_app(mock_chatstream, RedisSessionStore(redis_server.url))
    with live_server(app_a) as url_a, live_server(app_b) as url_b:
        # One browser behind a load balancer: the same cookie jar reaches both replicas.
        async with httpx.AsyncClient() as browser:
            ids = [
                await say(browser, url_a, "hello from replica A"),
                await say(browser, url_b, "now B answers"),
                await say(browser, url_a, "and A again"),
            ]
    assert len(set(ids)) == 1  # every replica accepted the other's cookie
    reader = RedisSessionStore(redis_server.url)
    try:
        assert messages(await reader.load(ids[0])) == [
            "hello from replica A",
            "hello from replica A",
            "now B answers",
            "now B answers",
            "and A again",
            "and A again",
        ]
    finally:
        await reader.close()


async def test_sqlite_conversation_continues_after_a_restart(
    mock_chatstream: Any, live_server: Any, tmp_path: Path
) -> None:
    path = tmp_path / "sessions.sqlite3"
    async with httpx.AsyncClient() as browser:
        app, _ = make_app(mock_chatstream, SQLiteSessionStore(path))
        with live_server(app) as url:
            first_id = await say(browser, url, "remember me")
        # The server stopped (its store closed); a new process starts on the same file.
        app, cs = make_app(mock_chatstream, SQLiteSessionStore(path))
        with live_server(app) as url:
            second_id = await say(browser, url, "still there?")
            record = await cs.session_store.load(second_id)
    assert second_id == first_id
    assert messages(record) == ["remember me", "remember me", "still there?", "still there?"]


async def test_stores_are_chosen_and_configured_by_settings(mock_chatstream: Any, tmp_path: Path) -> None:
    plugins = isolated_plugins(builtins=tuple(dict.fromkeys(BUILTIN_PLUGINS + STORE_PLUGINS)))
    path = tmp_path / "from-settings.sqlite3"
    cs = mock_chatstream(
        plugins=plugins,
        settings=load_settings(
            session_store="sqlite", plugin_config={"sqlite": {"path": str(path), "ttl_s": 60}}
        ),
    )
    try:
        assert isinstance(cs.session_store, SQLiteSessionStore)
        assert cs.session_store.path == path and cs.session_store.ttl_s == 60
        assert path.exists()
    finally:
        await cs.close()
    cs = mock_chatstream(
        plugins=plugins,
        settings=load_settings(
            session_store="redis", plugin_config={"redis": {"url": "redis://127.0.0.1:1/2", "prefix": "p:"}}
        ),
    )
    try:
        assert isinstance(cs.session_store, RedisSessionStore)
        assert cs.session_store.url == "redis://127.0.0.1:1/2" and cs.session_store.key("x") == "p:x"
    finally:
        await cs.close()
    with pytest.raises(
        ValueError,
        match=r"'plugin_config\.sqlite\.file': unknown option.*CHATSTREAM_PLUGIN_CONFIG__SQLITE__FILE",
    ):
        mock_chatstream(
            plugins=plugins,
            settings=load_settings(session_store="sqlite", plugin_config={"sqlite": {"file": "x"}}),
        )
