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

Modules: :mod:`.engine` (the engine), :mod:`.sampling` (``SamplingParams`` for chatstream's
parameters), :mod:`.options`. Plugin options (``plugin_config.vllm``, env
``CHATSTREAM_PLUGIN_CONFIG__VLLM__<KEY>``, :class:`.options.VLLMOptions`):
``dtype`` (default ``auto``), ``gpu_memory_utilization`` (share of GPU memory vLLM may take for
weights and KV cache, default 0.9), ``tokenizer`` (a tokenizer path or hub id when the model's own
is not wanted), ``engine_args`` (a table of further ``AsyncEngineArgs`` fields, e.g.
``tensor_parallel_size``, ``quantization``, ``enforce_eager``, ``enable_prefix_caching``),
``pipeline`` (the ``sampling.pipeline`` names, when the builder cannot tell them).
Prefix caching is on (``enable_prefix_caching = true`` unless ``engine_args`` says otherwise), so a
conversation's next turn reuses the KV blocks of its history.
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.types import EngineConfig

from .engine import ENGINE_NAME, INSTALL_HINT, VLLMEngine, VLLMNotInstalledError, import_vllm
from .options import VLLMOptions
from .sampling import RUNTIME, sampling_kwargs

__all__ = [
    "ENGINE_NAME",
    "INSTALL_HINT",
    "RUNTIME",
    "VLLMEngine",
    "VLLMNotInstalledError",
    "VLLMOptions",
    "create_engine",
    "import_vllm",
    "sampling_kwargs",
]


def create_engine(config: EngineConfig) -> VLLMEngine:
    """The engine factory registered as ``vllm``; imports vLLM."""
    return VLLMEngine(config)


@hookimpl
def register_engines(register: Callable[..., None]) -> None:
    """Register the ``vllm`` engine."""
    register(ENGINE_NAME, create_engine, options=VLLMOptions)
