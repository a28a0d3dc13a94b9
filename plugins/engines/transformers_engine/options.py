"""``plugin_config.transformers``: the transformers engine's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from chatstream.recording_engine import RecordingOptions


class TransformersOptions(RecordingOptions):
    """The KV cache layout, KV reuse across turns, and the recording options (``record_dir``,
    ``record_top_logits``)."""

    kv_cache: Literal["dynamic", "slots"] = Field(
        "dynamic",
        description="KV cache layout: 'dynamic' grows one left-padded cache with the batch; 'slots' "
        "preallocates a context_len cache row per batch slot at start-up (the same tokens)",
    )
    prefix_cache: bool = Field(
        True,
        description="keep each finished turn's KV cache; a prompt that starts with cached token ids "
        "prefills only the rest (the same tokens come out)",
    )
    prefix_cache_mb: float = Field(
        512, gt=0, description="memory (MiB) the kept KV caches may take; the least recently used go first"
    )
    prefix_cache_scope: Literal["shared", "session"] = Field(
        "shared",
        description="'shared': a request reuses any cached prefix, another session's too (a common "
        "system prompt is computed once); 'session': only its own session's (no timing side channel)",
    )
