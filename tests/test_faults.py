"""Faults: an engine failing mid-answer, clients vanishing at random points, a client that never
reads, Redis killed and restarted. Each must end in a clear signal to the client, a freed slot
and a consistent stored conversation.

Covered elsewhere (not repeated here): a client leaving mid-stream, while queued or before the
body starts (tests/test_chat_stream_http.py), leaving an OpenAI stream or whole answer
(tests/test_openai_api.py), an engine reporting an error on the OpenAI endpoint
(test_engine_failure_is_a_server_error_not_a_hang), an unreachable store at start (a 503,
tests/test_http_api.py), the Redis store reconnecting (tests/test_session_stores.py), SIGTERM
during a stream (tests/test_ops.py::test_sigterm_lets_streams_finish_refuses_new_requests_and_exits_0).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_server import REDIS_SERVER, SKIP_REASON, RedisServer

from chatstream import ChatStream
from chatstream.app import create_app
from chatstream.hookspecs import hookimpl
from chatstream.plugins.engines.mock import MockEngine
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins, run_live_server
from chatstream.types import FinishReason, GenerationRequest, TextDelta

SECRET = "faults-secret-faults-secret-faults-secret"
TIMEOUT = httpx.Timeout(15.0)


class FailingEcho(MockEngine):
    """The echo mock; a message holding "boom" fails after ``after`` tokens, by raising or by
    reporting ``FinishReason.ERROR`` (the two ways an engine can fail)."""

    def __init__(self, after: int = 3, how: str = "raise") -> None:
        super().__init__({"type": "echo", "time_per_token_sec": 0.01})
        self.after = after
        self.how = how

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        failing = "boom" in self.answer_for(request)
        count = 0
        async for delta in super().generate(request):
            if failing and count == self.after:
                if self.how == "raise":
                    raise RuntimeError("the accelerator fell over")
                yield TextDelta("", count, FinishReason.ERROR)
                return
            count += 1
            yield delta


class Finished:
    """Records the ``on_request_finished`` reasons."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    @hookimpl
    def on_request_finished(self, reason: str, info: dict[str, Any]) -> None:
        self.reasons.append(reason)


def fault_app(
    engine: Any = None, finished: Finished | None = None, **settings: Any
) -> tuple[Any, ChatStream]:
    """An app with the chat and OpenAI transports, cookie sessions, on ``engine`` (default: echo)."""
    settings.setdefault("transports", ["fastapi", "openai"])
    settings.setdefault("session_secret", SECRET)
    settings.setdefault("roles", {"default": ["*"]})
    cs = ChatStream(
        settings=load_settings(**settings),
        plugins=isolated_plugins(*([finished] if finished else [])),
        use_mock_response=True,
        mock_params={"type": "echo"},
        engine=engine,
    )
    return create_app(chatstream=cs), cs


async def wait_idle(cs: ChatStream, timeout_s: float = 3.0) -> None:
    """Wait until no slot, queue place or session is held."""
    deadline = time.monotonic() + timeout_s
    while cs.load.processing or cs.load.waiting or cs._active_sessions:
        assert time.monotonic() < deadline, f"still held: {cs.get_load()}, sessions {cs._active_sessions}"
        await asyncio.sleep(0.01)


async def history(client: httpx.AsyncClient) -> list[Any]:
    response = await client.get("/get_prompt")
    assert response.status_code == 200, response.text
    return [m["message"] for m in response.json()["messages"]]


async def ask(client: httpx.AsyncClient, text: str = "", **body: Any) -> tuple[int, str]:
    async with client.stream("POST", "/chat_stream?format=delta", json={"user_input": text, **body}) as r:
        return r.status_code, "".join([chunk async for chunk in r.aiter_text()])


# -- the engine fails mid-answer -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["raise", "error_reason"])
@pytest.mark.parametrize("stream_format", ["delta", "cumulative"])
async def test_engine_failing_mid_answer_breaks_the_stream_and_keeps_the_question(
    how: str, stream_format: str
) -> None:
    finished = Finished()
    app, cs = fault_app(FailingEcho(after=3, how=how), finished)
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            assert await ask(client, "all is well") == (200, "all is well")
            received = []
            # The client is told: the response ends without its last chunk, an HTTP error.
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream(
                    "POST",
                    f"/chat_stream?format={stream_format}",
                    json={"user_input": "boom one two three four"},
                ) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_text():
                        received.append(chunk)
            assert "".join(received).startswith("boom") or received[-1].startswith("boom")
            await wait_idle(cs)
            # The question is kept without a half answer: regenerate can ask again ...
            assert await history(client) == ["all is well", "all is well", "boom one two three four", None]
            # ... and a new message replaces the turn that got no answer.
            assert await ask(client, "next one") == (200, "next one")
            assert await history(client) == ["all is well", "all is well", "next one", "next one"]
    assert finished.reasons == ["success", "unknown_error_occurred", "success"]


