"""The ``openvino`` engine: OpenVINO GenAI's continuous batching, a fast CPU (and Intel GPU) path.

Models: an OpenVINO IR directory (``openvino_model.xml`` with its converted tokenizer, as made by
``chatstream export-openvino``, :mod:`.export`) or a ``.gguf`` file, which GenAI reads directly; no
model serves the embedded SmolLM2 GGUF. ``openvino_genai`` is imported only when the engine starts.

One background thread owns the ``ContinuousBatchingPipeline`` (:mod:`.engine`, on
:mod:`chatstream.step_loop`) and hands each request's new token ids to the request's own
coroutine, which detokenizes (GenAI's tokenizer, :mod:`.tokenizer`) and applies stop strings as
in the ``transformers`` engine, so stop strings, Unicode safety and token counts behave the same.
A request whose consumer went away (or that hit a stop string) is cancelled in GenAI at the next
step, which frees its KV blocks.

Sampling runs inside GenAI (:mod:`.generation`), so only what GenAI implements can be served: the
operator's ``sampling.pipeline`` is checked at start-up and a step GenAI cannot run (a third-party
logits processor, a penalty option it has no equivalent for) is refused with a message naming it;
a request asking for something GenAI cannot do (a subtractive repetition penalty, a multiplicative
frequency or presence penalty) is refused with a ``ValueError`` naming the parameter.

Options (``plugin_config.openvino``, :class:`.options.OpenVINOOptions`): ``device``,
``inference_precision``, ``kv_cache_gb``, ``prefix_cache`` (on: finished turns' KV blocks stay
in the KV cache, so a conversation's next turn prefills only its new tokens), ``num_threads``,
``pipeline``, and the recording options
``record_dir``/``record_top_logits`` (the recording keeps the token ids; GenAI gives no scores).
"""

from __future__ import annotations

from collections.abc import Callable

from chatstream.hookspecs import hookimpl
from chatstream.recording_engine import build_recorded
from chatstream.step_loop import EngineError
from chatstream.types import Engine, EngineConfig

from .engine import ENGINE_NAME, IR_FILE, OPTIONS_PATH, OpenVINOEngine, import_genai, resolve_model_path
from .export import (
    WEIGHT_FORMATS,
    _optimum_intel_installed,
    export_command,
    export_environment_commands,
    int4_group_size,
    register_commands,
)
from .generation import RUNTIME, generation_config
from .options import DEVICES, OpenVINOOptions
from .tokenizer import OpenVINOTokenizer

__all__ = [
    "DEVICES",
    "ENGINE_NAME",
    "IR_FILE",
    "RUNTIME",
    "WEIGHT_FORMATS",
    "EngineError",
    "OpenVINOEngine",
    "OpenVINOOptions",
    "OpenVINOTokenizer",
    "_optimum_intel_installed",
    "create_engine",
    "export_command",
    "export_environment_commands",
    "generation_config",
    "import_genai",
    "int4_group_size",
    "register_commands",
    "resolve_model_path",
]


def create_engine(config: EngineConfig) -> Engine:
    """The engine factory registered as ``openvino``: the engine, wrapped for recording when
    ``record_dir`` is set."""
    return build_recorded(OpenVINOEngine, config, OpenVINOOptions, OPTIONS_PATH)


@hookimpl
def register_engines(register: Callable[..., None]) -> None:
    """Register the ``openvino`` engine."""
    register(ENGINE_NAME, create_engine, options=OpenVINOOptions)
