"""ChatStream over real HTTP with the generator mock: streaming, load control, disconnects, callbacks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from chatstream import AbstractChatPrompt, ChatStream
from chatstream.app import create_app


class PlainPrompt(AbstractChatPrompt):
    """A format written the documented way: role names in __init__, create_prompt overridden."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("USER")
        self.set_responder("BOT")

    def create_prompt(self) -> str:
        lines = [
            f"{c.role}: {c.message}" if c.message is not None else f"{c.role}:" for c in self.get_contents()
        ]
        return "\n".join(lines)


def make_app(mock_chatstream: Any, **options: Any) -> tuple[FastAPI, ChatStream]:
    options.setdefault("chat_prompt_clazz", PlainPrompt)
    cs = mock_chatstream(**options)
    return create_app(chatstream=cs), cs


async def read_all(client: httpx.AsyncClient, text: str) -> tuple[int, str]:
    """POST over real HTTP; the answer is the last chunk (each chunk is the whole text so far)."""
    async with client.stream("POST", "/chat_stream", json={"user_input": text}) as response:
        last = b""
        async for chunk in response.aiter_raw():
            last = chunk
        return response.status_code, last.decode()


async def test_answer_streams_as_cumulative_chunks(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(mock_chatstream, mock_params={"type": "echo", "time_per_token_sec": 0.01})
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            chunks = []
            async with client.stream(
                "POST", "/chat_stream", json={"user_input": "one two three 日本語"}
            ) as r:
                assert r.status_code == 200
                assert r.headers["x-message-id"]
                async for chunk in r.aiter_text():
                    chunks.append(chunk)
    assert len(chunks) > 3
    assert chunks[-1] == "one two three 日本語"
    # every chunk is the whole answer so far
    assert all(chunks[-1].startswith(c) for c in chunks)
    assert [len(c) for c in chunks] == sorted(len(c) for c in chunks)


async def test_queue_refuses_the_overflow_and_serves_waiters_in_order(
    mock_chatstream: Any, live_server: Any
) -> None:
    app, cs = make_app(
        mock_chatstream,
        num_of_concurrent_executions=2,
        max_queue_size=2,
        too_many_request_as_http_error=True,
        mock_params={"type": "echo", "time_per_token_sec": 0.05},
    )
    finished_order: list[str] = []
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def ask(name: str) -> tuple[int, str]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as own_client:  # one user each
                    status, text = await read_all(own_client, f"{name} " + "word " * 30)
                finished_order.append(name)
                return status, text

            tasks = []
            for name, expected in (("r1", (1, 0)), ("r2", (2, 0)), ("r3", (2, 1)), ("r4", (2, 2))):
                tasks.append(asyncio.create_task(ask(name)))
                deadline = time.monotonic() + 5
                while (cs.load.processing, cs.load.waiting) != expected:
                    assert time.monotonic() < deadline, "request did not reach the queue"
                    await asyncio.sleep(0.005)
            assert cs.load.processing == 2 and cs.load.waiting == 2
            refused = await client.post("/chat_stream", json={"user_input": "r5"})
            assert refused.status_code == 429
            assert refused.json() == {"error": "too_many_requests"}
            assert int(refused.headers["retry-after"]) >= 1
            results = await asyncio.gather(*tasks)
    assert [status for status, _ in results] == [200, 200, 200, 200]
    assert [text for _, text in results] == [f"r{n} " + "word " * 30 for n in range(1, 5)]
    assert finished_order.index("r3") < finished_order.index("r4")
    assert cs.load.processing == 0 and cs.load.waiting == 0


async def test_refusal_in_band_when_http_error_is_off(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(
        mock_chatstream,
        num_of_concurrent_executions=1,
        max_queue_size=0,
        mock_params={"type": "long", "time_per_token_sec": 0.02},
    )
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/chat_stream", json={"user_input": "hold the slot"}) as first:
                chunks = first.aiter_text()  # keep a reference: a collected iterator closes the response
                await chunks.__anext__()
                async with httpx.AsyncClient(base_url=url) as other_user:
                    refused = await other_user.post("/chat_stream", json={"user_input": "second"})
    assert refused.status_code == 200
    assert refused.json() == {"error": "too_many_requests"}


async def test_client_dropped_mid_stream_frees_its_slot(mock_chatstream: Any, live_server: Any) -> None:
    reasons: list[str] = []
    cs = mock_chatstream(
        chat_prompt_clazz=PlainPrompt,
        num_of_concurrent_executions=1,
        max_queue_size=0,
        too_many_request_as_http_error=True,
        mock_params={"type": "long", "time_per_token_sec": 0.05},
    )
    app = FastAPI()

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        return await cs.handle_chat_stream_request(request, callback=lambda req, msg: reasons.append(msg))

    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("POST", "/chat_stream", json={"user_input": "long please"}) as r:
                chunks = r.aiter_text()
                first = await chunks.__anext__()
                assert first
                assert cs.load.processing == 1
            # the connection is closed: within about one token the slot is free again
            deadline = time.monotonic() + 2
            while cs.load.processing:
                assert time.monotonic() < deadline, "the slot was not freed after the client left"
                await asyncio.sleep(0.01)
            status, _ = await read_all(client, "next")
            assert status == 200
    assert reasons[0] == "client_disconnected_while_streaming"
    assert reasons[-1] == "success"


async def test_client_leaving_while_queued_leaves_the_queue(mock_chatstream: Any, live_server: Any) -> None:
    reasons: list[str] = []
    app, cs = make_app(
        mock_chatstream,
        num_of_concurrent_executions=1,
        max_queue_size=1,
        mock_params={"type": "long", "time_per_token_sec": 0.05},
    )
    from chatstream.hookspecs import hookimpl

    class Recorder:
        @hookimpl
        def on_request_finished(self, reason: str) -> None:
            reasons.append(reason)

    cs.pm.register(Recorder(), name="recorder")
    with live_server(app) as url:
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            httpx.AsyncClient(base_url=url) as other,
        ):
            async with client.stream("POST", "/chat_stream", json={"user_input": "hold"}) as r:
                chunks = r.aiter_text()
                await chunks.__anext__()
                waiting = asyncio.create_task(other.post("/chat_stream", json={"user_input": "waiting"}))
                deadline = time.monotonic() + 5
                while cs.load.waiting == 0:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                deadline = time.monotonic() + 2
                while cs.load.waiting:
                    assert time.monotonic() < deadline, "the departed client stayed in the queue"
                    await asyncio.sleep(0.01)
    assert "client_disconnected_before_streaming" in reasons


async def test_bad_bodies_get_4xx_naming_the_field(mock_chatstream: Any, chatstream_client: Any) -> None:
    app, _ = make_app(mock_chatstream)
    async with chatstream_client(app) as client:
        wrong_type = await client.post("/chat_stream", json={"user_input": 12})
        not_json = await client.post("/chat_stream", content=b"{oops")
        empty = await client.post("/chat_stream", json={"user_input": "   "})
        too_long = await client.post("/chat_stream", json={"user_input": "x" * 20_000})
        regenerate_first = await client.post("/chat_stream", json={"regenerate": True})
    assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "user_input"
    assert not_json.status_code == 400 and "user_input" in not_json.json()["message"]
    assert empty.status_code == 422 and empty.json()["field"] == "user_input"
    assert too_long.status_code == 413 and "max_input_chars" in too_long.json()["message"]
    assert regenerate_first.status_code == 409


async def test_history_is_kept_per_cookie_session(mock_chatstream: Any, live_server: Any) -> None:
    app, cs = make_app(mock_chatstream, mock_params={"type": "echo", "time_per_token_sec": 0.001})
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as alice, httpx.AsyncClient(base_url=url) as bob:
            assert await read_all(alice, "I am Alice") == (200, "I am Alice")
            assert await read_all(bob, "I am Bob") == (200, "I am Bob")
            await read_all(alice, "again")
            cookie = alice.cookies.get("chatstream_session")
            assert cookie != bob.cookies.get("chatstream_session")
    assert cookie is not None
    session_id = cookie.split(".")[0]
    record = await cs.session_store.load(session_id)
    assert record is not None
    messages = [c["message"] for c in record["prompt"]["contents"]]
    assert messages == ["I am Alice", "I am Alice", "again", "again"]


async def test_tampered_cookie_starts_a_new_session(mock_chatstream: Any, chatstream_client: Any) -> None:
    app, cs = make_app(mock_chatstream, mock_params={"type": "echo"})
    async with chatstream_client(app) as client:
        first = await client.post("/chat_stream", json={"user_input": "secret history"})
        session_id = first.cookies["chatstream_session"].split(".")[0]
        client.cookies.clear()
        forged = await client.post(
            "/chat_stream",
            json={"user_input": "hi"},
            headers={"cookie": f"chatstream_session={session_id}.forged"},
        )
        new_id = forged.cookies["chatstream_session"].split(".")[0]
    assert new_id != session_id
    record = await cs.session_store.load(new_id)
    assert record is not None
    assert [c["message"] for c in record["prompt"]["contents"]] == ["hi", "hi"]


async def test_handle_console_input_keeps_history(mock_chatstream: Any) -> None:
    cs = mock_chatstream(chat_prompt_clazz=PlainPrompt, mock_params={"type": "echo"})
    outputs = [text async for text in cs.handle_console_input("first question")]
    assert outputs[-1] == "first question"
    assert outputs == sorted(outputs, key=len)
    async for _ in cs.handle_console_input("second"):
        pass
    prompt = cs._console_prompt
    assert prompt is not None and prompt.get_turn() == 2
    assert prompt.create_prompt().endswith("USER: second\nBOT: second")
    await cs.close()


async def test_client_gone_before_the_body_starts_still_frees_the_slot(mock_chatstream: Any) -> None:
    from starlette.requests import Request as StarletteRequest

    reasons: list[str] = []
    cs = mock_chatstream(
        chat_prompt_clazz=PlainPrompt, mock_params={"type": "long", "time_per_token_sec": 0.01}
    )
    body = b'{"user_input": "hello"}'
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "method": "POST",
        "path": "/chat_stream",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}  # the client is already gone

    response = await cs.handle_chat_stream_request(
        StarletteRequest(scope, receive), callback=lambda req, msg: reasons.append(msg)
    )
    assert cs.load.processing == 1

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)  # the disconnect wins before the first body chunk

    await response(scope, receive, send)
    assert cs.load.processing == 0
    assert reasons == ["client_disconnected_before_streaming"]
    await cs.close()
