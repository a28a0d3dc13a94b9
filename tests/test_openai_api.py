"""The OpenAI-compatible API, driven by the official ``openai`` client over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

import chatstream.plugins.transports.openai as openai_transport
import chatstream.plugins.transports.openai.protocol as openai_protocol
import chatstream.plugins.transports.openai.serving as openai_serving
from chatstream import ChatStream
from chatstream.app import create_app
from chatstream.hookspecs import hookimpl
from chatstream.plugin_manager import BUILTIN_PLUGINS, LoadedPlugins
from chatstream.plugins.engines.mock import split_mock_tokens
from chatstream.settings import Settings, load_settings
from chatstream.testing import isolated_plugins
from chatstream.types import FinishReason, GenerationRequest, TextDelta

ECHO = {"type": "echo"}


class FinishedRequests:
    """Records what ``on_request_finished`` reports."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.infos: list[dict[str, Any]] = []

    @hookimpl
    def on_request_finished(self, reason: str, info: dict[str, Any]) -> None:
        self.reasons.append(reason)
        self.infos.append(info)


def plugins(*extra: Any) -> LoadedPlugins:
    """Built-ins (the OpenAI transport among them) plus ``extra``."""
    assert openai_transport.__name__ in BUILTIN_PLUGINS
    return isolated_plugins(*extra)


def make_app(mock_chatstream: Any, *extra: Any, **options: Any) -> tuple[FastAPI, ChatStream]:
    """An app whose transports (from the default ``transports`` setting) include ``openai``."""
    options.setdefault("mock_params", ECHO)
    cs = mock_chatstream(plugins=plugins(*extra), **options)
    assert "openai" in cs.settings.transports
    return create_app(chatstream=cs), cs


def sync_client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def async_client(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


async def wait_until_idle(cs: ChatStream, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cs.load.processing or cs.load.waiting:
        assert time.monotonic() < deadline, f"the slot was not freed: {cs.get_load()}"
        await asyncio.sleep(0.01)


# -- mock engine -------------------------------------------------------------------------------------
def test_whole_answer_with_the_sync_client(mock_chatstream: Any, live_server: Any) -> None:
    finished = FinishedRequests()
    app, _ = make_app(mock_chatstream, finished)
    with live_server(app) as url:
        completion = sync_client(url).chat.completions.create(
            model="anything-goes",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "echo "}, {"type": "text", "text": "me"}],
                },
            ],
        )
    assert completion.model == "mock"  # the served model, whatever the client asked for
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo me"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(split_mock_tokens("echo me"))
    assert completion.usage.prompt_tokens > 0
    assert finished.reasons == ["success"]
    assert finished.infos[0]["transport"] == "openai"


def test_streamed_answer_with_the_sync_client(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(mock_chatstream)
    text = "one two three 日本語"
    with live_server(app) as url:
        stream = sync_client(url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": text}], stream=True
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 3  # it really streamed, piece by piece
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")


async def test_async_stream_ends_with_a_usage_chunk(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(mock_chatstream)
    with live_server(app) as url:
        stream = await async_client(url).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "count these five words"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 4
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "count these five words"


async def test_async_whole_answer_and_max_tokens(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(mock_chatstream)
    with live_server(app) as url:
        client = async_client(url)
        cut = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b c d e f"}], max_tokens=3
        )
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "a b c d e f"}],
            max_completion_tokens=2,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    assert cut.choices[0].message.content == "a b c"
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a b"
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"extra_body": {"repetition_penalty": -1.0}}, "repetition_penalty"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
        ({"extra_body": {"temprature": 0.5}}, "temprature"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
    ],
)
def test_bad_parameters_are_400_naming_the_field(
    mock_chatstream: Any, live_server: Any, kwargs: dict[str, Any], param: str
) -> None:
    app, cs = make_app(mock_chatstream)
    request: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with live_server(app) as url, pytest.raises(openai.BadRequestError) as caught:
        sync_client(url).chat.completions.create(**request)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]
    assert cs.load.processing == 0  # a refused request holds no slot


