"""The ``transformers`` engine: any Hugging Face causal LM, with continuous batching.

One background thread owns the model and runs a step loop (:mod:`chatstream.step_loop`); every
decode step is one forward pass over all active requests (:mod:`.engine`), whose KV caches share
one left-padded cache (:mod:`.batch`) or, with ``kv_cache = "slots"``, a preallocated one
(:mod:`.kv_cache`). Tokens travel to each request's own coroutine, which detokenizes and applies
stop strings, so the step loop does nothing per token but tensor work.

Options (``plugin_config.transformers``, :class:`.options.TransformersOptions`): ``kv_cache``
(``dynamic``, the default, or ``slots``: both give the same tokens; ``slots`` is the layout a
captured decode step needs, and on CPU it measured no faster). Models whose cache cannot be merged
(sliding-window or recurrent layers) run one request at a time, whatever the setting.

KV reuse across turns (``prefix_cache``, on by default; ``prefix_cache_mb``, ``prefix_cache_scope``):
each finished turn's KV cache is kept (:mod:`chatstream.prefix_cache`, least recently used evicted
within the budget); a new request whose prompt ids start with cached ids prefills only the rest and
joins the running batch like any newcomer. The structure is one LRU of whole sequences matched by
longest common prefix, not a block cache: a conversation's turns extend one entry (the new entry
replaces the old), and a system prompt shared by sessions is a prefix of every entry, so it is
reused without blocks; sequences shared only in part are stored twice, the price of simplicity.

Recording (``record_dir``, ``record_top_logits``, default 5): the factory wraps the engine in a
:class:`~chatstream.recording_engine.RecordingEngine`, which writes every request that finishes
(EOS, a stop string or a length limit) for the ``replay`` engine, with each step's sampled token
and top scores. Cancelled requests are not recorded.

A ``MockTransformer`` stand-in model (:mod:`chatstream.mock_transformer`) is handed to the
``replay`` engine of the registry, so switching a ChatStream to recorded answers is a one-line change.
"""

from __future__ import annotations

from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.recording_engine import build_recorded
from chatstream.step_loop import EngineError
from chatstream.types import Engine, EngineConfig

from .batch import _Batch, _merge, _Row
from .engine import ENGINE_NAME, OPTIONS_PATH, TransformersEngine
from .kv_cache import SlotKVCache
from .options import TransformersOptions

__all__ = [
    "ENGINE_NAME",
    "EngineError",
    "SlotKVCache",
    "TransformersEngine",
    "TransformersOptions",
    "_Batch",
    "_Row",
    "_merge",
    "create_engine",
]


def create_engine(config: EngineConfig) -> Engine:
    """The engine factory registered as ``transformers``: the engine, wrapped for recording when
    ``record_dir`` is set; the ``replay`` engine for a ``MockTransformer`` stand-in model."""
    from chatstream.mock_transformer import MockModel, stand_in_engine

    if isinstance(config.model, MockModel):
        stand_in: Engine = stand_in_engine(config)
        return stand_in
    return build_recorded(TransformersEngine, config, TransformersOptions, OPTIONS_PATH)


@hookimpl
def register_engines(register: Any) -> None:
    """Register the ``transformers`` engine."""
    register(ENGINE_NAME, create_engine, options=TransformersOptions)
