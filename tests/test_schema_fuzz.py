"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI schema, valid
(positive) and invalid (negative) ones, for every endpoint; none may get a 5xx.

``CHATSTREAM_FUZZ_EXAMPLES`` sets the examples per endpoint and mode (default 10, seconds in CI);
the figures in docs/reliability.md come from a larger run:

    CHATSTREAM_FUZZ_EXAMPLES=300 python -m pytest tests/test_schema_fuzz.py -q -s
"""

from __future__ import annotations

import asyncio
import collections
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from chatstream import ChatStream
from chatstream.app import create_app
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins

EXAMPLES = int(os.environ.get("CHATSTREAM_FUZZ_EXAMPLES", "10"))
SECRET = "fuzz-secret-fuzz-secret-fuzz-secret-fuzz"


def fuzz_app(**settings: Any) -> tuple[Any, ChatStream]:
    """Every HTTP transport on the echo mock, all endpoints open to callers without a key."""
    settings.setdefault("roles", {"default": ["*"]})
    cs = ChatStream(
        settings=load_settings(
            transports=["fastapi", "openai", "ops"], session_secret=SECRET, max_input_chars=2000, **settings
        ),
        plugins=isolated_plugins(),
        use_mock_response=True,
        mock_params={"type": "echo"},
    )
    return create_app(chatstream=cs), cs


async def without_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """The app for schemathesis, whose test client starts and stops the app around every call:
    the ChatStream stays up (it starts on the first request) instead of draining after one."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    await APP(scope, receive, send)


APP, CS = fuzz_app()
asyncio.run(CS.start())  # as the lifespan would: /ready says ready
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)
OPERATIONS = {
    f"{op.method.upper()} {op.path}": op
    for op in (result.ok() for result in SCHEMA.get_all_operations())  # type: ignore[union-attr]
}
STATUSES: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


def test_every_endpoint_is_in_the_schema() -> None:
    assert set(OPERATIONS) >= {
        "POST /chat_stream",
        "POST /clear_context",
        "GET /get_prompt",
        "POST /set_generation_params",
        "GET /get_generation_params",
        "POST /set_feedback",
        "GET /get_load",
        "GET /get_resource_usage",
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
        "GET /v1/models/{model_id}",
        "GET /health",
        "GET /ready",
        "GET /metrics",
    }


def has_inputs(op: Any) -> bool:
    """Whether the operation takes a body or query parameters that can be made invalid (any string
    is a valid ``model_id``)."""
    return bool(len(op.body) or len(op.query))


CASES = [
    pytest.param(name, mode, id=f"{name}-{mode.value}")
    for name, op in sorted(OPERATIONS.items())
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or has_inputs(op)
]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_generated_requests_never_get_a_server_error(name: str, mode: GenerationMode) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=OPERATIONS[name].as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call()
        STATUSES[f"{name} {mode.value}"][response.status_code] += 1
        assert response.status_code < 500, (
            f"{case.as_curl_command()} -> {response.status_code}: {response.text}"
        )

    check()
    if os.environ.get("CHATSTREAM_FUZZ_EXAMPLES"):
        counts = STATUSES[f"{name} {mode.value}"]
        print(
            f"\n{name} {mode.value}: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}"
        )


# -- what the schema itself revealed -----------------------------------------------------------------
async def test_the_schema_is_served_and_describes_the_bodies(chatstream_client: Any) -> None:
    app, _ = fuzz_app()
    async with chatstream_client(app) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200  # was a 500: handler defaults leaked into the schema
    paths = response.json()["paths"]
    body = paths["/chat_stream"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"user_input", "regenerate", "generation_params", "conversation_id"}
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in chat["required"] and "$ref" not in str(chat)
    for path, operations in paths.items():
        for operation in operations.values():
            names = {p["name"] for p in operation.get("parameters", [])}
            assert not any(n.startswith("_") for n in names), (path, names)


async def test_a_query_parameter_cannot_pass_another_endpoints_role_check(chatstream_client: Any) -> None:
    app, _ = fuzz_app(roles={"default": ["get_load"]})
    async with chatstream_client(app) as client:
        allowed = await client.get("/get_load")
        for query in ("", "?_name=get_load", "?_handler=x&_name=get_load"):
            denied = await client.get(f"/get_prompt{query}")
            assert denied.status_code == 401, (query, denied.text)
            assert "get_prompt needs an API key" in denied.json()["message"]
    assert allowed.status_code == 200


async def test_a_completion_without_prompt_is_a_400_naming_it(chatstream_client: Any) -> None:
    app, _ = fuzz_app()
    async with chatstream_client(app) as client:
        response = await client.post("/v1/completions", json={})
    assert response.status_code == 400  # was a 500 (TypeError), found by the schema fuzzing
    assert response.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]'),
        ("/v1/completions", b'{"prompt": "a \\ud800 b"'),
    ],
)
async def test_an_unpaired_surrogate_is_a_400_not_a_500(
    chatstream_client: Any, path: str, body: bytes, stream: bool
) -> None:
    app, _ = fuzz_app()
    content = body + (b', "stream": true}' if stream else b"}")
    async with chatstream_client(app) as client:
        response = await client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text  # was a 500 (the answer could not be encoded)
    assert "unpaired surrogate" in response.json()["error"]["message"]
