"""Shared types: generation parameters, engine requests and stream events, the engine protocol.

Everything here is plain data or a ``Protocol``; nothing imports torch, so the CLI and the
plugin manager stay fast to import.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # pragma: no cover
    import torch

PenaltyMethod = Literal["multiplicative", "subtractive"]


class GenerationParams(BaseModel):
    """Sampling and length parameters of one generation.

    ``temperature == 0`` means greedy decoding. ``top_k == 0`` and ``top_p == 1`` disable those
    filters. A penalty of ``None`` is off. Multiplicative penalties must be > 0 (1.0 is neutral);
    subtractive ones are added to nothing (0.0 is neutral).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_new_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = None
    repetition_penalty_method: PenaltyMethod = "multiplicative"
    frequency_penalty: float | None = None
    frequency_penalty_method: PenaltyMethod = "subtractive"
    presence_penalty: float | None = None
    presence_penalty_method: PenaltyMethod = "subtractive"
    seed: int | None = None

    @model_validator(mode="after")
    def _check_penalties(self) -> GenerationParams:
        for name in ("repetition", "frequency", "presence"):
            value = getattr(self, f"{name}_penalty")
            method = getattr(self, f"{name}_penalty_method")
            if value is None:
                continue
            if method == "multiplicative" and value <= 0:
                raise ValueError(
                    f"{name}_penalty={value} is invalid with {name}_penalty_method='multiplicative': "
                    "use a value > 0 (1.0 means no penalty, > 1.0 discourages repeats)"
                )
            if abs(value) > 100:
                raise ValueError(f"{name}_penalty={value} is out of range: use a value in [-100, 100]")
        return self

    @property
    def greedy(self) -> bool:
        """True when the next token is always the most likely one."""
        return self.temperature == 0.0


class FinishReason(str, enum.Enum):
    """Why a generation ended (OpenAI's vocabulary)."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens or the context length
    CANCELLED = "cancelled"  # the consumer went away
    ERROR = "error"


@dataclass(frozen=True)
class TextDelta:
    """One piece of streamed output: new text (may be empty) and, on the last one, why it ended."""

    text: str
    tokens: int = 0  # tokens generated so far for this request
    finish_reason: FinishReason | None = None


@dataclass
class GenerationRequest:
    """What an engine is asked to generate: rendered prompt text, stop strings and parameters."""

    prompt: str
    params: GenerationParams = field(default_factory=lambda: GenerationParams())
    stop: Sequence[str] = ()
    request_id: str = ""
    add_special_tokens: bool | None = None
    # The conversation as role/content dicts, for engines that render prompts themselves (upstream chat).
    messages: Sequence[dict[str, str]] | None = None
    # Message contents, in prompt order, that must be tokenized as plain text: a special-token
    # string typed by a user (``<|im_start|>``) never becomes a control token.
    literal_spans: Sequence[str] = ()


@runtime_checkable
class LogitsProcessor(Protocol):
    """The transformers interface: return new scores, never modify inputs in place.

    ``input_ids`` is ``[batch, length]``; in the chatstream engine rows are left-padded with
    ``-1``, which a processor must ignore.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RowInfo:
    """One row of a batch as a processor factory sees it."""

    params: GenerationParams
    prompt_len: int  # the first ``prompt_len`` tokens of the row's history are the prompt


# A processor factory builds one processor for a whole batch, or None when no row needs it.
# ``options`` are the operator's settings for this processor (``sampling.processors.<name>``).
ProcessorFactory = Callable[[Sequence[RowInfo], dict[str, Any]], "LogitsProcessor | None"]
# A pipeline builder is what engines receive: rows -> the ordered list of processors to apply.
PipelineBuilder = Callable[[Sequence[RowInfo]], "list[LogitsProcessor]"]


@dataclass
class EngineConfig:
    """Everything an engine factory gets.

    ``model``/``tokenizer`` are objects, or None to load ``model_path``.
    """

    model: Any = None
    tokenizer: Any = None
    model_path: str | None = None
    device: str | None = None
    max_batch_size: int = 2
    context_len: int = 1024
    add_special_tokens: bool | None = None
    build_pipeline: PipelineBuilder | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the engine plugin's own settings
    mock_params: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """Generates text for many concurrent requests.

    ``generate`` is an async generator of ``TextDelta``; the last delta carries ``finish_reason``.
    Closing the generator early (the client left) must stop compute for that request at the
    next step. ``tokenizer`` is the engine's tokenizer or None (mock engines have none).
    """

    name: str
    tokenizer: Any

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TextDelta, None]: ...

    def count_tokens(self, text: str) -> int | None:
        """Tokens ``text`` encodes to (as a prompt), or None when the engine cannot tell."""
        ...


EngineFactory = Callable[[EngineConfig], Engine]


class FinishedReason(str, enum.Enum):
    """How a chat request ended, as reported to callbacks and the ``on_request_finished`` hook."""

    SUCCESS = "success"
    CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
    CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
    UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"
    TOO_MANY_REQUESTS = "too_many_requests"
