"""A stand-in for the part of vLLM's Python API that chatstream's ``vllm`` engine uses.

For tests only, on machines without vLLM (it needs a GPU build). It follows vLLM's documented
behaviour: ``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))``, ``generate(prompt,
sampling_params, request_id)`` yielding ``RequestOutput`` objects (cumulative text and ids by
default, only the new ones with ``RequestOutputKind.DELTA``), ``finish_reason`` ``"stop"`` (EOS or
a stop string, which is left out of the text) or ``"length"``, ``abort(request_id)``, and
``SamplingParams`` checked as vLLM checks them. The "model" answers every prompt with the text in
:mod:`vllm._standin` one token per step, then EOS; that module also records what the engine was
asked, for the tests to read.
"""

from vllm._standin import AsyncEngineArgs, AsyncLLMEngine
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__all__ = [
    "AsyncEngineArgs",
    "AsyncLLMEngine",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "TokensPrompt",
]
