"""Regressions found by attacking the request path: each test names the defect it keeps fixed.

(Typed special tokens becoming control tokens: tests/test_prompt_segments.py and
tests/test_hostile_input.py::test_chat_stream_keeps_injected_tokens_as_text.)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import openai
import pytest

from chatstream import ChatStream
from chatstream.app import create_app
from chatstream.hookspecs import hookimpl
from chatstream.plugins.engines.mock import MockEngine
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins, run_live_server
from chatstream.types import GenerationRequest, TextDelta

SECRET = "regressions-secret-regressions-secret-xx"
ALL = {"default": ["*"]}


class Finished:
    """Records ``on_request_finished`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def on_request_finished(self, request_id: str, reason: str, info: dict[str, Any]) -> None:
        self.calls.append((reason, {**info, "request_id": request_id}))

    @property
    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.calls]


def mock_app(finished: Finished | None = None, engine: Any = None, **settings: Any) -> tuple[Any, ChatStream]:
    settings.setdefault("transports", ["fastapi", "openai", "ops"])
    settings.setdefault("session_secret", SECRET)
    settings.setdefault("roles", ALL)
    cs = ChatStream(
        settings=load_settings(**settings),
        plugins=isolated_plugins(*([finished] if finished else [])),
        use_mock_response=True,
        mock_params=settings.pop("mock_params", {"type": "echo"}),
        engine=engine,
    )
    return create_app(chatstream=cs), cs


def tiny_app(tiny_model: tuple[Any, Any], **settings: Any) -> tuple[Any, ChatStream]:
    model, tokenizer = tiny_model
    settings.setdefault("transports", ["fastapi", "openai", "ops"])
    settings.setdefault("session_secret", SECRET)
    settings.setdefault("roles", ALL)
    cs = ChatStream(
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        plugins=isolated_plugins(),
        settings=load_settings(**settings),
    )
    return create_app(chatstream=cs), cs


async def ask(client: httpx.AsyncClient, text: str, **body: Any) -> tuple[int, str]:
    async with client.stream("POST", "/chat_stream?format=delta", json={"user_input": text, **body}) as r:
        return r.status_code, "".join([chunk async for chunk in r.aiter_text()])


# -- 2. one request must not stall the server ------------------------------------------------------
def test_a_huge_conversation_does_not_stall_health(tiny_model: tuple[Any, Any]) -> None:
    """~1000 short turns (0.5 MB) that must be trimmed to fit: /health keeps answering fast."""
    app, _ = tiny_app(tiny_model, context_len=512, max_new_tokens=4, request_handler="stateless")
    turns = []
    for i in range(500):
        turns += [
            {"role": "user", "content": f"question {i} " * 30},
            {"role": "assistant", "content": "ok " * 20},
        ]
    hostile = {"messages": turns[:-1], "max_tokens": 2}
    assert len(json.dumps(hostile)) > 250_000
    with run_live_server(app) as url:
        latencies: list[float] = []

        async def attack() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                sent = [client.post("/v1/chat/completions", json=hostile) for _ in range(4)]
                return [r.status_code for r in await asyncio.gather(*sent)]

        async def probe(done: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                while not done.is_set():
                    started = time.monotonic()
                    assert (await client.get("/health")).status_code == 200
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.01)

        async def main() -> list[int]:
            done = asyncio.Event()
            prober = asyncio.create_task(probe(done))
            try:
                return await attack()
            finally:
                done.set()
                await prober

        statuses = asyncio.run(main())
    assert statuses == [200] * 4
    assert len(latencies) >= 10
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms while huge conversations were fitted"


def test_v1_limits_the_number_and_size_of_messages() -> None:
    app, _ = mock_app(max_input_chars=100)
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        many = [{"role": "user", "content": "hi"}] * 3000
        too_many = client.post("/v1/chat/completions", json={"messages": many})
        long = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 101}]}
        )
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_messages"
    assert long.status_code == 400 and long.json()["error"]["param"] == "messages[0].content"
    assert "max_input_chars" in long.json()["error"]["message"]


# -- 3. inputs that gave 500s --------------------------------------------------------------------
def test_a_cookie_of_any_bytes_gets_a_fresh_session() -> None:
    import socket

    app, _ = mock_app()
    replies = []
    with run_live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for method, path in (
            ("GET", "/get_prompt"),
            ("GET", "/get_generation_params"),
            ("POST", "/clear_context"),
        ):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                    + b"Content-Length: 0\r\n"
                    + b"Cookie: chatstream_session=caf\xc3\xa9.\xff\xfe\r\n\r\n"
                )
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
                replies.append(reply)
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_a_lone_surrogate_is_a_422_naming_the_field(tiny_model: tuple[Any, Any]) -> None:
    app, _ = tiny_app(tiny_model)
    body = '{"user_input": "hi \\ud800 there"}'
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        response = client.post("/chat_stream", content=body, headers={"Content-Type": "application/json"})
        prompt = client.get("/get_prompt")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "user_input" and "surrogate" in response.json()["message"]
    assert prompt.status_code == 200


def test_llama2_with_two_user_turns_in_a_row_is_a_400() -> None:
    app, _ = mock_app(request_handler="stateless", prompt_format="llama2")
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        response = client.post("/chat_stream", json={"user_input": "three", "messages": messages})
    assert response.status_code == 400, response.text
    assert "alternating" in response.json()["message"]


def test_get_prompt_with_no_messages_on_the_hf_format(tiny_model: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_model
    app, cs = tiny_app((model, tokenizer), prompt_format="hf")
    assert cs.prompt_class is not None
    # A template that needs a user message, as many real ones do.
    cs.prompt_class.tokenizer = _RaisingTemplate(tokenizer)
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        response = client.get("/get_prompt")
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] is None and response.json()["messages"] == []


class _RaisingTemplate:
    """A tokenizer whose chat template refuses a conversation without a user message."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        if not any(m["role"] == "user" for m in messages):
            raise ValueError("the template needs a user message")
        return self._tokenizer.apply_chat_template(messages, **kwargs)


# -- 4. a parameter change during a stream is kept ------------------------------------------------
async def test_set_generation_params_during_a_stream_is_not_lost() -> None:
    app, _ = mock_app(mock_params={"type": "long", "time_per_token_sec": 0.01})
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await ask(client, "first"))[0] == 200  # the session exists
            async with client.stream("POST", "/chat_stream?format=delta", json={"user_input": "again"}) as r:
                chunks = r.aiter_bytes()
                await chunks.__anext__()  # the answer is streaming
                changed = await client.post("/set_generation_params", json={"temperature": 0.25})
                assert changed.status_code == 200
                async for _ in chunks:
                    pass
            params = (await client.get("/get_generation_params")).json()
    assert params["temperature"] == 0.25


# -- 5. degenerate sampling -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "params", [{"temperature": 1e-39}, {"top_p": 1e-300}, {"temperature": 1e-39, "top_p": 1e-300}]
)
def test_degenerate_sampling_values_are_greedy(tiny_model: tuple[Any, Any], params: dict[str, float]) -> None:
    app, _ = tiny_app(tiny_model, max_new_tokens=12)
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        sampled = client.post(
            "/chat_stream?format=delta", json={"user_input": "Hello", "generation_params": params}
        )
        client.cookies.clear()  # a new conversation: the same prompt
        greedy = client.post(
            "/chat_stream?format=delta", json={"user_input": "Hello", "generation_params": {"temperature": 0}}
        )
    assert sampled.status_code == 200 and greedy.status_code == 200
    _, tokenizer = tiny_model
    for special in tokenizer.all_special_tokens:
        assert special not in sampled.text  # a special token never reaches a client as text
    assert sampled.text == greedy.text


def test_a_seed_out_of_range_is_refused_naming_seed() -> None:
    app, _ = mock_app()
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        chat = client.post("/chat_stream", json={"user_input": "hi", "generation_params": {"seed": 2**70}})
        stored = client.post("/set_generation_params", json={"seed": 2**70})
        negative = client.post("/set_generation_params", json={"seed": -1})
        v1 = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}
        )
        after = client.post("/chat_stream", json={"user_input": "still fine"})
    for response in (chat, stored, negative):
        assert response.status_code == 422 and response.json()["field"] == "seed", response.text
        assert "seed" in response.json()["message"]
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "seed"
    assert after.status_code == 200  # nothing bad was stored


# -- 6. a flood of new sessions cannot wipe real users' conversations ---------------------------------
def test_a_flood_of_cookieless_requests_evicts_no_real_conversation() -> None:
    app, _ = mock_app(plugin_config={"memory": {"max_sessions": 20}})
    with run_live_server(app) as url:
        users = [httpx.Client(base_url=url) for _ in range(5)]
        for index, user in enumerate(users):
            for turn in range(2):
                assert (
                    user.post("/chat_stream", json={"user_input": f"user {index} turn {turn}"}).status_code
                    == 200
                )
        with httpx.Client(base_url=url) as attacker:
            for _ in range(300):
                attacker.cookies.clear()
                assert attacker.post("/set_generation_params", json={"temperature": 0.5}).status_code == 200
        for index, user in enumerate(users):
            messages = [m["message"] for m in user.get("/get_prompt").json()["messages"]]
            assert messages[0] == f"user {index} turn 0", messages
            user.close()


def test_requests_that_store_nothing_create_no_session() -> None:
    app, cs = mock_app()
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(5):
            client.cookies.clear()
            assert client.post("/clear_context").status_code == 200
            assert client.get("/get_generation_params").status_code == 200
            assert client.get("/get_prompt").status_code == 200
    assert len(cs.session_store) == 0


# -- 7. messages name the field as the client sent it --------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/chat_stream",
            {"user_input": "x", "generation_params": {"repetition_penalty": -1}},
            "repetition_penalty",
        ),
        ("/chat_stream", {"user_input": "x", "generation_params": {"temperature": "hot"}}, "temperature"),
        ("/chat_stream", {"user_input": 5}, "user_input"),
        ("/set_generation_params", {"top_p": 3}, "top_p"),
        (
            "/set_generation_params",
            {"frequency_penalty": -2, "frequency_penalty_method": "multiplicative"},
            "frequency_penalty",
        ),
    ],
)
def test_refusals_name_the_field(path: str, body: dict[str, Any], field: str) -> None:
    app, _ = mock_app()
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["field"] == field
    assert answer["message"].startswith(field), answer["message"]
    for noise in ("None:", "body:", "generation_params.generation_params", "Value error,"):
        assert noise not in answer["message"]


def test_v1_names_max_tokens_and_the_largest_value_that_fits() -> None:
    app, _ = mock_app(context_len=64)
    with run_live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100000
            )
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == "max_tokens"
        assert "max_tokens <=" in error["message"] and "max_new_tokens" not in error["message"]
        fits = int(error["message"].split("max_tokens <= ")[1].split(",")[0])
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=fits
        )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=fits + 1
            )
    assert answer.choices[0].message.content == "hi"


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"temperature": 5}, "temperature", "invalid_value"),
        ({"presence_penalty": 3}, "presence_penalty", "invalid_value"),
    ],
)
def test_v1_refusals_have_a_code_and_openai_ranges(extra: dict[str, Any], param: str, code: str) -> None:
    app, _ = mock_app()
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        response = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **extra}
        )
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


def test_v1_accepts_harmless_current_fields_and_the_mock_honours_stop() -> None:
    app, _ = mock_app()
    with run_live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "one two three four"}],
            stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False},
            stop=["three"],
        )
        chunks = list(stream)
        whole = client.completions.create(model="m", prompt="alpha beta gamma", stop=["gamma"])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert whole.choices[0].text == "alpha beta " and whole.choices[0].finish_reason == "stop"


def test_refusals_are_counted_and_request_ids_match_completion_ids() -> None:
    finished = Finished()
    app, _ = mock_app(finished)
    with run_live_server(app) as url, httpx.Client(base_url=url) as client:
        bad = client.post("/v1/chat/completions", json={"messages": []})
        bad_chat = client.post("/chat_stream", content=b"{nope")
        good = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        metrics = client.get("/metrics").text
    assert bad.status_code == 400 and bad_chat.status_code == 400
    assert finished.reasons == ["invalid_request", "invalid_request", "success"]
    assert good.json()["id"] == f"chatcmpl-{good.headers['x-request-id']}"
    assert finished.calls[-1][1]["request_id"] == good.headers["x-request-id"]
    assert 'reason="invalid_request"' in metrics


# -- 8. shutdown is not a disconnect ----------------------------------------------------------------
class Endless(MockEngine):
    """An answer that never ends."""

    def __init__(self) -> None:
        super().__init__({"type": "echo"})

    async def generate(self, request: GenerationRequest) -> Any:
        count = 0
        while True:
            count += 1
            await asyncio.sleep(0.01)
            yield TextDelta("word ", count)


async def test_streams_the_server_ends_report_their_own_reason(caplog: pytest.LogCaptureFixture) -> None:
    finished = Finished()
    app, cs = mock_app(finished, engine=Endless(), num_of_concurrent_executions=2)
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with (
                client.stream("POST", "/chat_stream?format=delta", json={"user_input": "go"}) as chat,
                client.stream(
                    "POST",
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "go"}], "stream": True},
                ) as sse,
            ):
                assert chat.status_code == 200 and sse.status_code == 200
                drained = asyncio.create_task(cs.drain(0.2))
                with pytest.raises(httpx.RemoteProtocolError):  # the plain stream ends unfinished
                    async for _ in chat.aiter_bytes():
                        pass
                events = [line[6:] async for line in sse.aiter_lines() if line.startswith("data: ")]
                assert await drained is False
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutdown"
    assert sorted(finished.reasons) == ["server_shutdown", "server_shutdown"]
    assert "Traceback" not in caplog.text and "CancelledError" not in caplog.text


def test_a_client_leaving_mid_upload_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    app, _ = mock_app()
    with caplog.at_level(logging.INFO), run_live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /set_feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 5000\r\n\r\n{"message_id": "'
            )
        deadline = time.monotonic() + 5
        while "left before its request was read" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text


# -- a plugin's bug stays its own -------------------------------------------------------------------
class Broken:
    """A third-party plugin whose event hooks raise."""

    @hookimpl
    def on_request_finished(self, request_id: str, reason: str, info: dict[str, Any]) -> None:
        raise RuntimeError("broken plugin")

    @hookimpl
    def on_feedback(self, feedback: dict[str, Any]) -> None:
        raise RuntimeError("broken plugin")


def test_a_raising_event_hook_changes_no_response_and_stops_no_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finished = Finished()
    cs = ChatStream(
        settings=load_settings(transports=["fastapi", "ops"], session_secret=SECRET, roles=ALL),
        plugins=isolated_plugins(Broken(), finished),
        use_mock_response=True,
        mock_params={"type": "echo"},
    )
    with run_live_server(create_app(chatstream=cs)) as url, httpx.Client(base_url=url) as client:
        for text in ("one", "two"):
            assert client.post("/chat_stream", json={"user_input": text}).status_code == 200
        message_id = client.get("/get_prompt").json()["messages"][1]["id"]
        feedback = client.post("/set_feedback", json={"message_id": message_id, "type": "like"})
        metrics = client.get("/metrics").text
    assert feedback.status_code == 200 and feedback.json() == {"success": True}
    assert finished.reasons == ["success", "success"]  # the other plugins still ran
    assert 'chatstream_requests_total{reason="success",transport="chat_stream"} 2.0' in metrics
    assert caplog.text.count("failed in its on_request_finished hook") == 2
    assert caplog.text.count("Traceback") == 2  # in full once per hook and plugin


async def test_two_questions_at_once_in_one_session_get_one_answer_and_one_409() -> None:
    app, _ = mock_app(mock_params={"type": "long", "time_per_token_sec": 0.01}, max_new_tokens=5)
    with run_live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await ask(client, "first"))[0] == 200  # the session exists
            results = await asyncio.gather(*(ask(client, f"at once {i}") for i in range(4)))
            history = [m["message"] for m in (await client.get("/get_prompt")).json()["messages"]]
    assert sorted(status for status, _ in results) == [200, 409, 409, 409]
    answered = next(i for i, (status, _) in enumerate(results) if status == 200)
    assert history[2:] == [f"at once {answered}", results[answered][1]]  # one turn, complete
