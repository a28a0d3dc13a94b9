"""The full HTTP API over real HTTP: sessions, regenerate, clear, params, feedback, roles, handlers."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis_server import redis_server_or_skip

from chatstream import ChatStream
from chatstream.app import create_app
from chatstream.hookspecs import hookimpl
from chatstream.sessions import AbstractRequestHandler, ChatSession

ADMIN_KEY = "admin-secret-key"
READER_KEY = "reader-key"
ADMIN = {"X-API-Key": ADMIN_KEY}
SETTINGS: dict[str, Any] = {
    "roles": {
        "default": [
            "chat_stream",
            "clear_context",
            "set_generation_params",
            "get_generation_params",
            "set_feedback",
            "get_load",
        ],
        "admin": ["*"],
        "reader": ["get_load"],
    },
    "api_keys": [
        {"role": "admin", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()},
        {"role": "reader", "key": READER_KEY},
    ],
    "session_secret": "test-secret-test-secret-test-secret",
}


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Settings for each session store; the session tests below run against all three."""
    if request.param == "memory":
        yield {"session_store": "memory"}
    elif request.param == "sqlite":
        yield {"session_store": "sqlite", "plugin_config": {"sqlite": {"path": str(tmp_path / "s.sqlite3")}}}
    else:
        with redis_server_or_skip(tmp_path) as server:
            yield {"session_store": "redis", "plugin_config": {"redis": {"url": server.url}}}


def make_app(mock_chatstream: Any, **options: Any) -> tuple[FastAPI, ChatStream]:
    from chatstream.settings import load_settings

    settings = load_settings(**{**SETTINGS, **options.pop("settings", {})})
    cs = mock_chatstream(settings=settings, **options)
    return create_app(chatstream=cs), cs


async def ask(client: httpx.AsyncClient, text: str = "", **body: Any) -> tuple[int, str, httpx.Headers]:
    """POST /chat_stream with delta chunks; returns status, whole answer, headers."""
    payload = {"user_input": text, **body}
    async with client.stream("POST", "/chat_stream?format=delta", json=payload) as response:
        answer = "".join([chunk async for chunk in response.aiter_text()])
        return response.status_code, answer, response.headers


async def history(client: httpx.AsyncClient) -> list[str | None]:
    response = await client.get("/get_prompt", headers=ADMIN)
    assert response.status_code == 200, response.text
    return [m["message"] for m in response.json()["messages"]]


async def test_two_sessions_keep_separate_multi_round_histories(
    mock_chatstream: Any, live_server: Any, store_settings: dict[str, Any]
) -> None:
    app, _ = make_app(mock_chatstream, mock_params={"type": "echo"}, settings=store_settings)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as alice, httpx.AsyncClient(base_url=url) as bob:
            assert (await ask(alice, "I am Alice"))[:2] == (200, "I am Alice")
            assert (await ask(bob, "I am Bob"))[:2] == (200, "I am Bob")
            assert (await ask(alice, "Who am I?"))[1] == "Who am I?"
            assert await history(alice) == ["I am Alice", "I am Alice", "Who am I?", "Who am I?"]
            assert await history(bob) == ["I am Bob", "I am Bob"]
            prompt = (await alice.get("/get_prompt", headers=ADMIN)).json()["prompt"]
            assert "I am Alice" in prompt and "Bob" not in prompt


async def test_regenerate_replaces_the_last_answer(
    mock_chatstream: Any, live_server: Any, store_settings: dict[str, Any]
) -> None:
    texts = ["first answer", "second answer"]
    app, _ = make_app(mock_chatstream, mock_params={"type": "round", "texts": texts}, settings=store_settings)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            _, answer, headers = await ask(client, "question")
            first_id = headers["x-message-id"]
            status, again, headers = await ask(client, regenerate=True)
            assert (status, answer, again) == (200, "first answer", "second answer")
            assert headers["x-message-id"] != first_id
            assert await history(client) == ["question", "second answer"]


async def test_clear_context_empties_the_history(
    mock_chatstream: Any, live_server: Any, store_settings: dict[str, Any]
) -> None:
    app, _ = make_app(mock_chatstream, mock_params={"type": "echo"}, settings=store_settings)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await ask(client, "remember me")
            assert (await client.post("/clear_context")).json() == {"success": True}
            assert await history(client) == []
            await ask(client, "fresh start")
            assert await history(client) == ["fresh start", "fresh start"]


async def test_disconnect_mid_stream_keeps_the_partial_answer(
    mock_chatstream: Any, live_server: Any, store_settings: dict[str, Any]
) -> None:
    app, cs = make_app(
        mock_chatstream, mock_params={"type": "long", "time_per_token_sec": 0.03}, settings=store_settings
    )
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            async with client.stream(
                "POST", "/chat_stream?format=delta", json={"user_input": "tell me"}
            ) as r:
                pieces = r.aiter_text()
                received = await pieces.__anext__() + await pieces.__anext__()
            deadline = time.monotonic() + 3
            while cs.load.processing:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            messages = await history(client)
    assert messages[0] == "tell me"
    partial = messages[1]
    assert partial and partial.startswith(received) and len(partial) < 500