async def test_engine_failing_mid_answer_on_the_openai_endpoint() -> None:
    finished = Finished()
    app, cs = fault_app(FailingEcho(after=2), finished)
    body = {"model": "m", "messages": [{"role": "user", "content": "boom one two three"}]}
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
            whole = await client.post("/v1/chat/completions", json=body)
            await wait_idle(cs)
            after = await client.post(
                "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "fine"}]}
            )
    # SSE: the text so far, then an error event that OpenAI clients raise, and no [DONE].
    chunks = [json.loads(e) for e in events]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert text == "boom one"
    assert chunks[-1]["error"]["code"] == "engine_error"
    assert "accelerator fell over" in chunks[-1]["error"]["message"]
    assert "[DONE]" not in events
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "engine_error"
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "fine"
    assert finished.reasons == ["unknown_error_occurred", "unknown_error_occurred", "success"]


# -- clients vanishing at random points --------------------------------------------------------------
def raw_request(path: str, body: dict[str, Any], cookie: str = "") -> bytes:
    """One request that asks the server to close the connection after its response, so a reader
    waiting for more bytes than a short (refused) response holds sees the end, not a silent
    keep-alive connection."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{cookie}\r\n"
    )
    return head.encode() + data


def vanish(port: int, request: bytes, cut: str, rng: random.Random) -> None:
    """Send ``request`` and drop the connection at the point ``cut`` names."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if cut == "headers":
            sock.sendall(request[: rng.randrange(1, request.index(b"\r\n\r\n"))])
        elif cut == "body":
            sock.sendall(request[: rng.randrange(request.index(b"\r\n\r\n") + 4, len(request))])
        else:
            sock.sendall(request)
            if cut == "response":
                wanted, got = rng.randrange(1, 400), 0
                while got < wanted:
                    piece = sock.recv(wanted - got)
                    if not piece:
                        break
                    got += len(piece)
        if rng.random() < 0.5:  # half leave politely, half reset the connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


