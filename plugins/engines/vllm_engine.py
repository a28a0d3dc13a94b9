"""The ``vllm`` engine: vLLM in this process, for continuous batching and a paged KV cache on GPUs.

vLLM is optional and heavy (CUDA builds, its own torch pin), so it is imported only when the
engine is created; ``chatstream plugins`` and every other engine work without it. Selecting the
engine where vLLM is missing fails at start-up with the command that installs it.

The engine is built from ``AsyncEngineArgs`` (``model``, ``max_num_seqs`` =
``num_of_concurrent_executions``, ``max_model_len`` = ``context_len``, ``dtype``,
``gpu_memory_utilization`` and any further engine argument from ``engine_args``). chatstream keeps
the sessions and prompt formats: the prompt is rendered here and tokenized here with vLLM's own
tokenizer, with message contents (``GenerationRequest.segments``) as plain text, so a user
who types ``<|im_start|>`` never produces a control token; vLLM receives the ids as a
``TokensPrompt``. Text streams back as vLLM detokenizes it (``RequestOutputKind.DELTA`` where
vLLM has it, else the cumulative text, of which only the new tail is passed on). Closing the
stream (the client left) aborts the request in vLLM at once, which frees its KV blocks.

Sampling runs inside vLLM, so only what vLLM implements can be served: the operator's
``sampling.pipeline`` is checked at start-up and a step vLLM cannot run (a third-party logits
processor, a penalty window, a penalty counting other tokens than vLLM's does) is refused with a
message naming it; a request asking for something vLLM cannot do (a subtractive repetition penalty,
a multiplicative frequency or presence penalty) is refused with a ``ValueError`` naming the
parameter (a 400 for HTTP clients), and a server whose default parameters ask for it does not start.

Plugin options (``plugin_config.vllm``, env ``CHATSTREAM_PLUGIN_CONFIG__VLLM__<KEY>``):
``dtype`` (default ``auto``), ``gpu_memory_utilization`` (share of GPU memory vLLM may take for
weights and KV cache, default 0.9), ``tokenizer`` (a tokenizer path or hub id when the model's own
is not wanted), ``engine_args`` (a table of further ``AsyncEngineArgs`` fields, e.g.
``tensor_parallel_size``, ``quantization``, ``enforce_eager``, ``enable_prefix_caching``),
``pipeline`` (the ``sampling.pipeline`` names, when the builder cannot tell them).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatstream import runtime_sampling
from chatstream.engine_queue import check_prompt_room
from chatstream.hookspecs import hookimpl
from chatstream.runtime_sampling import Runtime, UnsupportedSamplingError
from chatstream.settings import SettingsError
from chatstream.tokenization import HFPromptEncoder
from chatstream.types import (
    EngineConfig,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    Segment,
    TextDelta,
)

log = logging.getLogger(__name__)

RUNTIME = Runtime("vllm", "vLLM", "vLLM")
ENGINE_NAME = "vllm"
INSTALL_HINT = "pip install vllm"
_OPTION_NAMES = ("dtype", "gpu_memory_utilization", "tokenizer", "engine_args", "pipeline")
# Engine arguments chatstream sets itself, and where the operator sets them instead.
_OWN_ARGS = {
    "model": "the model setting (CHATSTREAM_MODEL or --model)",
    "max_num_seqs": "num_of_concurrent_executions (CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS)",
    "max_model_len": "context_len (CHATSTREAM_CONTEXT_LEN)",
    "dtype": "plugin_config.vllm.dtype",
    "gpu_memory_utilization": "plugin_config.vllm.gpu_memory_utilization",
    "tokenizer": "plugin_config.vllm.tokenizer",
}
# vLLM's CompletionOutput.finish_reason values.
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


class VLLMNotInstalledError(SettingsError, ImportError):
    """``engine = "vllm"`` where vLLM cannot be imported; the message says how to install it."""


def import_vllm() -> Any:
    """The ``vllm`` module, or a ``VLLMNotInstalledError`` that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise VLLMNotInstalledError(
            f"the 'vllm' engine needs the package vllm, which cannot be imported here ({exc}); "
            f"install it with: {INSTALL_HINT} (it needs a supported GPU and brings its own torch, so "
            "use a separate virtual environment), or choose another engine: --engine transformers, "
            "or engine 'upstream' to use a vLLM server over HTTP"
        ) from None
    return vllm


