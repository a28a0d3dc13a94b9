"""Operations: health and readiness, Prometheus metrics, request ids in logs, graceful shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatstream.app import create_app
from chatstream.chatstream import ChatStream
from chatstream.logs import make_log_handler
from chatstream.plugin_manager import BUILTIN_PLUGINS, LoadedPlugins
from chatstream.plugins.engines.mock import MockEngine
from chatstream.settings import load_settings
from chatstream.testing import free_port, isolated_plugins

OPS = "chatstream.plugins.transports.ops"


def ops_plugins() -> LoadedPlugins:
    """The built-ins with the ops plugin (whether or not it is a built-in yet)."""
    return isolated_plugins(builtins=tuple(dict.fromkeys((*BUILTIN_PLUGINS, OPS))))


def ops_chatstream(engine: Any = None, **settings: Any) -> ChatStream:
    """A ChatStream on the mock serving the fastapi and ops transports."""
    settings.setdefault("use_mock_response", True)
    settings.setdefault("transports", ["fastapi", "ops"])
    return ChatStream(settings=load_settings(**settings), plugins=ops_plugins(), engine=engine)


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


class BlockingEngine(MockEngine):
    """The mock, with a start() that waits until the test lets it finish loading."""

    def __init__(self) -> None:
        super().__init__({"texts": ["loaded and answering"]})
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()


async def test_health_and_ready_answer_while_the_model_loads(chatstream_client: Any) -> None:
    engine = BlockingEngine()
    cs = ops_chatstream(engine=engine)
    app = create_app(chatstream=cs)
    async with chatstream_client(app) as client:
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        ready = await client.get("/ready")
        assert (ready.status_code, ready.json()) == (503, {"status": "loading"})
        # A chat request made while loading waits for the model instead of failing.
        chat = asyncio.create_task(client.post("/chat_stream?format=delta", json={"user_input": "hi"}))
        await asyncio.sleep(0.2)
        assert not chat.done()
        engine.loaded.set()
        response = await asyncio.wait_for(chat, 10)
        assert response.status_code == 200 and response.text == "loaded and answering"
        ready = await client.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_failed_load_is_reported_by_health_ready_and_requests(chatstream_client: Any) -> None:
    class BrokenEngine(MockEngine):
        async def start(self) -> None:
            raise OSError("no such model directory: /nowhere")

    cs = ops_chatstream(engine=BrokenEngine())
    app = create_app(chatstream=cs)
    async with chatstream_client(app) as client:
        await asyncio.sleep(0.05)
        health = await client.get("/health")
        assert health.status_code == 503 and "/nowhere" in health.json()["error"]
        assert (await client.get("/ready")).json() == {"status": "failed"}
        chat = await client.post("/chat_stream", json={"user_input": "hi"})
        assert chat.status_code == 503 and chat.json()["error"] == "model_not_loaded"
        assert "/nowhere" in chat.json()["message"]


async def test_drain_refuses_new_requests_and_waits_for_those_in_progress(chatstream_client: Any) -> None:
    cs = ops_chatstream(num_of_concurrent_executions=1)
    app = create_app(chatstream=cs)
    async with chatstream_client(app) as client:
        await cs.start()  # the model loads in the background; wait for it
        assert (await client.get("/ready")).status_code == 200
        await cs.admission.acquire()  # a generation in progress
        drain = asyncio.create_task(cs.drain(5.0))
        await asyncio.sleep(0.1)
        ready = await client.get("/ready")
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        refused = await client.post("/chat_stream", json={"user_input": "hi"})
        assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
        assert (await client.get("/health")).status_code == 200
        assert not drain.done()
        cs.admission.release()
        assert await asyncio.wait_for(drain, 2) is True
    assert await cs.drain(0) is True


async def test_drain_gives_up_after_the_grace_period() -> None:
    cs = ops_chatstream()
    await cs.admission.acquire()
    started = time.monotonic()
    assert await cs.drain(0.2) is False
    assert 0.2 <= time.monotonic() - started < 1.5


async def test_metrics_count_requests_tokens_and_latency(chatstream_client: Any) -> None:
    cs = ops_chatstream(num_of_concurrent_executions=1, max_queue_size=0, mock_params={"texts": ["a b c d"]})
    app = create_app(chatstream=cs)
    async with chatstream_client(app) as client:
        before = (await client.get("/metrics")).text
        assert sample(before, "chatstream_requests_total", reason="success") == 0
        for _ in range(2):
            answer = await client.post("/chat_stream?format=delta", json={"user_input": "hi"})
            assert answer.text == "a b c d"
        await cs.admission.acquire()  # hold the only slot: the next request is refused
        refused = await client.post("/chat_stream", json={"user_input": "hi"})
        assert refused.json() == {"error": "too_many_requests"}
        response = await client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        cs.admission.release()
    labels = {"transport": "chat_stream"}
    assert sample(text, "chatstream_requests_total", reason="success", **labels) == 2
    assert sample(text, "chatstream_requests_total", reason="too_many_requests", **labels) == 1
    assert sample(text, "chatstream_generated_tokens_total", **labels) == 8  # 4 tokens each
    assert sample(text, "chatstream_time_to_first_token_seconds_count", **labels) == 2
    assert sample(text, "chatstream_time_per_output_token_seconds_count", **labels) == 2
    assert sample(text, "chatstream_active_generations") == 1
    assert sample(text, "chatstream_queue_length") == 0
    assert sample(text, "chatstream_generation_slots") == 1
    assert sample(text, "chatstream_ready") == 1


async def test_two_apps_in_one_process_keep_their_own_metrics(chatstream_client: Any) -> None:
    first, second = create_app(chatstream=ops_chatstream()), create_app(chatstream=ops_chatstream())
    async with chatstream_client(first) as a, chatstream_client(second) as b:
        await a.post("/chat_stream", json={"user_input": "hi"})
        assert sample((await a.get("/metrics")).text, "chatstream_requests_total", reason="success") == 1
        assert sample((await b.get("/metrics")).text, "chatstream_requests_total", reason="success") == 0


async def test_metrics_can_require_a_role(chatstream_client: Any) -> None:
    cs = ops_chatstream(
        plugin_config={"ops": {"protect_metrics": True}}, api_keys=[{"role": "admin", "key": "s3cret"}]
    )
    app = create_app(chatstream=cs)
    async with chatstream_client(app) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"X-API-Key": "s3cret"})).status_code == 200
        assert (await client.get("/health")).status_code == 200  # probes stay open


async def test_request_id_is_echoed_or_generated_and_logged(chatstream_client: Any) -> None:
    stream = io.StringIO()
    handler = make_log_handler("json", stream)
    logger = logging.getLogger("chatstream")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        app = create_app(chatstream=ops_chatstream())
        async with chatstream_client(app) as client:
            echoed = await client.post(
                "/chat_stream", json={"user_input": "hi"}, headers={"X-Request-Id": "req-42.a"}
            )
            generated = await client.get("/health")
            forged = await client.get("/health", headers={"X-Request-Id": "bad id\nINFO forged"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert echoed.headers["X-Request-Id"] == "req-42.a"
    assert len(generated.headers["X-Request-Id"]) >= 16
    assert forged.headers["X-Request-Id"] not in ("bad id\nINFO forged", generated.headers["X-Request-Id"])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finished = [line for line in lines if line["logger"] == "chatstream.requests"]
    assert len(finished) == 1
    record = finished[0]
    assert record["request_id"] == "req-42.a"
    assert record["reason"] == "success" and record["level"] == "INFO" and record["tokens"] > 0
    assert set(record) >= {"time", "message", "duration_s", "ttft_s"}


def test_sigterm_lets_streams_finish_refuses_new_requests_and_exits_0(tmp_path: Any) -> None:
    port = free_port()
    # `chatstream serve` with the ops plugin loaded (it may not be a built-in in this checkout).
    script = textwrap.dedent(
        f"""
        from chatstream.plugin_manager import BUILTIN_PLUGINS, set_plugin_manager
        from chatstream.testing import isolated_plugins
        set_plugin_manager(isolated_plugins(builtins=tuple(dict.fromkeys((*BUILTIN_PLUGINS, {OPS!r})))))
        from chatstream.cli import main
        main(["serve", "--mock", "--port", "{port}"])
        """
    )
    words = " ".join(f"w{n}" for n in range(60))
    env = {
        **os.environ,
        "CHATSTREAM_TRANSPORTS": "fastapi,ops",
        "CHATSTREAM_MOCK_PARAMS": json.dumps({"texts": [words], "time_per_token_sec": 0.025}),
        "CHATSTREAM_SHUTDOWN_GRACE_S": "10",
        "CHATSTREAM_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "".join(output)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/chat_stream?format=delta", json={"user_input": "hi"}) as response:
                assert response.status_code == 200
                pieces = response.iter_text()
                text = next(pieces)
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                time.sleep(0.3)
                with httpx.Client(base_url=url, timeout=5) as other:
                    refused = other.post("/chat_stream", json={"user_input": "me too"})
                    ready = other.get("/ready")
                text += "".join(pieces)
        assert text == words  # the answer in progress finished in full
        assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    logged = [json.loads(line) for line in output if line.startswith("{")]
    assert any(line["message"].startswith("shutting down") for line in logged), "".join(output)


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_bad_grace_period_is_a_usage_error_naming_the_setting(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream", "serve", "--mock", "--port", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "CHATSTREAM_SHUTDOWN_GRACE_S": value},
        timeout=60,
    )
    assert result.returncode == 2 and "shutdown_grace_s" in result.stderr