async def test_clients_vanishing_at_random_points_leak_nothing() -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    app, cs = fault_app(
        MockEngine({"type": "long", "time_per_token_sec": 0.002}),
        num_of_concurrent_executions=2,
        max_queue_size=2,
    )
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/chat_stream", {"user_input": "talk to me"}),
        ("/chat_stream?format=delta", {"user_input": "talk to me"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]
    with run_live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        cuts = [
            (rng.choice(requests), rng.choice(["headers", "body", "sent", "response"])) for _ in range(40)
        ]
        try:
            await asyncio.gather(
                *(
                    # each thread its own generator, so the seed replays every client's choices
                    asyncio.to_thread(vanish, port, raw_request(p, b), cut, random.Random(f"{seed}/{i}"))
                    for i, ((p, b), cut) in enumerate(cuts)
                )
            )
            await wait_idle(cs, timeout_s=10)
        except Exception as exc:
            raise AssertionError(f"seed {seed}: {exc!r}") from exc
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            status, text = await ask(client, "still there?")
    assert status == 200 and text.startswith("This is sentence number 1"), f"seed {seed}"


# -- a client that never reads -----------------------------------------------------------------------
class EndlessEngine(MockEngine):
    """An answer that never ends, 1 KiB per token; counts the tokens the server has taken."""

    def __init__(self) -> None:
        super().__init__({"type": "echo"})
        self.produced = 0
        self.closed = threading.Event()  # set from the server's thread

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        try:
            while True:
                self.produced += 1
                await asyncio.sleep(0)
                yield TextDelta("x" * 1023 + " ", self.produced)
        finally:
            self.closed.set()


def start_unread_stream(url: str, path: str) -> socket.socket:
    """Ask ``path`` for a streamed answer on a raw socket with a small receive buffer, which the
    caller then never reads."""
    body = (
        {"user_input": "go"}
        if path == "/chat_stream"
        else {"messages": [{"role": "user", "content": "go"}], "stream": True}
    )
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(raw_request(path, body))
    return sock


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_a_client_that_never_reads_holds_bounded_memory(path: str) -> None:
    engine = EndlessEngine()
    app, cs = fault_app(engine, num_of_concurrent_executions=1)
    with run_live_server(app) as url:
        sock = start_unread_stream(url, path)
        # The client reads nothing. The server stops taking tokens once the socket buffers are
        # full: what it holds for this client is bounded, not the whole (endless) answer.
        samples = [0]
        while len(samples) < 3 or samples[-1] != samples[-3]:  # until it stopped for a second
            await asyncio.sleep(0.5)
            samples.append(engine.produced)
            assert len(samples) < 40, f"the server kept taking tokens: {samples}"
        assert cs.load.processing == 1
        assert samples[-1] > 0, samples
        sock.close()
        await wait_idle(cs)
        assert await asyncio.to_thread(engine.closed.wait, 5), "the engine was not closed"
    # cumulative chunks (/chat_stream's default) carry the whole answer so far, so a few hundred
    # 1 KiB tokens already fill megabytes of socket buffers
    assert samples[-1] < 20_000


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_a_client_that_stops_reading_loses_its_slot_after_the_read_timeout(path: str) -> None:
    engine = EndlessEngine()
    finished = Finished()
    app, cs = fault_app(engine, finished, num_of_concurrent_executions=1, client_read_timeout_s=0.5)
    with run_live_server(app) as url:
        sock = start_unread_stream(url, path)
        try:
            # The connection stays open and unread: only the timeout can free the slot.
            await wait_idle(cs, timeout_s=10)
            assert await asyncio.to_thread(engine.closed.wait, 5), "the engine was not closed"
            async with (
                httpx.AsyncClient(base_url=url, timeout=10) as client,
                client.stream("POST", "/chat_stream", json={"user_input": "next"}) as again,
            ):
                assert again.status_code == 200  # the one slot serves the next client
                async for _ in again.aiter_bytes():
                    break
        finally:
            sock.close()
    assert finished.reasons[0] == "client_disconnected_while_streaming"


# -- Redis goes away and comes back ------------------------------------------------------------------
@pytest.fixture
def redis(tmp_path: Path) -> Any:
    import shutil

    if shutil.which(REDIS_SERVER) is None:
        pytest.skip(SKIP_REASON)
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


async def test_redis_killed_and_restarted_is_a_503_then_the_session_continues(redis: RedisServer) -> None:
    redis_options = {"url": redis.url, "timeout_s": 0.5}
    app, cs = fault_app(
        MockEngine({"type": "echo", "time_per_token_sec": 0.02}),
        session_store="redis",
        plugin_config={"redis": redis_options},
    )
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            assert await ask(client, "one") == (200, "one")
            assert await ask(client, "two") == (200, "two")
            redis.kill()
            while_down = [
                await client.post("/chat_stream", json={"user_input": "three"}),
                await client.get("/get_prompt"),
                await client.post("/clear_context"),
                await client.post("/set_generation_params", json={"temperature": 0.5}),
            ]
            for response in while_down:
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "session_store_unavailable"
                assert "plugin_config.redis.url" in response.json()["message"]
            redis.start()  # the same port; the append-only file brings the data back
            assert await history(client) == ["one", "one", "two", "two"]
            assert await ask(client, "three") == (200, "three")
            assert await history(client) == ["one", "one", "two", "two", "three", "three"]

            # Killed while an answer streams: the client gets the whole answer, the question
            # was saved before it started, the answer cannot be saved (logged).
            async with client.stream(
                "POST", "/chat_stream?format=delta", json={"user_input": "four five six"}
            ) as r:
                pieces = r.aiter_text()
                text = await pieces.__anext__()
                redis.kill()
                text += "".join([piece async for piece in pieces])
            assert text == "four five six"
            await wait_idle(cs)
            redis.start()
            assert await history(client) == [
                "one",
                "one",
                "two",
                "two",
                "three",
                "three",
                "four five six",
                None,
            ]
            # the turn without a saved answer is replaced by the next message, nothing else is lost
            assert await ask(client, "seven") == (200, "seven")
            assert await history(client) == ["one", "one", "two", "two", "three", "three", "seven", "seven"]
