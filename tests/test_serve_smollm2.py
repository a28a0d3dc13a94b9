"""End to end: `chatstream serve` on the embedded SmolLM2 answers over HTTP."""

from __future__ import annotations

import httpx
import pytest
from test_cli import serve

pytestmark = pytest.mark.smollm2


def test_serve_embedded_model_answers_over_http() -> None:
    env = {"CHATSTREAM_TEMPERATURE": "0", "CHATSTREAM_MAX_NEW_TOKENS": "48"}
    with serve(env=env, timeout_s=300) as url, httpx.Client(base_url=url, timeout=120) as client:
        chunks = []
        with client.stream(
            "POST", "/chat_stream", json={"user_input": "What is the capital of France?"}
        ) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                chunks.append(chunk.decode())
        answer = chunks[-1]  # cumulative chunks: the last one is the whole answer
        assert "Paris" in answer
        assert "<|im_end|>" not in answer and "\ufffd" not in answer
        assert all(answer.startswith(c) for c in chunks)
        # the conversation continues in the same cookie session
        follow = client.post("/chat_stream?format=delta", json={"user_input": "And of Germany?"})
        assert follow.status_code == 200 and follow.text.strip()
