"""The OpenAI Responses and Conversations APIs, driven by the official ``openai`` client: create
(whole and streamed), chaining, retrieve/delete/input items, conversations and their items,
ownership by API key, unsupported parameters refused by name, persistence across a restart
(SQLite) and across replicas (Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from redis_server import redis_server_or_skip

from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins, run_live_server
from chatstream.types import GenerationRequest


class Server:
    """A live server on the echo mock that records the prompts its engine was given."""

    def __init__(self, **settings: Any) -> None:
        values: dict[str, Any] = {"transports": ["openai"], "mock_params": {"type": "echo"}}
        self.cs = ChatStream(
            settings=load_settings(**(values | settings)), plugins=isolated_plugins(), use_mock_response=True
        )
        self.prompts: list[str] = []
        real = self.cs.engine.generate

        def spy(request: GenerationRequest, **kwargs: Any) -> Any:
            self.prompts.append(request.prompt)
            return real(request, **kwargs)

        self.cs.engine.generate = spy

    def client(self, url: str, key: str = "key-a") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def text_of(item: Any, field: str = "text") -> Any:
    """A message item's role, or its first content part's text."""
    return item.role if field == "role" else item.content[0].text


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    served = Server()
    with run_live_server(create_app(chatstream=served.cs)) as url:
        yield served, url


def test_create_retrieve_input_items_and_delete(server: tuple[Server, str]) -> None:
    served, url = server
    client = served.client(url)
    response = client.responses.create(model="m", input="What is a tide?", instructions="Answer briefly.")
    assert response.output_text == "What is a tide?"  # the echo mock repeats the question
    assert response.status == "completed" and response.id.startswith("resp_")
    assert response.usage is not None and response.usage.output_tokens > 0
    assert "Answer briefly." in served.prompts[-1]
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    items = client.responses.input_items.list(response.id)
    assert [text_of(item) for item in items.data] == ["What is a tide?"]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_streaming_sends_the_events_the_client_parses(server: tuple[Server, str]) -> None:
    served, url = server
    client = served.client(url)
    with client.responses.stream(model="m", input="stream this please") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    for kind in (
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.completed",
    ):
        assert kind in kinds, kind
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == "stream this please" and final.usage is not None
    assert client.responses.retrieve(final.id).output_text == "stream this please"  # stored


def test_previous_response_id_continues_the_exchange(server: tuple[Server, str]) -> None:
    served, url = server
    client = served.client(url)
    first = client.responses.create(model="m", input="My name is Ada.")
    second = client.responses.create(model="m", input="What is my name?", previous_response_id=first.id)
    prompt = served.prompts[-1]
    assert "My name is Ada." in prompt and prompt.count("My name is Ada.") == 2  # question and answer
    assert prompt.index("My name is Ada.") < prompt.index("What is my name?")
    assert second.previous_response_id == first.id
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="m", input="hi", previous_response_id="resp_missing")
    assert "previous_response_id" in str(info.value)


def test_a_response_not_stored_cannot_be_retrieved(server: tuple[Server, str]) -> None:
    served, url = server
    client = served.client(url)
    response = client.responses.create(model="m", input="forget me", store=False)
    assert response.output_text == "forget me"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_responses_appended_to_a_conversation_and_its_items(server: tuple[Server, str]) -> None:
    served, url = server
    client = served.client(url)
    conversation = client.conversations.create(metadata={"topic": "sea"})
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "sea"}
    client.responses.create(model="m", input="Tell me about waves.", conversation=conversation.id)
    client.responses.create(model="m", input="And tides?", conversation=conversation.id)
    assert "Tell me about waves." in served.prompts[-1]  # the second answer saw the first exchange
    items = client.conversations.items.list(conversation.id, order="asc")
    texts = [(text_of(item, "role"), text_of(item)) for item in items.data]
    assert texts == [
        ("user", "Tell me about waves."),
        ("assistant", "Tell me about waves."),
        ("user", "And tides?"),
        ("assistant", "And tides?"),
    ]
    added = client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "a note"}]
    )
    assert len(added.data) == 1
    updated = client.conversations.update(conversation.id, metadata={"topic": "tides"})
    assert updated.metadata == {"topic": "tides"}
    client.conversations.delete(conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_another_keys_objects_are_not_found(server: tuple[Server, str]) -> None:
    served, url = server
    ann, ben = served.client(url, "key-ann"), served.client(url, "key-ben")
    response = ann.responses.create(model="m", input="private")
    conversation = ann.conversations.create()
    for call in (
        lambda: ben.responses.retrieve(response.id),
        lambda: ben.responses.delete(response.id),
        lambda: ben.responses.input_items.list(response.id),
        lambda: ben.conversations.retrieve(conversation.id),
        lambda: ben.conversations.items.list(conversation.id),
        lambda: ben.responses.create(model="m", input="x", previous_response_id=response.id),
        lambda: ben.responses.create(model="m", input="x", conversation=conversation.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert ann.responses.retrieve(response.id).output_text == "private"  # still there for its owner


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_unsupported_or_bad_parameters_are_refused_by_name(
    server: tuple[Server, str], extra: dict[str, Any], param: str
) -> None:
    served, url = server
    client = served.client(url)
    body = {"model": "m", "input": "hello", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**body)
    assert info.value.body["param"] == param  # type: ignore[index]
    assert param.split("[")[0].split(".")[0] in info.value.message


def test_stored_objects_survive_a_restart_with_sqlite(tmp_path: Path) -> None:
    settings = {"session_store": "sqlite", "plugin_config": {"sqlite": {"path": str(tmp_path / "s.db")}}}
    first = Server(**settings)
    with run_live_server(create_app(chatstream=first.cs)) as url:
        client = first.client(url)
        response = client.responses.create(model="m", input="remember me")
        conversation = client.conversations.create(items=[{"role": "user", "content": "kept"}])
    second = Server(**settings)
    with run_live_server(create_app(chatstream=second.cs)) as url:
        client = second.client(url)
        assert client.responses.retrieve(response.id).output_text == "remember me"
        client.responses.create(model="m", input="and now?", previous_response_id=response.id)
        assert "remember me" in second.prompts[-1]
        items = client.conversations.items.list(conversation.id)
        assert [text_of(item) for item in items.data] == ["kept"]


def test_two_replicas_on_one_redis_share_stored_objects(tmp_path: Path) -> None:
    with redis_server_or_skip(tmp_path) as redis:
        settings = {"session_store": "redis", "plugin_config": {"redis": {"url": redis.url}}}
        a, b = Server(**settings), Server(**settings)
        with (
            run_live_server(create_app(chatstream=a.cs)) as url_a,
            run_live_server(create_app(chatstream=b.cs)) as url_b,
        ):
            made = a.client(url_a).responses.create(model="m", input="from replica a")
            follow = b.client(url_b).responses.create(model="m", input="on b", previous_response_id=made.id)
            assert "from replica a" in b.prompts[-1]
            assert a.client(url_a).responses.retrieve(follow.id).previous_response_id == made.id
            with pytest.raises(openai.NotFoundError):
                b.client(url_b, "another-key").responses.retrieve(made.id)


README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_the_readme_key_example_configures_access_to_v1(tmp_path: Path) -> None:
    import re

    toml = re.search(r"```toml\n(# chatstream\.toml.*?)```", README, re.S)
    assert toml, "the README's TOML example of keys and roles is gone"
    config = tmp_path / "chatstream.toml"
    config.write_text(toml.group(1))
    settings = load_settings(config_file=config, transports=["openai"], mock_params={"type": "echo"})
    cs = ChatStream(settings=settings, plugins=isolated_plugins(), use_mock_response=True)
    with run_live_server(create_app(chatstream=cs)) as url:
        allowed = openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=30)
        assert allowed.responses.create(model="m", input="hi").output_text == "hi"
        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-key", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            stranger.responses.create(model="m", input="hi")
        with pytest.raises(openai.AuthenticationError):
            stranger.conversations.create()
