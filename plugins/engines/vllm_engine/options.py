"""``plugin_config.vllm``: the vLLM engine's options."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from chatstream.runtime_sampling import RuntimeSamplingOptions

# Engine arguments chatstream sets itself, and where the operator sets them instead.
_OWN_ARGS = {
    "model": "the model setting (CHATSTREAM_MODEL or --model)",
    "max_num_seqs": "num_of_concurrent_executions (CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS)",
    "max_model_len": "context_len (CHATSTREAM_CONTEXT_LEN)",
    "dtype": "plugin_config.vllm.dtype",
    "gpu_memory_utilization": "plugin_config.vllm.gpu_memory_utilization",
    "tokenizer": "plugin_config.vllm.tokenizer",
}


class VLLMOptions(RuntimeSamplingOptions):
    """vLLM's own engine arguments chatstream passes on, and the sampling ``pipeline``."""

    dtype: str = Field("auto", min_length=1, description="weights dtype: auto, bfloat16, float16 or float32")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of GPU memory vLLM may take for weights and KV cache"
    )
    tokenizer: str | None = Field(
        None, min_length=1, description="a tokenizer path or hub id, when the model's own is not wanted"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="further AsyncEngineArgs fields, e.g. tensor_parallel_size, quantization, "
        "enforce_eager, enable_prefix_caching (`vllm serve --help` lists them, with - as _)",
    )

    @field_validator("engine_args")
    @classmethod
    def _not_chatstream_own(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if name in _OWN_ARGS:
                raise ValueError(f"{name} is set by chatstream: use {_OWN_ARGS[name]} instead")
        return value