async def test_a_second_request_on_a_streaming_session_gets_409(
    mock_chatstream: Any, live_server: Any
) -> None:
    app, _ = make_app(mock_chatstream, mock_params={"type": "long", "time_per_token_sec": 0.02})
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await ask(client, "x", generation_params={"max_new_tokens": 1})  # get a cookie
            async with client.stream("POST", "/chat_stream", json={"user_input": "long one"}) as r:
                pieces = r.aiter_text()
                await pieces.__anext__()
                second = await client.post("/chat_stream", json={"user_input": "meanwhile"})
                busy_clear = await client.post("/clear_context")
            assert second.status_code == 409 and second.json()["error"] == "session_busy"
            assert busy_clear.status_code == 409
            messages = await history(client)
    assert "meanwhile" not in messages


async def test_generation_params_are_per_session_validated_and_clamped(
    mock_chatstream: Any, chatstream_client: Any
) -> None:
    app, _ = make_app(mock_chatstream, settings={"sampling": {"limits": {"max_new_tokens": 100}}})
    async with chatstream_client(app) as client, chatstream_client(app) as other:
        ok = await client.post("/set_generation_params", json={"temperature": 0.3, "max_new_tokens": 5000})
        assert ok.status_code == 200, ok.text
        assert ok.json()["temperature"] == 0.3 and ok.json()["max_new_tokens"] == 100
        assert (await client.get("/get_generation_params")).json()["temperature"] == 0.3
        assert (await other.get("/get_generation_params")).json()["temperature"] == 1.0
        bad = await client.post("/set_generation_params", json={"temperature": -1})
        assert bad.status_code == 422 and "temperature" in bad.json()["message"]
        wrong_type = await client.post("/set_generation_params", json={"top_p": "high"})
        assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "top_p"
        unknown = await client.post("/set_generation_params", json={"temprature": 1})
        assert unknown.status_code == 422 and unknown.json()["field"] == "temprature"
        zero = await client.post("/set_generation_params", json={"repetition_penalty": 0})
        assert zero.status_code == 422 and "repetition_penalty" in zero.json()["message"]
        assert (await client.get("/get_generation_params")).json()["temperature"] == 0.3  # unchanged


async def test_feedback_reaches_the_hook_with_the_prompt_up_to_the_message(
    mock_chatstream: Any, live_server: Any
) -> None:
    received: list[dict[str, Any]] = []

    class Collector:
        @hookimpl
        def on_feedback(self, feedback: dict[str, Any]) -> None:
            received.append(feedback)

    app, cs = make_app(mock_chatstream, mock_params={"type": "echo"})
    cs.pm.register(Collector(), name="collector")
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            _, _, headers = await ask(client, "first")
            first_answer_id = headers["x-message-id"]
            await ask(client, "second")
            response = await client.post(
                "/set_feedback",
                json={"message_id": first_answer_id, "type": "like", "data": {"note": "good"}},
            )
            assert response.status_code == 200, response.text
            missing = await client.post("/set_feedback", json={"message_id": "nope", "type": "like"})
            wrong = await client.post("/set_feedback", json={"message_id": first_answer_id, "type": "love"})
    assert missing.status_code == 404 and wrong.status_code == 422 and wrong.json()["field"] == "type"
    [feedback] = received
    assert (
        feedback["type"] == "like" and feedback["message"] == "first" and feedback["data"] == {"note": "good"}
    )
    assert "first" in feedback["prompt"] and "second" not in feedback["prompt"]
    assert feedback["generation_params"]["temperature"] == 1.0


async def test_roles_allow_and_deny_as_configured(mock_chatstream: Any, chatstream_client: Any) -> None:
    app, _ = make_app(mock_chatstream)
    async with chatstream_client(app) as client:
        assert (await client.get("/get_load")).status_code == 200  # browser client, default role
        no_key = await client.get("/get_prompt")
        assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["message"]
        assert (await client.get("/get_prompt", headers={"X-API-Key": "wrong"})).status_code == 401
        denied = await client.get("/get_resource_usage", headers={"X-API-Key": READER_KEY})
        assert denied.status_code == 403 and "reader" in denied.json()["message"]
        assert (
            await client.get("/get_load", headers={"Authorization": f"Bearer {READER_KEY}"})
        ).status_code == 200
        usage = await client.get("/get_resource_usage", headers=ADMIN)
        assert usage.status_code == 200 and usage.json()["process"]["rss_bytes"] > 0
        assert (await client.get("/get_prompt", headers=ADMIN)).status_code == 200


def test_a_key_for_an_unknown_role_is_refused_at_start_up() -> None:
    from chatstream.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="api_keys"):
        load_settings(api_keys=[{"role": "root", "key": "k"}])
    with pytest.raises(SettingsError, match="exactly one of key or sha256"):
        load_settings(api_keys=[{"role": "admin"}])


