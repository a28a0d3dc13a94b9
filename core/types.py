"""Shared types: generation parameters, engine requests and stream events, the engine protocol.

Everything here is plain data or a ``Protocol``; nothing imports torch, so the CLI and the
plugin manager stay fast to import.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ChatStreamError, Namer, ParamValueError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PenaltyMethod = Literal["multiplicative", "subtractive"]

# Below these, sampling is greedy: dividing logits by a temperature under 1e-3 already makes the
# most likely token win by far, and much smaller ones overflow to inf and NaN; a top_p under 1e-6
# (float32 cannot tell it from 0) keeps only the most likely token anyway.
GREEDY_TEMPERATURE_BELOW = 1e-3
GREEDY_TOP_P_BELOW = 1e-6
MAX_SEED = 2**63 - 1


def _penalty_not_positive(field: str, value: float) -> Callable[[Namer], str]:
    def message(name: Namer) -> str:
        return (
            f"{name(field)}={value} is invalid with {name(field + '_method')}='multiplicative': "
            "use a value > 0 (1.0 means no penalty, > 1.0 discourages repeats)"
        )

    return message


def _penalty_out_of_range(field: str, value: float) -> Callable[[Namer], str]:
    def message(name: Namer) -> str:
        return f"{name(field)}={value} is out of range: use a value in [-100, 100]"

    return message


class GenerationParams(BaseModel):
    """Sampling and length parameters of one generation.

    ``temperature == 0`` means greedy decoding, and so do a ``temperature`` below 1e-3 and a
    ``top_p`` below 1e-6 (they could only pick the most likely token, or overflow trying).
    ``top_k == 0`` and ``top_p == 1`` disable those filters. A penalty of ``None`` is off.
    Multiplicative penalties must be > 0 (1.0 is neutral); subtractive ones are added to nothing
    (0.0 is neutral). ``seed`` is 0 to 2**63 - 1.
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
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check_penalties(self) -> GenerationParams:
        for name in ("repetition", "frequency", "presence"):
            value = getattr(self, f"{name}_penalty")
            method = getattr(self, f"{name}_penalty_method")
            if value is None:
                continue
            field = f"{name}_penalty"
            if method == "multiplicative" and value <= 0:
                raise ParamValueError(field, _penalty_not_positive(field, value))
            if abs(value) > 100:
                raise ParamValueError(field, _penalty_out_of_range(field, value))
        return self

    @property
    def greedy(self) -> bool:
        """True when the next token is always the most likely one."""
        return self.temperature < GREEDY_TEMPERATURE_BELOW or self.top_p < GREEDY_TOP_P_BELOW


def validate_params(values: dict[str, Any]) -> GenerationParams:
    """``GenerationParams(**values)``, or a ``ChatStreamError`` (422) whose ``field`` is the first
    refused parameter and whose message names it as the client's transport does."""
    try:
        return GenerationParams(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ParamValueError):
            raise ChatStreamError(422, "invalid_parameter", cause.message, field=cause.field) from None
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else "generation_params"
        given = error.get("input")
        shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
        tail = ".".join(loc[1:])
        text = error["msg"]
        raise ChatStreamError(
            422,
            "invalid_parameter",
            lambda name: f"{name(field)}{'.' + tail if tail else ''}: {text}{shown}",
            field=field,
        ) from None


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
    # On the first delta, where the engine knows: the prompt's length in tokens, and how many of
    # those it did not compute because a cached prefix (an earlier turn's KV) already held them.
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt: the format's own ``template`` text, whose special-token strings
    (``<|im_start|>``) are control tokens, or a message's ``content``, which is always plain text."""

    text: str
    literal: bool = False  # True: message content (never special tokens)

    @staticmethod
    def template(text: str) -> Segment:
        return Segment(text, False)

    @staticmethod
    def content(text: str) -> Segment:
        return Segment(text, True)


def joined(segments: Sequence[Segment]) -> str:
    """The prompt text of ``segments``."""
    return "".join(segment.text for segment in segments)


@dataclass
class GenerationRequest:
    """What an engine is asked to generate: the rendered prompt, stop strings and parameters.

    ``segments`` say which parts of ``prompt`` are template text and which are message content
    (plain text whatever it holds); engines that tokenize build their ids from them, or take
    ``prompt_ids`` when core has already made them (it does when it had to count tokens).
    A request built from ``prompt`` alone is all template text.
    """

    prompt: str
    params: GenerationParams = field(default_factory=lambda: GenerationParams())
    stop: Sequence[str] = ()
    request_id: str = ""
    add_special_tokens: bool | None = None
    # The conversation as role/content dicts, for engines that render prompts themselves (upstream chat).
    messages: Sequence[dict[str, str]] | None = None
    segments: Sequence[Segment] = ()
    prompt_ids: Sequence[int] | None = None
    prompt_tokens: int | None = None  # the prompt's length when core counted it (the ids sent)
    # Whose conversation this is (a session id), for engines that keep earlier turns' KV caches:
    # with reuse confined to sessions, only requests of the same scope share cached prefixes.
    cache_scope: str | None = None

    def prompt_segments(self) -> Sequence[Segment]:
        """``segments``, or the whole ``prompt`` as one template segment when none were given."""
        return self.segments or (Segment.template(self.prompt),)


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
    # The engine plugin's own settings (``plugin_config.<engine>``): the instance of the options
    # model it registered, or a plain dict (a factory called directly; it validates that itself).
    options: Any = field(default_factory=dict)
    mock_params: dict[str, Any] = field(default_factory=dict)
    # The server's default generation parameters: an engine that cannot run them refuses to start.
    default_params: GenerationParams | None = None
    # The engine registry of the plugins the engine is built for (``{name: Contribution}``), so an
    # engine can hand a model it cannot run to another one; None: the process-wide plugins'.
    engines: Mapping[str, Any] | None = None

    def refuse_objects(self, engine: str, model_from: str, tokenizer_from: str) -> None:
        """For an engine that loads its own model and tokenizer: ``ValueError`` when model or
        tokenizer objects were passed. ``model_from``: what to set ``model`` to instead;
        ``tokenizer_from``: whose tokenizer the engine uses (and how to choose another)."""
        if self.model is not None:
            raise ValueError(
                f"the {engine!r} engine loads its model itself: set model to {model_from} instead of "
                "passing a model object"
            )
        if self.tokenizer is not None:
            raise ValueError(f"the {engine!r} engine uses {tokenizer_from}: leave tokenizer unset")

    def check_limits(self) -> None:
        """``ValueError`` naming ``max_batch_size`` or ``context_len`` when it is too small."""
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} is invalid: use 1 or more")
        if self.context_len < 2:
            raise ValueError(f"context_len={self.context_len} is invalid: use 2 or more")


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
    INVALID_REQUEST = "invalid_request"  # refused with a 4xx (the message says what to fix)
    SERVER_SHUTDOWN = "server_shutdown"  # the server ended the answer: its drain period ran out
