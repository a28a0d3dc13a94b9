"""The ``upstream`` engine, for real: a front chatstream streams its answers from a chatstream on the
generator mock over HTTP, in both modes, with sessions, cancellation, retries and upstream errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import chatstream.plugins.engines.upstream as upstream_plugin
from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.plugin_manager import BUILTIN_PLUGINS, LoadedPlugins
from chatstream.plugins.engines.upstream import UpstreamEngine, request_body
from chatstream.settings import load_settings
from chatstream.testing import free_port, isolated_plugins, run_live_server
from chatstream.types import GenerationParams, GenerationRequest

SECRET = "upstream-test-secret-upstream-test-secret"
ADMIN_KEY = "upstream-admin-key"
ADMIN = {"X-API-Key": ADMIN_KEY}


def plugins(*extra: Any) -> LoadedPlugins:
    """Built-ins plus the upstream engine (registered here until it is a built-in)."""
    if "chatstream.plugins.engines.upstream" in BUILTIN_PLUGINS:
        return isolated_plugins(*extra)
    return isolated_plugins(upstream_plugin, *extra)


class FinishedRecorder:
    """Remembers how each request on the server it is plugged into ended."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def on_request_finished(
        self, chatstream: Any, request_id: str, reason: str, info: dict[str, Any]
    ) -> None:
        self.finished.append((reason, info))


def upstream_server(recorder: FinishedRecorder | None = None, **mock: Any) -> tuple[ChatStream, Any]:
    """A chatstream on the generator mock (echo unless told otherwise) and its app."""
    params = {"type": "echo", "time_per_token_sec": 0.005, **mock}
    extra = [recorder] if recorder is not None else []
    cs = ChatStream(use_mock_response=True, mock_params=params, plugins=isolated_plugins(*extra))
    return cs, create_app(chatstream=cs)


def front_server(base_url: str, mode: str = "chat", **options: Any) -> tuple[ChatStream, Any]:
    """A chatstream whose engine is ``upstream`` pointing at ``base_url``."""
    settings = load_settings(
        engine="upstream",
        prompt_format="chatml",
        session_secret=SECRET,
        api_keys=[{"role": "admin", "key": ADMIN_KEY}],
        plugin_config={"upstream": {"base_url": base_url, "mode": mode, **options}},
    )
    cs = ChatStream(settings=settings, plugins=plugins())
    return cs, create_app(chatstream=cs)


async def say(client: httpx.AsyncClient, text: str) -> httpx.Response:
    return await client.post("/chat_stream?format=delta", json={"user_input": text})


@pytest.mark.parametrize("mode", ["chat", "completions"])
async def test_answers_stream_through_and_the_front_keeps_the_conversation(mode: str) -> None:
    upstream_cs, upstream_app = upstream_server()
    sent: list[GenerationRequest] = []
    real_generate = upstream_cs.engine.generate

    def spy(request: GenerationRequest) -> Any:
        sent.append(request)
        return real_generate(request)

    upstream_cs.engine.generate = spy
    with run_live_server(upstream_app) as upstream_url:
        _, front_app = front_server(upstream_url, mode)
        with run_live_server(front_app) as front_url:
            async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
                first = await say(client, "the first question")
                second = await say(client, "and the second one")
                prompt = (await client.get("/get_prompt", headers=ADMIN)).json()
    assert first.status_code == 200 and second.status_code == 200
    if mode == "chat":
        # The upstream's echo repeats the last user message it was sent.
        assert first.text == "the first question"
        assert second.text == "and the second one"
    else:
        # The upstream gets the whole prompt the front rendered: our ChatML format, all turns so
        # far, with the format's stop string (so its echo stops at the first <|im_end|>).
        prompt_sent = sent[-1].prompt
        assert "<|im_start|>user\nthe first question<|im_end|>" in prompt_sent
        assert prompt_sent.endswith("<|im_start|>user\nand the second one<|im_end|>\n<|im_start|>assistant\n")
        assert "<|im_end|>" in sent[-1].stop
        assert prompt_sent.startswith(second.text) and "<|im_end|>" not in second.text
    messages = [m["message"] for m in prompt["messages"]]
    assert messages == ["the first question", first.text, "and the second one", second.text]


