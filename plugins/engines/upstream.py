"""The ``upstream`` engine: generation runs on another OpenAI-compatible server.

chatstream keeps the sessions, the prompt formats, admission and the HTTP APIs; the tokens come
from vLLM, TGI, the llama.cpp server or another chatstream, over HTTP with streamed server-sent
events. Several chatstream replicas can share one (or a load-balanced pool of) upstream servers.

Options (``plugin_config.upstream``, env ``CHATSTREAM_PLUGIN_CONFIG__UPSTREAM__<KEY>``,
:class:`UpstreamOptions`):
- ``base_url`` (required): the server's root, e.g. ``http://vllm:8000`` (``/v1`` is added when missing);
- ``api_key``: sent as ``Authorization: Bearer <key>``;
- ``model``: the model name sent in each request (default: the upstream's first ``/v1/models`` entry);
- ``mode``: ``completions`` (default; the prompt is rendered here with our prompt format and sent to
  ``/v1/completions`` with our stop strings) or ``chat`` (the messages go to ``/v1/chat/completions``
  and the upstream renders them with its own template);
- ``timeout_s``: the longest wait for the next chunk (default 300);
- ``connect_timeout_s``: the longest wait for a connection (default 5);
- ``max_retries``: connection failures retried before the first token, with exponential backoff
  (default 3; a stream that already started is never retried, its text would repeat).

Parameters map to OpenAI's: ``max_new_tokens`` -> ``max_tokens``; frequency/presence penalties must be
subtractive (OpenAI's rule); ``top_k``, ``min_p`` and (multiplicative) ``repetition_penalty`` are sent
as the vLLM extensions. Upstream errors become exceptions with ``status``/``code``, which the HTTP
APIs turn into error responses (502 when the upstream failed or cannot be reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options
from chatstream.types import EngineConfig, FinishReason, GenerationParams, GenerationRequest, TextDelta

if TYPE_CHECKING:  # pragma: no cover
    import httpx

ENGINE = "upstream"
OPTIONS_PATH = "plugin_config.upstream"
# First retry delay; each further retry waits twice as long.
RETRY_BASE_S = 0.1
# Upstream client errors passed through as they are; other 4xx (e.g. 401: our key is wrong) are
# the operator's problem, not the caller's, and become 502.
_PASSED_THROUGH = {400, 404, 413, 422, 429}


class UpstreamOptions(PluginOptions):
    """``plugin_config.upstream``."""

    base_url: str = Field(
        description="the server's root, e.g. http://vllm:8000 (/v1 is added when missing)",
    )
    api_key: str | None = Field(None, description="sent as Authorization: Bearer <key>")
    model: str | None = Field(
        None, description="the model name sent in each request; unset: the upstream's first /v1/models entry"
    )
    mode: Literal["completions", "chat"] = Field(
        "completions",
        description="'completions': the prompt is rendered here and sent to /v1/completions with our stop "
        "strings; 'chat': the messages go to /v1/chat/completions, rendered by the upstream's template",
    )
    timeout_s: float = Field(300.0, ge=0, description="the longest wait for the next chunk, in seconds")
    connect_timeout_s: float = Field(5.0, ge=0, description="the longest wait for a connection, in seconds")
    max_retries: int = Field(
        3, ge=0, description="connection failures retried before the first token, with exponential backoff"
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = value.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError("use http://host:port or https://...")
        return url


class UpstreamError(Exception):
    """The upstream server refused or failed a request; ``status``/``code`` become the HTTP error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def request_body(request: GenerationRequest, mode: str, model: str | None) -> dict[str, Any]:
    """The OpenAI request body for ``request``; ``ValueError`` names a parameter that cannot be sent."""
    params: GenerationParams = request.params
    body: dict[str, Any] = {
        "stream": True,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if model:
        body["model"] = model
    if mode == "chat":
        if not request.messages:
            raise ValueError("the upstream engine in chat mode needs the conversation's messages")
        body["messages"] = [dict(m) for m in request.messages]
    else:
        body["prompt"] = request.prompt
    if request.stop:
        body["stop"] = list(request.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    for name in ("frequency", "presence"):
        value = getattr(params, f"{name}_penalty")
        if value is None:
            continue
        if getattr(params, f"{name}_penalty_method") != "subtractive":
            raise ValueError(
                f"{name}_penalty_method='multiplicative' cannot be sent to an OpenAI-compatible upstream: "
                f"use {name}_penalty_method='subtractive' (OpenAI's rule) or leave {name}_penalty out"
            )
        body[f"{name}_penalty"] = value
    if params.repetition_penalty is not None:
        if params.repetition_penalty_method != "multiplicative":
            raise ValueError(
                "repetition_penalty_method='subtractive' cannot be sent to an OpenAI-compatible upstream: "
                "use repetition_penalty_method='multiplicative' (vLLM's rule) or use frequency_penalty"
            )
        body["repetition_penalty"] = params.repetition_penalty
    # The vLLM extensions, only when they filter: 0 means "off" here, and some servers read 0 otherwise.
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.min_p > 0:
        body["min_p"] = params.min_p
    return body


def _error_message(raw: bytes) -> tuple[str, str | None]:
    """The message and code of an error body (OpenAI's shape, chatstream's, or plain text)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500] or "(no body)", None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return str(error.get("message") or error), str(code) if code else None
    if isinstance(data, dict):
        message = data.get("message") or data.get("detail") or data.get("error") or text
        code = data.get("error") if isinstance(data.get("error"), str) else None
        return str(message)[:500], code
    return text[:500], None


def _status_error(status: int, raw: bytes, url: str) -> UpstreamError:
    message, code = _error_message(raw)
    if status in _PASSED_THROUGH:
        return UpstreamError(
            status, code or f"upstream_{status}", f"upstream {url} answered {status}: {message}"
        )
    return UpstreamError(502, "upstream_error", f"upstream {url} answered {status}: {message}")


class UpstreamEngine:
    """Streams answers from an OpenAI-compatible server (see the module docstring for the options)."""

    name = ENGINE
    tokenizer: Any = None

    def __init__(self, options: UpstreamOptions | dict[str, Any] | None) -> None:
        checked = parse_options(UpstreamOptions, options, OPTIONS_PATH)
        self.options = checked
        base_url = checked.base_url
        self.base_url = base_url if base_url.endswith("/v1") else f"{base_url}/v1"
        self.mode: Literal["completions", "chat"] = checked.mode
        self.api_key: str | None = checked.api_key
        self.model: str | None = checked.model
        self.timeout_s: float = checked.timeout_s
        self.connect_timeout_s: float = checked.connect_timeout_s
        self.max_retries: int = checked.max_retries
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        """The endpoint generation requests go to."""
        return f"{self.base_url}/{'chat/completions' if self.mode == 'chat' else 'completions'}"

    def _make_client(self) -> httpx.AsyncClient:
        import httpx  # only servers that use this engine pay for the import

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        return httpx.AsyncClient(headers=headers, timeout=timeout)

    async def start(self) -> None:
        if self._client is None:
            self._client = self._make_client()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def count_tokens(self, text: str) -> int | None:
        return None  # the tokenizer lives upstream; asking it per request would cost a round trip

    async def _model_name(self, client: httpx.AsyncClient) -> str | None:
        """The configured model, else the upstream's first listed one (asked once)."""
        if self.model is None:
            with contextlib.suppress(Exception):  # servers without /v1/models accept requests with none
                answer = await client.get(f"{self.base_url}/models")
                if answer.status_code == 200:
                    data = answer.json().get("data") or []
                    if data and isinstance(data[0], dict) and data[0].get("id"):
                        self.model = str(data[0]["id"])
        return self.model

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        import httpx

        body = request_body(request, self.mode, self.model)  # refuses bad parameters before any I/O
        if self._client is None:
            await self.start()
        client = self._client
        assert client is not None
        attempt = 0
        while True:
            try:
                if "model" not in body:
                    model = await self._model_name(client)
                    if model:
                        body["model"] = model
                # The ``async with`` closes the HTTP stream as soon as our consumer closes this
                # generator, so the upstream sees the disconnect and stops generating.
                async with client.stream("POST", self.url, json=body) as response:
                    if response.status_code != 200:
                        raise _status_error(response.status_code, await response.aread(), self.url)
                    async for delta in self._deltas(response):
                        yield delta
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing was yielded yet (a connection error cannot happen mid-stream), so a retry
                # cannot repeat text.
                if attempt >= self.max_retries:
                    raise UpstreamError(
                        502,
                        "upstream_unreachable",
                        f"upstream {self.url} is unreachable after {attempt + 1} attempt(s): "
                        f"{type(exc).__name__}: {exc or 'connection failed'}; check "
                        "plugin_config.upstream.base_url and that the server is running",
                    ) from exc
                await asyncio.sleep(RETRY_BASE_S * 2**attempt)
                attempt += 1
            except httpx.TimeoutException as exc:
                raise UpstreamError(
                    502,
                    "upstream_timeout",
                    f"upstream {self.url} sent nothing for {self.timeout_s} s "
                    "(plugin_config.upstream.timeout_s)",
                ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    502, "upstream_error", f"upstream {self.url} failed: {type(exc).__name__}: {exc}"
                ) from exc

    async def _deltas(self, response: httpx.Response) -> AsyncIterator[TextDelta]:
        """The text of each server-sent event; the last delta says why the upstream stopped."""
        tokens = 0
        finish: FinishReason | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise UpstreamError(
                    502,
                    "upstream_bad_stream",
                    f"upstream {self.url} sent an event that is not JSON: {data[:200]}",
                ) from None
            if isinstance(chunk, dict) and "error" in chunk:
                message, code = _error_message(data.encode())
                raise UpstreamError(502, code or "upstream_error", f"upstream {self.url} failed: {message}")
            for choice in chunk.get("choices") or ():
                if self.mode == "chat":
                    text = (choice.get("delta") or {}).get("content") or ""
                else:
                    text = choice.get("text") or ""
                if text:
                    tokens += 1  # one event is one token on vLLM and chatstream; near enough elsewhere
                    yield TextDelta(text, tokens)
                reason = choice.get("finish_reason")
                if reason:
                    finish = FinishReason.LENGTH if reason == "length" else FinishReason.STOP
            usage = chunk.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                tokens = max(tokens, usage["completion_tokens"])
        yield TextDelta("", tokens, finish or FinishReason.STOP)


def create_upstream_engine(config: EngineConfig) -> UpstreamEngine:
    """Engine factory for ``engine = "upstream"``."""
    return UpstreamEngine(config.options)


@hookimpl
def register_engines(register: Any) -> None:
    """Register the ``upstream`` engine."""
    register(ENGINE, create_upstream_engine, options=UpstreamOptions)
