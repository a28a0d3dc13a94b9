"""The chatstream command: light start-up, serve --mock over real HTTP, console chat, listings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from chatstream.testing import free_port


def run(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatstream", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_and_plugins_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from chatstream.cli import main\n"
        "for args in (['--help'], ['plugins'], ['prompts']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "plugins" in result.stdout
    assert result.stdout.strip().endswith("NO-TORCH")


def test_prompts_lists_formats_with_their_plugin() -> None:
    result = run("prompts", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["llama2"]["plugin"] == "chatstream.plugins.prompts.llama2"
    assert {"chatml", "llama3", "rakutenai", "karasu", "nekomata", "hf"} <= set(rows)
    assert [name for name, row in rows.items() if row["selected"]] == ["chatml"]  # the embedded SmolLM2
    llama = run("prompts", "--model", "meta-llama/Llama-2-7b-chat-hf")
    assert "selected for meta-llama/Llama-2-7b-chat-hf: llama2" in llama.stdout


def test_bad_setting_is_a_usage_error_naming_it() -> None:
    result = run("serve", "--mock", env={"CHATSTREAM_MAX_QUEUE_SIZE": "-3"})
    assert result.returncode == 2
    assert "max_queue_size" in result.stderr and "CHATSTREAM_MAX_QUEUE_SIZE" in result.stderr


def test_console_chat_with_the_mock() -> None:
    result = run(
        "chat", "--mock", input="hello\nagain\n\n", env={"CHATSTREAM_MOCK_PARAMS": '{"type": "echo"}'}
    )
    assert result.returncode == 0, result.stderr
    assert "bot> hello" in result.stdout and "bot> again" in result.stdout


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatstream", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_mock_streams_over_http_and_refuses_with_429() -> None:
    env = {
        "CHATSTREAM_MOCK_PARAMS": '{"type": "long", "time_per_token_sec": 0.02}',
        "CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS": "1",
        "CHATSTREAM_MAX_QUEUE_SIZE": "0",
    }
    with serve("--mock", env=env) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/chat_stream?format=delta", json={"user_input": "hi"}) as response:
            assert response.status_code == 200
            pieces = response.iter_text()
            first = next(pieces)
            assert first.startswith("This")
            busy = httpx.post(f"{url}/chat_stream", json={"user_input": "me too"})
            assert busy.status_code == 429  # chatstream serve answers overflow with HTTP 429
            assert busy.json() == {"error": "too_many_requests"}
            rest = "".join(pieces)
        assert (first + rest).startswith("This is sentence number 1 of a long mock answer")
        assert client.get("/get_load").json()["processing"] == 0


def test_openai_client_streams_from_serve_mock() -> None:
    openai = pytest.importorskip("openai", reason="pip install openai (a test extra)")
    with serve("--mock", env={"CHATSTREAM_MOCK_PARAMS": '{"type": "echo"}'}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "stream me back"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        page = httpx.get(f"{url}/")
        metrics = httpx.get(f"{url}/metrics")
    assert text == "stream me back"
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert 'chatstream_requests_total{reason="success",transport="openai"} 1.0' in metrics.text
