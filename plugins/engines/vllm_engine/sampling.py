"""What vLLM is asked to sample: ``SamplingParams`` arguments for chatstream's parameters.

Sampling runs inside vLLM, so only what vLLM implements can be served (see
:mod:`chatstream.runtime_sampling`): only the steps the operator's ``sampling.pipeline`` runs apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatstream.runtime_sampling import Runtime
from chatstream.types import GenerationParams

RUNTIME = Runtime("vllm", "vLLM", "vLLM")


def sampling_kwargs(
    params: GenerationParams, steps: frozenset[str], max_tokens: int, stop: Sequence[str]
) -> dict[str, Any]:
    """The ``SamplingParams`` arguments for ``params``; only the steps the operator's pipeline runs apply.

    Special tokens stay in the text (as with chatstream's own detokenizer) so that a stop string
    such as ``<|im_end|>`` matches; vLLM leaves the stop string, and the EOS token, out of the text.
    """
    RUNTIME.check_params(params)
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