# -- options and sampling --------------------------------------------------------------------------------
@dataclass(frozen=True)
class VLLMOptions:
    """The engine's checked plugin options."""

    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    tokenizer: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)


def parse_options(config: EngineConfig) -> VLLMOptions:
    """Check ``plugin_config.vllm``; errors name the option and the fix."""
    options = config.options
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"plugin_config.vllm has unknown option(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(_OPTION_NAMES)} (pass other vLLM engine arguments in plugin_config.vllm.engine_args)"
        )
    dtype = options.get("dtype", "auto")
    if not isinstance(dtype, str) or not dtype:
        raise ValueError(
            f"plugin_config.vllm.dtype={dtype!r} is invalid: use auto, bfloat16, float16 or float32"
        )
    share = options.get("gpu_memory_utilization", 0.9)
    if (
        isinstance(share, bool)
        or not isinstance(share, (int, float))
        or not math.isfinite(share)
        or not 0 < share <= 1
    ):
        raise ValueError(
            f"plugin_config.vllm.gpu_memory_utilization={share!r} is invalid: use a share of GPU "
            "memory above 0 and at most 1, e.g. 0.9"
        )
    tokenizer = options.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer):
        raise ValueError(
            f"plugin_config.vllm.tokenizer={tokenizer!r} is invalid: use a tokenizer path or hub id"
        )
    extra = options.get("engine_args", {})
    if not isinstance(extra, dict):
        raise ValueError(
            f"plugin_config.vllm.engine_args={extra!r} is invalid: use a table of vLLM engine "
            'arguments, e.g. {"tensor_parallel_size": 2}'
        )
    for name in extra:
        if name in _OWN_ARGS:
            raise ValueError(
                f"plugin_config.vllm.engine_args.{name} is set by chatstream: use {_OWN_ARGS[name]} instead"
            )
    return VLLMOptions(dtype, float(share), tokenizer, dict(extra))


def check_pipeline(config: EngineConfig) -> frozenset[str]:
    """The sampling steps the runtime will run (see :func:`chatstream.runtime_sampling.check_pipeline`)."""
    return runtime_sampling.check_pipeline(config, RUNTIME)


def check_params(params: GenerationParams) -> None:
    """Refuse parameters the runtime cannot honour (see :mod:`chatstream.runtime_sampling`)."""
    runtime_sampling.check_params(params, RUNTIME)


def sampling_kwargs(
    params: GenerationParams, steps: frozenset[str], max_tokens: int, stop: Sequence[str]
) -> dict[str, Any]:
    """The ``SamplingParams`` arguments for ``params``; only the steps the operator's pipeline runs apply.

    Special tokens stay in the text (as with chatstream's own detokenizer) so that a stop string
    such as ``<|im_end|>`` matches; vLLM leaves the stop string, and the EOS token, out of the text.
    """
    check_params(params)
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_tokens,
        "stop": [s for s in stop if s],
        "include_stop_str_in_output": False,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if "repetition" in steps and params.repetition_penalty is not None:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if "frequency" in steps and params.frequency_penalty is not None:
        kwargs["frequency_penalty"] = params.frequency_penalty
    if "presence" in steps and params.presence_penalty is not None:
        kwargs["presence_penalty"] = params.presence_penalty
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if params.greedy:
        kwargs["temperature"] = 0.0  # vLLM's greedy decoding: the filters below do not matter
        return kwargs
    kwargs["temperature"] = params.temperature if "temperature" in steps else 1.0
    # -1 is "off" in every vLLM version (0 is refused by older ones).
    kwargs["top_k"] = params.top_k if "top_k" in steps and params.top_k > 0 else -1
    kwargs["top_p"] = params.top_p if "top_p" in steps else 1.0
    kwargs["min_p"] = params.min_p if "min_p" in steps else 0.0
    return kwargs


