"""Which engine serves the model when the ``engine`` setting is left unset, and why.

On a machine without a GPU the fast CPU path is OpenVINO GenAI: it serves the embedded SmolLM2 (a
GGUF file) and OpenVINO IR directories directly, at several times the transformers engine's
throughput. A Hugging Face model directory, a model object passed to ``ChatStream``, or a CUDA GPU
keep the transformers engine. The choice and its reason are logged at start-up; ``--engine`` (or
``CHATSTREAM_ENGINE``) always wins.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

TRANSFORMERS = "transformers"
OPENVINO = "openvino"


def has_cuda() -> bool:
    """True when torch sees a CUDA device (False when torch is missing)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a requirement
        return False
    return bool(torch.cuda.is_available())


def has_openvino_genai() -> bool:
    """True when OpenVINO GenAI is installed (without importing it)."""
    return importlib.util.find_spec("openvino_genai") is not None


def is_openvino_ir(path: str | Path) -> bool:
    """True for a directory holding an exported OpenVINO model (``openvino_model.xml``)."""
    return (Path(path) / "openvino_model.xml").is_file()


def choose_engine(
    settings: Any,
    engines: Container[str],
    *,
    model_object: bool = False,
    cuda: Callable[[], bool] = has_cuda,
    openvino: Callable[[], bool] = has_openvino_genai,
) -> tuple[str, str]:
    """``(engine name, reason)`` for these settings, given the registered ``engines``.

    ``model_object``: a model object (not a path) was passed to ``ChatStream``. ``cuda`` and
    ``openvino`` probe the machine; they are called only when the answer depends on them.
    """
    if settings.use_mock_response:
        return "mock", "use_mock_response is set"
    if settings.engine:
        return settings.engine, "the engine setting"
    if model_object:
        return TRANSFORMERS, "a model object was passed"
    model = settings.model
    ir = model is not None and is_openvino_ir(model)
    if model is not None and not ir and not str(model).lower().endswith(".gguf"):
        return TRANSFORMERS, f"{model} is a Hugging Face model; the engine setting picks another"
    what = "an OpenVINO IR directory" if ir else "the embedded model" if model is None else "a GGUF file"
    if OPENVINO not in engines:
        return TRANSFORMERS, f"{what}, but no plugin provides the openvino engine (is it blocked?)"
    if ir:
        return OPENVINO, f"{what} runs only on OpenVINO"
    if cuda():
        return TRANSFORMERS, f"{what} and a CUDA GPU"
    if not openvino():
        return (
            TRANSFORMERS,
            f"{what} on a CPU, but OpenVINO GenAI is not installed; pip install 'chatstream[openvino]' "
            "for the faster CPU engine",
        )
    return OPENVINO, f"{what} on a machine without a GPU: OpenVINO GenAI is the fast CPU engine"