async def test_bodies_that_are_not_json_are_400(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(mock_chatstream)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            not_json = await client.post("/v1/chat/completions", content=b"{not json")
            not_object = await client.post("/v1/chat/completions", json=["hi"])
            no_messages = await client.post("/v1/chat/completions", json={"model": "m"})
    for response in (not_json, not_object, no_messages):
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert no_messages.json()["error"]["param"] == "messages"


async def test_full_queue_is_a_rate_limit_error(mock_chatstream: Any, live_server: Any) -> None:
    finished = FinishedRequests()
    app, cs = make_app(
        mock_chatstream,
        finished,
        num_of_concurrent_executions=1,
        max_queue_size=0,
        mock_params={"type": "long", "time_per_token_sec": 0.02},
    )
    with live_server(app) as url:
        client = async_client(url)
        holder = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hold the slot"}], stream=True
        )
        await holder.__anext__()
        assert cs.load.processing == 1
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "me too"}])
        await holder.close()
        await wait_until_idle(cs)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "rate_limit_error"
    assert "too_many_requests" in finished.reasons


async def test_api_keys_are_required_once_configured(mock_chatstream: Any, live_server: Any) -> None:
    settings = Settings(
        use_mock_response=True, mock_params=ECHO, api_keys=[{"role": "admin", "key": "s3cret"}]
    )
    app, _ = make_app(mock_chatstream, settings=settings)
    messages: Any = [{"role": "user", "content": "hi"}]
    with live_server(app) as url:
        with pytest.raises(openai.AuthenticationError):
            await async_client(url, api_key="wrong").chat.completions.create(model="m", messages=messages)
        with pytest.raises(openai.AuthenticationError):
            await async_client(url, api_key="wrong").models.list()
        async with httpx.AsyncClient(base_url=url) as plain:
            no_key = await plain.get("/v1/models")
            with_header = await plain.get("/v1/models", headers={"X-API-Key": "s3cret"})
        answer = await async_client(url, api_key="s3cret").chat.completions.create(
            model="m", messages=messages
        )
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert with_header.status_code == 200
    assert answer.choices[0].message.content == "hi"


async def test_default_role_may_open_the_api(mock_chatstream: Any, live_server: Any) -> None:
    settings = Settings(
        use_mock_response=True,
        mock_params=ECHO,
        roles={"default": ["chat_completions"], "admin": ["*"]},
        api_keys=[{"role": "admin", "key": "s3cret"}],
    )
    app, _ = make_app(mock_chatstream, settings=settings)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as plain:
            answer = await plain.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            models = await plain.get("/v1/models")
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hi"
    assert models.status_code == 401  # the default role does not list "models"


async def test_client_leaving_mid_stream_frees_the_slot(mock_chatstream: Any, live_server: Any) -> None:
    finished = FinishedRequests()
    app, cs = make_app(
        mock_chatstream,
        finished,
        num_of_concurrent_executions=1,
        max_queue_size=0,
        mock_params={"type": "long", "time_per_token_sec": 0.05},
    )
    with live_server(app) as url:
        client = async_client(url)
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "long please"}], stream=True
        )
        async for chunk in stream:
            if chunk.choices[0].delta.content:
                break
        assert cs.load.processing == 1
        await stream.close()
        await wait_until_idle(cs)
        # the freed slot serves the next request
        after = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "next"}], max_tokens=2
        )
    assert after.choices[0].message.content
    assert finished.reasons[0] == "client_disconnected_while_streaming"
    assert finished.reasons[-1] == "success"


async def test_client_leaving_a_whole_answer_frees_the_slot(mock_chatstream: Any, live_server: Any) -> None:
    finished = FinishedRequests()
    app, cs = make_app(
        mock_chatstream,
        finished,
        num_of_concurrent_executions=1,
        mock_params={"type": "long", "time_per_token_sec": 0.05},
    )
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "/v1/chat/completions", json={"messages": [{"role": "user", "content": "long"}]}
                )
        await wait_until_idle(cs)
    assert finished.reasons == ["client_disconnected_while_streaming"]


def test_models_list_and_retrieve(mock_chatstream: Any, live_server: Any) -> None:
    app, _ = make_app(mock_chatstream)
    with live_server(app) as url:
        client = sync_client(url)
        models = client.models.list()
        card = client.models.retrieve("mock")
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4o")
    assert [m.id for m in models.data] == ["mock"]
    assert card.id == "mock" and card.owned_by == "chatstream"