async def test_the_front_openai_api_streams_from_the_upstream() -> None:
    _, upstream_app = upstream_server()
    with run_live_server(upstream_app) as upstream_url:
        _, front_app = front_server(upstream_url, "chat")
        with run_live_server(front_app) as front_url:
            async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
                body = {"messages": [{"role": "user", "content": "stream me please"}], "stream": True}
                async with client.stream(
                    "POST", "/v1/chat/completions", json=body, headers=ADMIN
                ) as response:
                    lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "stream me please"
    assert len(chunks) > 3  # token by token, not one blob
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_client_leaving_the_front_stops_the_upstream_within_a_token() -> None:
    recorder = FinishedRecorder()
    token_s = 0.1
    upstream_cs, upstream_app = upstream_server(recorder, type="long", time_per_token_sec=token_s)
    with run_live_server(upstream_app) as upstream_url:
        _, front_app = front_server(upstream_url, "completions")
        with run_live_server(front_app) as front_url:
            async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
                async with client.stream(
                    "POST", "/chat_stream?format=delta", json={"user_input": "tell me everything"}
                ) as response:
                    async for _ in response.aiter_bytes():
                        break
                    # The front's first bytes can come before the upstream counts its request.
                    deadline = time.monotonic() + 5
                    while not upstream_cs.load.processing and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    assert upstream_cs.load.processing == 1
                left_at = time.monotonic()
            while upstream_cs.load.processing and time.monotonic() - left_at < 5:
                await asyncio.sleep(0.01)
            stopped_after = time.monotonic() - left_at
            await asyncio.sleep(0.05)
    # One token to notice on each hop, plus scheduling slack on a busy machine.
    assert stopped_after < 4 * token_s, f"the upstream kept generating for {stopped_after:.2f} s"
    assert [reason for reason, _ in recorder.finished] == ["client_disconnected_while_streaming"]
    assert recorder.finished[0][1]["tokens"] < 20  # the long answer is hundreds of tokens


@contextlib.contextmanager
def serve_later(app: Any, port: int, delay_s: float) -> Iterator[None]:
    """Serve ``app`` on ``port`` from ``delay_s`` seconds from now (an upstream still booting)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def run() -> None:
        time.sleep(delay_s)
        server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def test_connection_failures_before_the_first_token_are_retried() -> None:
    port = free_port()
    _, upstream_app = upstream_server()
    _, front_app = front_server(f"http://127.0.0.1:{port}", "chat", max_retries=6)
    # The front is up before the upstream's delay starts, so the first attempt meets a closed port.
    with run_live_server(front_app) as front_url, serve_later(upstream_app, port, delay_s=0.3):
        async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
            started = time.monotonic()
            answer = await say(client, "are you up yet")
            waited = time.monotonic() - started
    assert answer.status_code == 200 and answer.text == "are you up yet"
    assert waited >= 0.25  # it really waited for the upstream to come up


async def test_an_unreachable_upstream_is_a_clear_502() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    _, front_app = front_server(url, "completions", max_retries=1)
    with run_live_server(front_app) as front_url:
        async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
            chat = await say(client, "hello")
            openai = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, headers=ADMIN
            )
    assert chat.status_code == 502
    assert chat.json()["error"] == "upstream_unreachable"
    assert f"{url}/v1/completions" in chat.json()["message"] and "base_url" in chat.json()["message"]
    assert openai.status_code == 502 and openai.json()["error"]["code"] == "upstream_unreachable"


def failing_upstream() -> Any:
    """An upstream that answers 429 (OpenAI's error body) to chat and 500 (plain text) to completions."""

    async def rate_limited(request: Request) -> JSONResponse:
        error = {
            "message": "slow down, too many requests",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }
        return JSONResponse({"error": error}, status_code=429)

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("Internal Server Error", status_code=500)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", rate_limited, methods=["POST"]),
            Route("/v1/completions", broken, methods=["POST"]),
        ]
    )


