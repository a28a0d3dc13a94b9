"""The engine chosen when the ``engine`` setting is unset: OpenVINO for the embedded model on a CPU
(when installed), transformers for Hugging Face models and GPUs; the choice is logged with its reason."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from chatstream.chatstream import ChatStream
from chatstream.engine_choice import choose_engine, has_cuda, has_openvino_genai
from chatstream.settings import load_settings
from chatstream.testing import isolated_plugins

ENGINES = {"mock", "transformers", "openvino", "vllm", "upstream", "replay"}


def never() -> bool:
    raise AssertionError("this choice must not depend on the machine")


def choose(*, cuda: Any = never, openvino: Any = never, engines: Any = ENGINES, **settings: Any) -> Any:
    return choose_engine(load_settings(**settings), engines, cuda=cuda, openvino=openvino)


def test_the_embedded_model_on_a_cpu_gets_openvino_when_it_is_installed() -> None:
    name, reason = choose(cuda=lambda: False, openvino=lambda: True)
    assert name == "openvino" and "without a GPU" in reason


def test_the_embedded_model_on_a_gpu_or_without_openvino_stays_on_transformers() -> None:
    assert choose(cuda=lambda: True)[0] == "transformers"
    name, reason = choose(cuda=lambda: False, openvino=lambda: False)
    assert name == "transformers" and "pip install 'chatstream[openvino]'" in reason


def test_a_hugging_face_directory_stays_on_transformers_and_an_ir_directory_gets_openvino(
    tmp_path: Path,
) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert choose(model=str(hf)) == (
        "transformers",
        f"{hf} is a Hugging Face model; the engine setting picks another",
    )
    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "openvino_model.xml").write_text("<net/>")
    assert choose(model=str(ir))[0] == "openvino"
    gguf = tmp_path / "model.gguf"
    assert choose(model=str(gguf), cuda=lambda: False, openvino=lambda: True)[0] == "openvino"


def test_an_explicit_engine_the_mock_or_a_blocked_openvino_decide_alone() -> None:
    assert choose(engine="transformers") == ("transformers", "the engine setting")
    assert choose(use_mock_response=True)[0] == "mock"
    name, reason = choose(engines=ENGINES - {"openvino"})
    assert name == "transformers" and "blocked" in reason


def test_chatstream_logs_the_engine_it_chose_and_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatstream")
    cs = ChatStream(settings=load_settings(session_secret="s" * 32), plugins=isolated_plugins())
    expected, reason = choose_engine(cs.settings, ENGINES)  # this machine's answer
    assert cs.engine.name == expected
    assert f"engine {expected!r}: {reason} (set engine / --engine to choose another)" in caplog.text
    if not has_cuda() and has_openvino_genai():
        assert expected == "openvino"  # the README's set-up installs OpenVINO: CPUs get the fast engine
    forced = ChatStream(settings=load_settings(engine="transformers"), plugins=isolated_plugins())
    assert forced.engine.name == "transformers"