# -- prompts -------------------------------------------------------------------------------------------
async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# -- the engine ------------------------------------------------------------------------------------------
class VLLMEngine:
    """Serves a Hugging Face model (a directory or hub id) through vLLM's ``AsyncLLMEngine``."""

    name = ENGINE_NAME

    def __init__(self, config: EngineConfig) -> None:
        self._vllm = import_vllm()
        if config.model is not None:
            raise ValueError(
                "the 'vllm' engine loads its model itself: set model to a Hugging Face model directory "
                "or hub id instead of passing a model object"
            )
        if config.tokenizer is not None:
            raise ValueError(
                "the 'vllm' engine uses vLLM's tokenizer: leave tokenizer unset, or set "
                "plugin_config.vllm.tokenizer to a tokenizer path or hub id"
            )
        if not config.model_path:
            raise ValueError(
                "the 'vllm' engine needs a model: set model (CHATSTREAM_MODEL or --model) to a Hugging "
                "Face model directory or hub id, e.g. Qwen/Qwen2.5-1.5B-Instruct (vLLM does not serve "
                "the embedded SmolLM2 GGUF)"
            )
        if config.device not in (None, "", "auto", "cuda"):
            raise ValueError(
                f"device={config.device!r} cannot be chosen for the 'vllm' engine: vLLM runs on the "
                "platform it was built for; leave device unset, pick GPUs with CUDA_VISIBLE_DEVICES and "
                "spread a model over several with plugin_config.vllm.engine_args.tensor_parallel_size"
            )
        if config.max_batch_size < 1:
            raise ValueError(f"max_batch_size={config.max_batch_size} is invalid: use 1 or more")
        if config.context_len < 2:
            raise ValueError(f"context_len={config.context_len} is invalid: use 2 or more")
        self.config = config
        self.options = parse_options(config)
        self.steps_enabled = check_pipeline(config)  # refuse at start-up, before any load
        self.context_len = config.context_len
        self.engine_args = self._engine_args()
        self.engine: Any = None
        self.tokenizer: Any = None
        from vllm.inputs import TokensPrompt

        self._tokens_prompt = TokensPrompt
        self._delta_kind: Any = None  # an old vLLM: cumulative outputs only
        with contextlib.suppress(ImportError):
            from vllm.sampling_params import RequestOutputKind

            self._delta_kind = RequestOutputKind.DELTA
        self._ids = itertools.count()
        self.active_requests: set[str] = set()  # vLLM request ids now streaming

    def _engine_args(self) -> Any:
        """vLLM's ``AsyncEngineArgs``; an unknown engine argument is refused with its name."""
        args_class = self._vllm.AsyncEngineArgs
        kwargs: dict[str, Any] = {
            "model": self.config.model_path,
            "max_num_seqs": self.config.max_batch_size,
            "max_model_len": self.context_len,
            "dtype": self.options.dtype,
            "gpu_memory_utilization": self.options.gpu_memory_utilization,
        }
        if self.options.tokenizer is not None:
            kwargs["tokenizer"] = self.options.tokenizer
        fields = getattr(args_class, "__dataclass_fields__", {})
        if "disable_log_requests" in fields and "enable_log_requests" not in fields:
            # Older vLLMs log every prompt at INFO; user text stays out of the log unless asked for.
            kwargs["disable_log_requests"] = True
        kwargs.update(self.options.engine_args)
        try:
            return args_class(**kwargs)
        except TypeError as exc:
            raise ValueError(
                f"plugin_config.vllm.engine_args is invalid for this vLLM ({exc}); use the names of "
                "vLLM's engine arguments (`vllm serve --help` lists them, with - as _)"
            ) from None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build vLLM's engine (this loads the model; vLLM builds it on the running event loop)."""
        if self.engine is not None:
            return
        if self.config.default_params is not None:  # refused before the model loads
            try:
                check_params(self.config.default_params)
            except UnsupportedSamplingError as exc:
                raise SettingsError(f"the default generation settings cannot run on vLLM: {exc}") from None
        engine = self._vllm.AsyncLLMEngine.from_engine_args(self.engine_args)
        try:
            self.tokenizer = await _maybe_await(engine.get_tokenizer())
        except Exception:
            await _maybe_await(_shutdown(engine))
            raise
        self.engine = engine

    async def close(self) -> None:
        """Shut vLLM down (its workers and GPU memory); requests still running end."""
        engine, self.engine = self.engine, None
        if engine is not None:
            await _maybe_await(_shutdown(engine))

    # -- public helpers ----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        """Prompt token ids, made with vLLM's tokenizer; special-token strings in message content
        (``Segment.content``) stay text (see :mod:`chatstream.tokenization`). A string is all template."""
        if self.tokenizer is None:
            raise RuntimeError("the engine has no tokenizer yet: await engine.start() first")
        if add_special_tokens is None:
            add_special_tokens = self.config.add_special_tokens
        return HFPromptEncoder.of(self.tokenizer).encode(prompt, add_special_tokens)

    def count_tokens(self, text: str) -> int | None:
        """How many tokens ``text`` encodes to as a prompt (None before the engine started)."""
        return None if self.tokenizer is None else len(self.encode(text))

    def sampling_params(self, params: GenerationParams, prompt_len: int, stop: Sequence[str]) -> Any:
        """vLLM's ``SamplingParams`` for one request (``ValueError`` when it cannot be served)."""
        room = self.context_len - prompt_len
        kwargs = sampling_kwargs(params, self.steps_enabled, min(params.max_new_tokens, room), stop)
        if self._delta_kind is not None:
            kwargs["output_kind"] = self._delta_kind
        return self._vllm.SamplingParams(**kwargs)

    # -- generation --------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        """Stream vLLM's text; the last delta carries the finish reason and the token count."""
        if self.engine is None:
            raise RuntimeError("the engine is not running: await engine.start() first")
        engine = self.engine
        prompt_ids = (
            list(request.prompt_ids)
            if request.prompt_ids is not None
            else self.encode(request.prompt_segments(), request.add_special_tokens)
        )
        check_prompt_room(prompt_ids, self.context_len)
        sampling = self.sampling_params(request.params, len(prompt_ids), request.stop)
        # vLLM needs ids unique among running requests; chatstream's id leads, for the logs.
        request_id = f"{request.request_id or uuid.uuid4().hex}-{next(self._ids)}"
        outputs = engine.generate(self._tokens_prompt(prompt_token_ids=prompt_ids), sampling, request_id)
        stream = _OutputText(delta=self._delta_kind is not None)
        finished = False
        self.active_requests.add(request_id)
        try:
            async for output in outputs:
                completion = output.outputs[0]
                text = stream.add(completion)
                reason = completion.finish_reason
                if reason is not None or output.finished:
                    finished = True
                    yield TextDelta(text, stream.tokens, _FINISH_REASONS.get(reason, FinishReason.ERROR))
                    return
                if text:
                    yield TextDelta(text, stream.tokens)
            finished = True
            # vLLM ended the stream without saying why (it was aborted elsewhere or shut down).
            yield TextDelta("", stream.tokens, FinishReason.CANCELLED)
        finally:
            self.active_requests.discard(request_id)
            if not finished:
                # The consumer went away (generator closed or cancelled): free the sequence now.
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
            with contextlib.suppress(Exception):
                await outputs.aclose()


