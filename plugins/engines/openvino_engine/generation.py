"""What OpenVINO GenAI is asked to generate: its ``GenerationConfig`` for chatstream's parameters.

Sampling runs inside GenAI, so only what GenAI implements can be served (see
:mod:`chatstream.runtime_sampling`): only the steps the operator's ``sampling.pipeline`` runs apply.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from chatstream.runtime_sampling import Runtime
from chatstream.types import GenerationParams

RUNTIME = Runtime("openvino", "OpenVINO GenAI", "GenAI")


def generation_config(
    genai: Any, params: GenerationParams, steps: frozenset[str], max_new_tokens: int, eos_ids: Sequence[int]
) -> Any:
    """GenAI's ``GenerationConfig`` for ``params``; only the steps the operator's pipeline runs apply."""
    RUNTIME.check_params(params)
    config = genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.stop_token_ids = set(eos_ids)
    if "repetition" in steps and params.repetition_penalty is not None:
        config.repetition_penalty = params.repetition_penalty
    if "frequency" in steps and params.frequency_penalty is not None:
        config.frequency_penalty = params.frequency_penalty
    if "presence" in steps and params.presence_penalty is not None:
        config.presence_penalty = params.presence_penalty
    if params.greedy:
        config.do_sample = False
        return config
    config.do_sample = True
    config.temperature = params.temperature if "temperature" in steps else 1.0
    if "top_k" in steps and params.top_k > 0:
        config.top_k = params.top_k
    if "top_p" in steps:
        config.top_p = params.top_p
    if "min_p" in steps and params.min_p > 0:
        config.min_p = params.min_p
    # GenAI seeds every request with 0 by default: unseeded requests would all draw alike.
    config.rng_seed = params.seed if params.seed is not None else random.getrandbits(31)
    return config
