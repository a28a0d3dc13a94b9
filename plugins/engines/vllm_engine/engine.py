"""The vLLM engine: vLLM's ``AsyncLLMEngine`` in this process, prompts rendered and tokenized here.

vLLM runs its own scheduling loop, so this engine is not a step loop: each request is one
``engine.generate`` stream, aborted in vLLM at once when its consumer goes away.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from chatstream.engine_queue import check_prompt_room
from chatstream.options import parse_options
from chatstream.runtime_sampling import UnsupportedSamplingError
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

from .options import VLLMOptions
from .sampling import RUNTIME, sampling_kwargs

log = logging.getLogger(__name__)

ENGINE_NAME = "vllm"
OPTIONS_PATH = "plugin_config.vllm"
INSTALL_HINT = "pip install vllm"
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


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class VLLMEngine:
    """Serves a Hugging Face model (a directory or hub id) through vLLM's ``AsyncLLMEngine``."""

    name = ENGINE_NAME

    def __init__(self, config: EngineConfig) -> None:
        self._vllm = import_vllm()
        config.refuse_objects(
            ENGINE_NAME,
            "a Hugging Face model directory or hub id",
            "vLLM's tokenizer (plugin_config.vllm.tokenizer chooses another)",
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
        config.check_limits()
        self.config = config
        self.options = parse_options(VLLMOptions, config.options, OPTIONS_PATH)
        # Refused at start-up, before any load.
        self.steps_enabled = RUNTIME.check_pipeline(config, self.options.pipeline)
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
        if "enable_prefix_caching" in fields:
            # A conversation's next turn starts with its last prompt and answer: vLLM reuses their
            # KV blocks (engine_args.enable_prefix_caching = false turns it off).
            kwargs["enable_prefix_caching"] = True
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
                RUNTIME.check_params(self.config.default_params)
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
