"""A browser session's many conversations over the ChatStream HTTP API: made by the first message,
listed, created, opened, continued by id, renamed, deleted, private to their session, and kept
across a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins, run_live_server

SECRET = "c" * 32


def app(**settings: Any) -> Any:
    values: dict[str, Any] = {
        "transports": ["fastapi"],
        "session_secret": SECRET,
        "mock_params": {"type": "echo"},
    }
    cs = ChatStream(
        settings=load_settings(**(values | settings)), plugins=isolated_plugins(), use_mock_response=True
    )
    return create_app(chatstream=cs)


@pytest.fixture
def url() -> Iterator[str]:
    with run_live_server(app()) as base:
        yield base


def say(client: httpx.Client, text: str, **body: Any) -> str:
    response = client.post("/chat_stream?format=delta", json={"user_input": text, **body})
    assert response.status_code == 200, response.text
    return response.text


def messages(client: httpx.Client, conversation_id: str) -> list[str]:
    response = client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return [m["message"] for m in response.json()["messages"]]


def test_the_first_message_makes_a_conversation_named_by_it(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as browser:
        assert browser.get("/conversations").json() == {"conversations": [], "current": None}
        say(browser, "What is the tallest mountain?")
        say(browser, "And the deepest lake?")
        listed = browser.get("/conversations").json()
    (only,) = listed["conversations"]
    assert listed["current"] == only["id"] and only["title"] == "What is the tallest mountain?"
    with httpx.Client(base_url=url, timeout=30, cookies=browser.cookies) as again:  # a reload
        assert messages(again, only["id"]) == [
            "What is the tallest mountain?",
            "What is the tallest mountain?",
            "And the deepest lake?",
            "And the deepest lake?",
        ]


def test_new_open_and_continue_switch_the_history_the_model_sees(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as browser:
        say(browser, "first conversation")
        first = browser.get("/conversations").json()["current"]
        created = browser.post("/conversations", json={})
        assert created.status_code == 201 and created.json()["messages"] == []
        second = created.json()["id"]
        say(browser, "second conversation")
        assert messages(browser, second) == ["second conversation", "second conversation"]
        assert messages(browser, first) == ["first conversation", "first conversation"]
        opened = browser.post(f"/conversations/{first}/open")
        assert opened.status_code == 200 and opened.json()["current"] is True
        say(browser, "back to the first")
        assert messages(browser, first)[-2:] == ["back to the first", "back to the first"]
        say(browser, "by id", conversation_id=second)  # continues the second, which becomes current
        assert messages(browser, second)[-1] == "by id"
        listed = browser.get("/conversations").json()
    assert listed["current"] == second
    assert [c["id"] for c in listed["conversations"]] == [second, first]  # most recently updated first


def test_rename_and_delete(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as browser:
        say(browser, "hello")
        current = browser.get("/conversations").json()["current"]
        renamed = browser.post(f"/conversations/{current}", json={"title": "  Greetings  "})
        assert renamed.status_code == 200 and renamed.json()["title"] == "Greetings"
        bad = browser.post(f"/conversations/{current}", json={"title": ""})
        assert bad.status_code == 422 and bad.json()["field"] == "title"
        assert browser.delete(f"/conversations/{current}").json() == {"deleted": True, "id": current}
        assert browser.get(f"/conversations/{current}").status_code == 404
        assert browser.get("/conversations").json() == {"conversations": [], "current": None}
        say(browser, "a fresh start")
        (fresh,) = browser.get("/conversations").json()["conversations"]
        assert fresh["id"] != current and messages(browser, fresh["id"])[0] == "a fresh start"
        blank = browser.post("/conversations", json={"title": "   "})
        assert blank.status_code == 422 and blank.json()["field"] == "title"
        named = browser.post("/conversations", json={"title": "  two   words "})
        assert named.status_code == 201 and named.json()["title"] == "two words"
        missing = browser.delete("/conversations/conv_nope")
        assert missing.status_code == 404 and missing.json()["field"] == "conversation_id"


def test_another_session_cannot_see_open_or_continue_a_conversation(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as ann, httpx.Client(base_url=url, timeout=30) as ben:
        say(ann, "ann's secret")
        conversation = ann.get("/conversations").json()["current"]
        say(ben, "ben here")
        assert ben.get(f"/conversations/{conversation}").status_code == 404
        assert ben.post(f"/conversations/{conversation}/open").status_code == 404
        assert ben.post(f"/conversations/{conversation}", json={"title": "mine"}).status_code == 404
        assert ben.delete(f"/conversations/{conversation}").status_code == 404
        stolen = ben.post("/chat_stream", json={"user_input": "x", "conversation_id": conversation})
        assert stolen.status_code == 404 and stolen.json()["error"] == "unknown_conversation"
        assert [c["id"] for c in ben.get("/conversations").json()["conversations"]] != [conversation]
        assert messages(ann, conversation) == ["ann's secret", "ann's secret"]


def test_conversations_survive_a_restart_with_sqlite(tmp_path: Path) -> None:
    settings = {"session_store": "sqlite", "plugin_config": {"sqlite": {"path": str(tmp_path / "c.db")}}}
    with run_live_server(app(**settings)) as base, httpx.Client(base_url=base, timeout=30) as browser:
        say(browser, "kept across restarts")
        browser.post("/conversations", json={"title": "second"})
        cookies = browser.cookies
    with (
        run_live_server(app(**settings)) as base,
        httpx.Client(base_url=base, timeout=30, cookies=cookies) as back,
    ):
        listed = back.get("/conversations").json()
        assert [c["title"] for c in listed["conversations"]] == ["second", "kept across restarts"]
        first = listed["conversations"][1]["id"]
        assert messages(back, first)[0] == "kept across restarts"