def test_mounted_by_the_transports_setting(mock_chatstream: Any, live_server: Any) -> None:
    settings = Settings(use_mock_response=True, mock_params=ECHO, transports=["openai"])
    cs = mock_chatstream(plugins=plugins(), settings=settings)
    app = create_app(chatstream=cs)
    with live_server(app) as url:
        answer = sync_client(url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "via settings"}]
        )
        chat_stream = httpx.post(f"{url}/chat_stream", json={"user_input": "hi"})
    assert answer.choices[0].message.content == "via settings"
    assert chat_stream.status_code == 404  # only the transports named in settings are mounted


class FailingEngine:
    """Streams a little, then reports an engine error."""

    name = "failing"
    tokenizer: Any = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def count_tokens(self, text: str) -> int | None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        yield TextDelta("partial", 1)
        yield TextDelta("", 1, FinishReason.ERROR)


class FailingEnginePlugin:
    @hookimpl
    def register_engines(self, register: Any) -> None:
        register("failing", lambda config: FailingEngine())


async def test_engine_failure_is_a_server_error_not_a_hang(mock_chatstream: Any, live_server: Any) -> None:
    finished = FinishedRequests()
    settings = Settings(engine="failing", prompt_format="chatml")
    app, cs = make_app(
        mock_chatstream, FailingEnginePlugin(), finished, settings=settings, use_mock_response=False
    )
    messages: Any = [{"role": "user", "content": "hi"}]
    with live_server(app) as url:
        client = async_client(url)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=messages)
        stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
        with pytest.raises(openai.APIError, match="generation failed"):
            async for _ in stream:
                pass
        await wait_until_idle(cs)
    assert finished.reasons == ["unknown_error_occurred", "unknown_error_occurred"]


def test_unknown_install_options_are_refused(mock_chatstream: Any) -> None:
    cs = mock_chatstream(plugins=plugins())
    with pytest.raises(ValueError, match="model_name"):
        openai_transport.install(FastAPI(), cs, {"model_name": "x"})
    with pytest.raises(ValueError, match="max_body_bytes"):
        openai_transport.install(FastAPI(), cs, {"max_body_bytes": "big"})


def test_parameters_map_onto_generation_params(mock_chatstream: Any) -> None:
    cs = mock_chatstream(plugins=plugins())
    body = openai_protocol.ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.3,
            "top_p": 0.9,
            "max_tokens": 7,
            "seed": 42,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,  # allowed: OpenAI's penalties are subtractive
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
        }
    )
    params = openai_serving.generation_params(cs, body)
    assert (params.temperature, params.top_p, params.max_new_tokens, params.seed) == (0.3, 0.9, 7, 42)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.2)
    assert params.repetition_penalty_method == "multiplicative"
    assert (params.frequency_penalty, params.frequency_penalty_method) == (0.5, "subtractive")
    assert (params.presence_penalty, params.presence_penalty_method) == (-0.5, "subtractive")
    newer = openai_protocol.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "max_completion_tokens": 3}
    )
    assert openai_serving.generation_params(cs, newer).max_new_tokens == 3


# -- tiny model --------------------------------------------------------------------------------------
def tiny_app(tiny_model: tuple[Any, Any]) -> tuple[FastAPI, ChatStream]:
    model, tokenizer = tiny_model
    settings = load_settings(plugin_config={"openai": {"model_id": "tiny-llama"}})
    cs = ChatStream(
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        plugins=plugins(),
        max_new_tokens=16,
        settings=settings,
    )
    app = create_app(chatstream=cs)
    return app, cs


async def test_tiny_model_streams_what_it_answers_whole(
    tiny_model: tuple[Any, Any], live_server: Any
) -> None:
    app, cs = tiny_app(tiny_model)
    request: dict[str, Any] = {
        "model": "tiny-llama",
        "messages": [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": "Hello, how are you?"},
        ],
        "temperature": 0,
        "max_tokens": 12,
    }
    with live_server(app) as url:
        client = async_client(url)
        whole = await client.chat.completions.create(**request)
        stream = await client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        text = whole.choices[0].message.content or ""
        assert len(text) > 6
        stop = text[3:6]
        stopped = await client.chat.completions.create(**request, stop=stop)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and streamed == text
    assert whole.model == "tiny-llama"
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 12
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0
    if whole.usage.completion_tokens == 12:
        assert whole.choices[0].finish_reason == "length"
    # a stop string ends the answer before it, and is not shown
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert cs.load.processing == 0
