"""The stand-in engine and its controls (not part of vLLM): the answer, the step time, the records.

Tests set :data:`ANSWER` and :data:`TOKEN_DELAY_S`, call :func:`reset`, and read
:data:`ENGINES` (every engine built, newest last) and each engine's ``requests`` and ``aborted``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

REPLACEMENT_CHAR = "\ufffd"
DEFAULT_ANSWER = "Hello, how are you today? こんにちは、今日はいい天気ですね。<|im_end|>never shown"

ANSWER = DEFAULT_ANSWER
TOKEN_DELAY_S = 0.002
ENGINES: list[AsyncLLMEngine] = []
_tokenizer: Any = None


def reset() -> None:
    """Back to the default answer and step time, no engines recorded."""
    global ANSWER, TOKEN_DELAY_S
    ANSWER = DEFAULT_ANSWER
    TOKEN_DELAY_S = 0.002
    ENGINES.clear()


def tokenizer() -> Any:
    """The stand-in model's tokenizer: chatstream's tiny test tokenizer (ChatML specials, eos ``</s>``)."""
    global _tokenizer
    if _tokenizer is None:
        from chatstream.testkit_models import make_tiny_tokenizer

        _tokenizer = make_tiny_tokenizer()
    return _tokenizer


@dataclass
class AsyncEngineArgs:
    """The engine arguments (a subset of vLLM's fields, same names and defaults)."""

    model: str = "facebook/opt-125m"
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    trust_remote_code: bool = False
    quantization: str | None = None
    enable_prefix_caching: bool | None = None
    kv_cache_dtype: str = "auto"
    enable_log_requests: bool = False


@dataclass
class _Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    aborted: bool = False
    steps: int = 0  # tokens generated


@dataclass
class AsyncLLMEngine:
    """Generates :data:`ANSWER` token by token for every request, like a model that knows one reply."""

    args: AsyncEngineArgs
    requests: dict[str, _Request] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    shut_down: bool = False

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs) -> AsyncLLMEngine:
        engine = cls(engine_args)
        ENGINES.append(engine)
        return engine

    async def get_tokenizer(self) -> Any:
        return tokenizer()

    def shutdown(self) -> None:
        self.shut_down = True

    async def abort(self, request_id: str) -> None:
        """Abort a request; a finished or unknown one is a no-op."""
        self.aborted.append(request_id)
        request = self.requests.get(request_id)
        if request is not None and request_id in self.running:
            request.aborted = True

    async def generate(
        self, prompt: dict[str, Any], sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.shut_down:
            raise RuntimeError("the engine is shut down")
        if request_id in self.running:
            raise ValueError(f"Request id {request_id} already running.")
        ids = list(prompt["prompt_token_ids"])
        limit = self.args.max_model_len
        if limit is not None and len(ids) >= limit:
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of {limit}."
            )
        request = _Request(ids, sampling_params)
        self.requests[request_id] = request
        self.running.add(request_id)
        try:
            async for output in self._steps(request_id, request):
                yield output
        finally:
            self.running.discard(request_id)

    async def _steps(self, request_id: str, request: _Request) -> AsyncIterator[RequestOutput]:
        params = request.params
        tok = tokenizer()
        script = [*tok(ANSWER, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        stops = list(params.stop or [])
        # vLLM holds back text that could still become a stop string, unless stop strings are shown.
        hold = 0 if params.include_stop_str_in_output else max((len(s) for s in stops), default=1) - 1
        generated: list[int] = []
        sent_text, sent_ids = "", 0
        delta = params.output_kind == RequestOutputKind.DELTA
        while True:
            await asyncio.sleep(TOKEN_DELAY_S)
            if request.aborted:
                reason: str | None = "abort"
                text = sent_text
            else:
                token = script[min(len(generated), len(script) - 1)]
                generated.append(token)
                request.steps += 1
                reason = None
                shown = generated
                if token == tok.eos_token_id and not params.ignore_eos:
                    reason, shown = "stop", generated[:-1]  # EOS ends the sequence, its text is left out
                elif params.max_tokens is not None and len(generated) >= params.max_tokens:
                    reason = "length"
                text = tok.decode(shown, skip_special_tokens=params.skip_special_tokens)
                text = text.rstrip(REPLACEMENT_CHAR)  # an incomplete character waits for its bytes
                found = [i for i in (text.find(s) for s in stops) if i >= 0]
                if found:
                    reason = "stop"
                    text = text[: min(found)]
                if reason is None and hold:
                    text = text[: max(len(sent_text), len(text) - hold)]
            finished = reason is not None
            if delta:
                out_text, out_ids = text[len(sent_text) :], generated[sent_ids:]
            else:
                out_text, out_ids = text, list(generated)
            sent_text, sent_ids = text, len(generated)
            completion = CompletionOutput(0, out_text, out_ids, reason)
            yield RequestOutput(request_id, request.prompt_token_ids, [completion], finished)
            if finished:
                return
