"""One turn, every transport: each way a request can end, through every transport, leaves the
slot free, the session free, the history right and exactly one report with the right reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chatstream import ChatStream
from chatstream.app import create_app
from chatstream.hookspecs import hookimpl
from chatstream.plugins.engines.mock import MockEngine, split_mock_tokens
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins, run_live_server
from chatstream.types import FinishReason, GenerationRequest, TextDelta

SECRET = "lifecycle-secret-lifecycle-secret-lifecycle"
TRANSPORTS = ["chat_stream", "v1_stream", "v1_whole", "v1_completions"]
SCENARIOS = {
    # scenario: (reason reported, what the stored history ends with for /chat_stream)
    "answer": ("success", "answer"),
    "refusal": ("invalid_request", "pending"),
    "engine_error": ("unknown_error_occurred", "pending"),
    "disconnect_before": ("client_disconnected_before_streaming", "none"),
    "disconnect_during": ("client_disconnected_while_streaming", "partial"),
    "shutdown": ("server_shutdown", "partial"),
}


class Scripted(MockEngine):
    """Echoes the last user message; its first word says how to behave: ``refuse`` (at the first
    event), ``fail`` (after two tokens), ``slow`` (an endless answer), else answer at once."""

    def __init__(self) -> None:
        super().__init__({"type": "echo"})

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        text = self.answer_for(request)
        mode = text.split()[0]
        if mode == "refuse":
            raise ValueError("this engine cannot serve that request: send another")
        count = 0
        while True:
            for piece in split_mock_tokens(text):
                count += 1
                if mode == "fail" and count == 3:
                    raise RuntimeError("the accelerator fell over")
                await asyncio.sleep(0.02 if mode in ("slow", "fail") else 0)
                yield TextDelta(piece, count)
            if mode != "slow":
                yield TextDelta("", count, FinishReason.STOP)
                return


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @hookimpl
    def on_request_finished(self, reason: str, info: dict[str, Any]) -> None:
        self.calls.append((reason, info["transport"]))


def request_for(transport: str, text: str) -> tuple[str, dict[str, Any]]:
    if transport == "chat_stream":
        return "/chat_stream?format=delta", {"user_input": text}
    if transport == "v1_completions":
        return "/v1/completions", {"prompt": text}
    body = {"messages": [{"role": "user", "content": text}], "stream": transport == "v1_stream"}
    return "/v1/chat/completions", body


async def read_all(response: httpx.Response) -> str:
    return "".join([chunk async for chunk in response.aiter_text()])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_ending_through_every_transport(transport: str, scenario: str) -> None:
    reports = Reports()
    cs = ChatStream(
        settings=load_settings(
            transports=["fastapi", "openai"],
            session_secret=SECRET,
            roles={"default": ["*"]},
            num_of_concurrent_executions=1,
            max_queue_size=2,
        ),
        plugins=isolated_plugins(reports),
        use_mock_response=True,
        engine=Scripted(),
    )
    app = create_app(chatstream=cs)
    words = {
        "answer": "hello there friend",
        "refusal": "refuse this",
        "engine_error": "fail one two three four",
        "disconnect_before": "hello queued",
        "disconnect_during": "slow talk",
        "shutdown": "slow talk",
    }
    path, body = request_for(transport, words[scenario])
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            if scenario == "answer":
                async with client.stream("POST", path, json=body) as response:
                    assert response.status_code == 200
                    text = await read_all(response)
                assert "hello there friend" in text.replace('"', " ") or "hello" in text
            elif scenario == "refusal":
                response = await client.post(path, json=body)
                assert response.status_code == 400, response.text
                assert "cannot serve that request" in response.text
            elif scenario == "engine_error":
                with contextlib.suppress(httpx.RemoteProtocolError):
                    async with client.stream("POST", path, json=body) as response:
                        text = await read_all(response)
                        if transport == "v1_stream":
                            assert '"engine_error"' in text and "[DONE]" not in text
                        elif transport != "chat_stream":
                            assert response.status_code == 500 and "engine_error" in text
            elif scenario == "disconnect_before":
                blocker_path, blocker_body = request_for("chat_stream", "slow blocker")
                async with httpx.AsyncClient(base_url=url, timeout=20) as other:
                    async with other.stream("POST", blocker_path, json=blocker_body) as blocker:
                        held = blocker.aiter_bytes()  # kept: a dropped iterator closes the stream
                        await held.__anext__()
                        with pytest.raises(httpx.ReadTimeout):
                            await client.post(path, json=body, timeout=0.5)
                        await wait_for(lambda: cs.load.waiting == 0)
            elif scenario == "disconnect_during":
                if transport in ("v1_whole", "v1_completions"):
                    with pytest.raises(httpx.ReadTimeout):
                        await client.post(path, json=body, timeout=0.3)
                else:
                    async with client.stream("POST", path, json=body) as response:
                        chunks = response.aiter_bytes()
                        await chunks.__anext__()
                        await chunks.__anext__()
            elif scenario == "shutdown":
                if transport in ("v1_whole", "v1_completions"):
                    sent = asyncio.create_task(client.post(path, json=body))
                    await wait_for(lambda: cs.load.processing == 1)
                    await asyncio.sleep(0.1)
                    assert await cs.drain(0.1) is False
                    response = await sent
                    assert (
                        response.status_code == 503 and response.json()["error"]["code"] == "server_shutdown"
                    )
                else:
                    async with client.stream("POST", path, json=body) as response:
                        chunks = response.aiter_bytes()
                        await chunks.__anext__()
                        drained = asyncio.create_task(cs.drain(0.1))
                        rest = b""
                        with contextlib.suppress(httpx.RemoteProtocolError):
                            async for chunk in chunks:
                                rest += chunk
                        assert await drained is False
                        if transport == "v1_stream":
                            events = [
                                line for line in rest.decode().splitlines() if line.startswith("data: ")
                            ]
                            assert events[-1] == "data: [DONE]"
                            assert json.loads(events[-2][6:])["error"]["code"] == "server_shutdown"
            await wait_for(lambda: not cs.load.processing and not cs.load.waiting and not cs._active_sessions)
            stored = None
            if transport == "chat_stream" and scenario != "shutdown":
                prompt = await client.get("/get_prompt")
                stored = [m["message"] for m in prompt.json()["messages"]]
    reason, history = SCENARIOS[scenario]
    ours = [r for r, t in reports.calls if t == ("chat_stream" if transport == "chat_stream" else "openai")]
    if scenario == "disconnect_before":
        ours = ours[:1] if transport != "chat_stream" else [r for r in ours if r != "server_shutdown"][:1]
    assert ours == [reason], reports.calls
    if stored is not None:
        question = words[scenario]
        expected = {
            "answer": [question, question],
            "pending": [question, None],
            "partial": None,
            "none": None,
        }[history]
        if expected is not None:
            assert stored == expected, stored
        elif history == "partial":
            assert stored[0] == question and stored[1] and question.startswith(stored[1].strip()[:4])


async def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_the_console_turn_answers_and_recovers_from_an_engine_error() -> None:
    reports = Reports()
    cs = ChatStream(
        settings=load_settings(num_of_concurrent_executions=1),
        plugins=isolated_plugins(reports),
        use_mock_response=True,
        engine=Scripted(),
    )
    answers = [text async for text in cs.handle_console_input("hello console")]
    assert answers[-1] == "hello console"
    with pytest.raises(Exception, match="accelerator fell over"):
        async for _ in cs.handle_console_input("fail now one two three"):
            pass
    assert [text async for text in cs.handle_console_input("hello again")][-1] == "hello again"
    contents = [c.message for c in cs._console_prompt.get_contents()]
    # The failed turn kept its question without a half answer; the next message replaced it.
    assert contents == ["hello console", "hello console", "hello again", "hello again"]
    assert [r for r, _ in reports.calls] == ["success", "unknown_error_occurred", "success"]
    assert cs.load.processing == 0