async def test_stateless_handler_uses_the_sent_history_and_stores_nothing(
    mock_chatstream: Any, live_server: Any
) -> None:
    app, cs = make_app(
        mock_chatstream, settings={"request_handler": "stateless"}, mock_params={"type": "echo"}
    )
    seen: list[str] = []
    original = cs.engine.generate

    def spy(request: Any) -> Any:
        seen.append(request.prompt)
        return original(request)

    cs.engine.generate = spy
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
    ]
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            status, answer, headers = await ask(client, "What is my name?", messages=messages)
            bad = await client.post("/chat_stream", json={"user_input": "x", "messages": [{"role": "bot"}]})
    assert (status, answer) == (200, "What is my name?")
    assert "set-cookie" not in headers
    assert "Be brief." in seen[0] and "My name is Ada." in seen[0] and "Hello Ada." in seen[0]
    assert bad.status_code == 422 and bad.json()["field"].startswith("messages")


class HeaderUserHandler(AbstractRequestHandler):
    """A custom handler written the documented way: history per X-User header, kept in a dict."""

    def __init__(self) -> None:
        self.histories: dict[str, dict[str, Any]] = {}

    async def open_session(self, request: Any) -> ChatSession:
        assert self.chatstream is not None
        user = request.headers.get("x-user", "anonymous")
        record = self.histories.get(user)
        prompt = self.chatstream.restore_prompt(record) if record else self.chatstream.new_prompt()
        return ChatSession(user, prompt)

    async def save_session(self, request: Any, session: ChatSession) -> None:
        assert session.id is not None
        self.histories[session.id] = session.prompt.to_dict()


async def test_custom_request_handler_decides_where_history_lives(
    mock_chatstream: Any, live_server: Any
) -> None:
    handler = HeaderUserHandler()
    app, _ = make_app(mock_chatstream, request_handler=handler, mock_params={"type": "echo"})
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for user, text in (("ann", "hi, I am Ann"), ("ben", "hi, I am Ben"), ("ann", "again")):
                response = await client.post(
                    "/chat_stream", json={"user_input": text}, headers={"X-User": user}
                )
                assert response.status_code == 200
    assert [c["message"] for c in handler.histories["ann"]["contents"]][::2] == ["hi, I am Ann", "again"]
    assert len(handler.histories["ben"]["contents"]) == 2


async def test_append_apis_mounts_the_chosen_endpoints(mock_chatstream: Any) -> None:
    cs = mock_chatstream()
    only = FastAPI()
    cs.append_apis(only, {"include": ["get_load"]})
    without = FastAPI()
    cs.append_apis(without, {"exclude": ["get_resource_usage"]})
    paths = lambda app: {route.path for route in app.routes}  # noqa: E731
    assert "/get_load" in paths(only) and "/chat_stream" not in paths(only)
    assert "/chat_stream" in paths(without) and "/get_resource_usage" not in paths(without)
    with pytest.raises(
        ValueError, match=r"'plugin_config\.fastapi\.include\[0\]': Input should be 'chat_stream'"
    ):
        cs.append_apis(FastAPI(), {"include": ["chat_strem"]})


async def test_server_uses_a_prompt_format_from_an_installed_pack(
    mock_chatstream: Any, live_server: Any
) -> None:
    pytest.importorskip(
        "chatstream_prompts_ja_neox", reason="pip install ./contrib_prompts/chatstream-prompts-ja-neox"
    )
    from chatstream.plugin_manager import load_plugins

    plugins = load_plugins()
    app, _ = make_app(
        mock_chatstream,
        plugins=plugins,
        settings={"prompt_format": "redpajama"},
        mock_params={"type": "echo"},
    )
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await ask(client, "Hello there")
            prompt = (await client.get("/get_prompt", headers=ADMIN)).json()["prompt"]
    assert prompt.startswith("<human>: Hello there\n<bot>:")


async def test_unreachable_session_store_is_a_clear_503(mock_chatstream: Any, chatstream_client: Any) -> None:
    from chatstream.testing import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    redis_settings = {"session_store": "redis", "plugin_config": {"redis": {"url": dead, "timeout_s": 0.5}}}
    app, _ = make_app(mock_chatstream, settings=redis_settings)
    async with chatstream_client(app) as client:
        chat = await client.post("/chat_stream", json={"user_input": "hello"})
        clear = await client.post("/clear_context")
    assert chat.status_code == 503 and chat.json()["error"] == "session_store_unavailable"
    assert "plugin_config.redis.url" in chat.json()["message"]
    # A client with no session yet has nothing to clear: nothing is stored, nothing fails.
    assert clear.status_code == 200


async def test_a_turn_whose_answer_never_came_is_dropped(mock_chatstream: Any, live_server: Any) -> None:
    app, cs = make_app(mock_chatstream, mock_params={"type": "echo"})
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await ask(client, "kept")
            cookie = client.cookies.get("chatstream_session")
            assert cookie is not None
            session_id = cookie.split(".")[0]
            record = await cs.session_store.load(session_id)
            assert record is not None
            # as if the server had stopped mid-answer after saving the question
            record["prompt"]["contents"] += [
                {"role": "user", "message": "orphan", "id": "u2"},
                {"role": "assistant", "message": None, "id": "a2"},
            ]
            await cs.session_store.save(session_id, record)
            await ask(client, "next")
            assert await history(client) == ["kept", "kept", "next", "next"]
