"""Scale-out: two replicas with one ``session_secret`` and one Redis store behind a round-robin
balancer with no sticky sessions; one browser's conversation continues whichever replica answers."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from redis_server import redis_server_or_skip
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins, run_live_server

SECRET = "one-secret-shared-by-every-replica-0123456789"
ADMIN = {"X-API-Key": "replica-admin-key"}
# Hop-by-hop headers a proxy must not forward.
HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}


class TurnCounter:
    """Counts the chat requests one replica answered."""

    def __init__(self) -> None:
        self.answered = 0

    @hookimpl
    def on_request_finished(
        self, chatstream: Any, request_id: str, reason: str, info: dict[str, Any]
    ) -> None:
        if reason == "success":
            self.answered += 1


def replica(redis_url: str, counter: TurnCounter) -> Any:
    """One replica: the generator mock (echo), the shared secret, the shared Redis store."""
    settings = load_settings(
        use_mock_response=True,
        mock_params={"type": "echo", "time_per_token_sec": 0.002},
        prompt_format="chatml",
        session_secret=SECRET,
        session_store="redis",
        plugin_config={"redis": {"url": redis_url}},
        api_keys=[{"role": "admin", "key": ADMIN["X-API-Key"]}],
    )
    return create_app(chatstream=ChatStream(settings=settings, plugins=isolated_plugins(counter)))


def round_robin_proxy(backends: list[str], served_by: list[str]) -> Starlette:
    """A balancer that sends each request to the next backend in turn and streams the answer back."""
    turn = itertools.cycle(backends)
    client = httpx.AsyncClient(timeout=30)

    async def forward(request: Request) -> StreamingResponse:
        backend = next(turn)
        served_by.append(backend)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream = await client.send(
            client.build_request(
                request.method,
                f"{backend}{request.url.path}",
                params=request.query_params,
                headers=headers,
                content=await request.body(),
            ),
            stream=True,
        )

        async def body() -> AsyncIterator[bytes]:
            async for chunk in upstream.aiter_raw():
                yield chunk

        response = StreamingResponse(
            body(), status_code=upstream.status_code, background=BackgroundTask(upstream.aclose)
        )
        # Every header as sent, repeated Set-Cookie headers included (a dict would keep only one).
        response.raw_headers = [
            (k.lower().encode(), v.encode())
            for k, v in upstream.headers.multi_items()
            if k.lower() not in HOP_HEADERS
        ]
        return response

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


async def test_a_conversation_continues_across_replicas_without_sticky_sessions(tmp_path: Path) -> None:
    counters = [TurnCounter(), TurnCounter()]
    served_by: list[str] = []
    with redis_server_or_skip(tmp_path) as redis:
        with (
            run_live_server(replica(redis.url, counters[0])) as first,
            run_live_server(replica(redis.url, counters[1])) as second,
        ):
            with run_live_server(round_robin_proxy([first, second], served_by)) as balancer:
                async with httpx.AsyncClient(base_url=balancer, timeout=30) as browser:
                    answers = []
                    for text in ("my name is Ada", "what is my name?", "thanks"):
                        response = await browser.post("/chat_stream?format=delta", json={"user_input": text})
                        assert response.status_code == 200
                        answers.append(response.text)
                    history = await browser.get("/get_prompt", headers=ADMIN)
    # Turns alternated between the replicas, and each answered its share.
    assert served_by[:3] == [first, second, first]
    assert [c.answered for c in counters] == [2, 1]
    assert answers == ["my name is Ada", "what is my name?", "thanks"]
    # The fourth request (replica two) sees every turn, whichever replica answered it.
    assert history.status_code == 200 and served_by[3] == second
    messages = [m["message"] for m in history.json()["messages"]]
    assert messages == [
        "my name is Ada",
        "my name is Ada",
        "what is my name?",
        "what is my name?",
        "thanks",
        "thanks",
    ]
    assert "<|im_start|>user\nmy name is Ada<|im_end|>" in history.json()["prompt"]