class _OutputText:
    """The new text and the token count from each of one request's vLLM outputs.

    With ``DELTA`` outputs each carries only its new text and ids. Cumulative outputs carry the
    whole text so far: only the part past what was already passed on is new, so nothing repeats
    (a text that no longer extends what was sent, which vLLM does not produce, adds nothing).
    """

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.sent = ""
        self.tokens = 0

    def add(self, completion: Any) -> str:
        ids = completion.token_ids or ()
        text: str = completion.text or ""
        if self.delta:
            self.tokens += len(ids)
            return text
        self.tokens = len(ids)
        if not text.startswith(self.sent):
            log.warning("vLLM rewrote text already streamed; the rewritten part is not sent again")
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def _shutdown(engine: Any) -> Any:
    """Stop vLLM's engine: ``shutdown()`` (V1) or the background loop (older versions)."""
    for name in ("shutdown", "shutdown_background_loop"):
        method = getattr(engine, name, None)
        if callable(method):
            return method()
    return None


def create_engine(config: EngineConfig) -> VLLMEngine:
    """The engine factory registered as ``vllm``; imports vLLM."""
    return VLLMEngine(config)


@hookimpl
def register_engines(register: Callable[..., None]) -> None:
    """Register the ``vllm`` engine."""
    register(ENGINE_NAME, create_engine)