@pytest.mark.parametrize(
    ("mode", "status", "code", "says"),
    [
        ("chat", 429, "rate_limit_exceeded", "slow down"),
        ("completions", 502, "upstream_error", "answered 500: Internal Server Error"),
    ],
)
async def test_upstream_http_errors_reach_the_client_clearly(
    mode: str, status: int, code: str, says: str
) -> None:
    with run_live_server(failing_upstream()) as upstream_url:
        _, front_app = front_server(upstream_url, mode, model="m")
        with run_live_server(front_app) as front_url:
            async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
                answer = await say(client, "hello")
    assert answer.status_code == status
    assert answer.json()["error"] == code
    assert says in answer.json()["message"] and upstream_url in answer.json()["message"]


async def test_a_multiplicative_frequency_penalty_is_refused_with_400() -> None:
    _, upstream_app = upstream_server()
    with run_live_server(upstream_app) as upstream_url:
        _, front_app = front_server(upstream_url, "chat")
        with run_live_server(front_app) as front_url:
            async with httpx.AsyncClient(base_url=front_url, timeout=30) as client:
                params = {"frequency_penalty": 1.2, "frequency_penalty_method": "multiplicative"}
                answer = await client.post(
                    "/chat_stream", json={"user_input": "hi", "generation_params": params}
                )
    assert answer.status_code == 400
    assert "frequency_penalty_method='multiplicative'" in answer.json()["message"]


def test_parameters_map_to_the_openai_and_vllm_fields() -> None:
    params = GenerationParams(
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        seed=3,
    )
    request = GenerationRequest(
        prompt="P", params=params, stop=["<|im_end|>"], messages=[{"role": "user", "content": "u"}]
    )
    completions = request_body(request, "completions", "m")
    assert completions == {
        "stream": True,
        "model": "m",
        "prompt": "P",
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["<|im_end|>"],
        "seed": 3,
        "presence_penalty": 0.3,
        "repetition_penalty": 1.1,
        "top_k": 40,
        "min_p": 0.05,
    }
    chat = request_body(
        GenerationRequest(
            prompt="P", params=GenerationParams(top_k=0), messages=[{"role": "user", "content": "u"}]
        ),
        "chat",
        None,
    )
    assert chat["messages"] == [{"role": "user", "content": "u"}] and "prompt" not in chat
    assert "top_k" not in chat and "min_p" not in chat and "model" not in chat
    subtractive = GenerationParams(repetition_penalty=0.5, repetition_penalty_method="subtractive")
    with pytest.raises(ValueError, match="repetition_penalty_method='subtractive'"):
        request_body(GenerationRequest(prompt="P", params=subtractive), "completions", None)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, "'plugin_config.upstream.base_url': Field required"),
        ({"base_url": "vllm:8000"}, "'plugin_config.upstream.base_url': Value error, use http://host:port"),
        ({"base_url": "http://x", "mode": "text"}, "'plugin_config.upstream.mode': Input should be"),
        ({"base_url": "http://x", "retries": 2}, "'plugin_config.upstream.retries': unknown option"),
        ({"base_url": "http://x", "max_retries": "many"}, "'plugin_config.upstream.max_retries': "),
        ({"base_url": "http://x", "timeout_s": -1}, "'plugin_config.upstream.timeout_s': "),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        ChatStream(
            settings=load_settings(engine="upstream", plugin_config={"upstream": options}), plugins=plugins()
        )
    assert says in str(error.value)
    given = {k: v for k, v in options.items() if k != "base_url" or v != "http://x"}
    for value in given.values():  # the value given is shown
        assert f"(got {value!r})" in str(error.value)


def test_base_url_gets_v1_once() -> None:
    assert UpstreamEngine({"base_url": "http://h:1/"}).url == "http://h:1/v1/completions"
    assert (
        UpstreamEngine({"base_url": "http://h:1/v1", "mode": "chat"}).url == "http://h:1/v1/chat/completions"
    )


async def test_v1_completions_continues_a_raw_prompt(chatstream_client: Any) -> None:
    _, app = upstream_server()
    async with chatstream_client(app) as client:
        whole = await client.post("/v1/completions", json={"prompt": "continue this text", "max_tokens": 2})
        streamed = await client.post("/v1/completions", json={"prompt": ["continue this"], "stream": True})
        refused = await client.post("/v1/completions", json={"prompt": "x", "echo": True})
    body = whole.json()
    assert whole.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "continue this" and body["choices"][0]["finish_reason"] == "length"
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == "continue this"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"
