"""Sampling checks for engines whose runtime samples by itself (OpenVINO GenAI, vLLM).

Such a runtime runs only the sampling steps it implements, so a logits pipeline step it cannot run
(a third-party processor, a penalty window, a penalty counting other tokens than the runtime's) is
refused at start-up, and a request asking for a penalty rule it lacks is refused with a
``ValueError`` (a 400), each message naming the setting and the way out; nothing is dropped
silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from .options import PluginOptions
from .types import EngineConfig, GenerationParams, RowInfo

# What these runtimes' samplers implement, by the name of the chatstream processor each replaces.
SUPPORTED_STEPS = ("repetition", "frequency", "presence", "temperature", "top_k", "top_p", "min_p")
# They count the prompt for the repetition penalty and only generated tokens for frequency and
# presence (OpenAI's rule); a chatstream penalty configured otherwise cannot be served there.
INCLUDES_PROMPT = {"repetition": True, "frequency": False, "presence": False}


class UnsupportedSamplingError(ValueError):
    """A sampling step or parameter the engine's runtime cannot run; the message names it."""


class RuntimeSamplingOptions(PluginOptions):
    """The option every engine whose runtime samples by itself takes (mixed into its options model)."""

    pipeline: list[str] | None = Field(
        None,
        description="the sampling.pipeline step names, when the logits pipeline builder cannot tell "
        "them (a third-party builder); unset: read from the builder",
    )


@dataclass(frozen=True)
class Runtime:
    """How messages name an engine and its runtime: ``Runtime("openvino", "OpenVINO GenAI", "GenAI")``."""

    engine: str  # the engine (and plugin_config section) name
    title: str  # the runtime's full name
    short: str  # the runtime's short name

    def check_pipeline(self, config: EngineConfig, pipeline: Sequence[str] | None = None) -> frozenset[str]:
        """:func:`check_pipeline` for this runtime."""
        return check_pipeline(config, self, pipeline)

    def check_params(self, params: GenerationParams) -> None:
        """:func:`check_params` for this runtime."""
        check_params(params, self)


def pipeline_steps(
    config: EngineConfig, pipeline: Sequence[str] | None = None
) -> list[tuple[str, dict[str, Any]]] | None:
    """The operator's ``sampling.pipeline`` as ``(name, options)``, or None when there is none.

    Taken from ``pipeline`` (the engine's ``pipeline`` option) when given, else read from the
    builder made by :func:`chatstream.pipeline.make_pipeline_builder` (it keeps its checked ``steps``).
    """
    if pipeline is not None:
        return [(name, {}) for name in pipeline]
    build = config.build_pipeline
    if build is None:
        return None
    steps = getattr(build, "steps", None)
    if steps is None:
        return []  # a builder that does not list its steps: probed in check_pipeline
    return [(name, dict(options)) for name, options in steps]


def check_pipeline(
    config: EngineConfig, runtime: Runtime, pipeline: Sequence[str] | None = None
) -> frozenset[str]:
    """The sampling steps the runtime will run (``pipeline``: the engine's ``pipeline`` option);
    ``UnsupportedSamplingError`` for any it cannot."""
    steps = pipeline_steps(config, pipeline)
    if steps is None:
        return frozenset(SUPPORTED_STEPS)
    engine = runtime.engine
    if not steps and config.build_pipeline is not None:
        # A builder we cannot read: a neutral greedy row must need no processor at all.
        probe = config.build_pipeline(
            [RowInfo(params=GenerationParams(temperature=0, top_k=0), prompt_len=1)]
        )
        if probe:
            names = ", ".join(type(p).__name__ for p in probe)
            raise UnsupportedSamplingError(
                f"the logits pipeline runs {names}, which {runtime.title} cannot run; set "
                f"plugin_config.{engine}.pipeline to the sampling.pipeline names, "
                "or use engine 'transformers'"
            )
        return frozenset(SUPPORTED_STEPS)
    for name, options in steps:
        if name not in SUPPORTED_STEPS:
            raise UnsupportedSamplingError(
                f"sampling.pipeline step {name!r} cannot run on the '{engine}' engine ({runtime.title} "
                f"samples inside its own runtime and supports only {', '.join(SUPPORTED_STEPS)}); "
                f"remove {name!r} from sampling.pipeline or use engine 'transformers'"
            )
        if options.get("window") is not None:
            raise UnsupportedSamplingError(
                f"sampling.processors.{name}.window={options['window']!r} cannot run on the '{engine}' "
                f"engine ({runtime.short} penalises the whole history): remove the option or use "
                "engine 'transformers'"
            )
        include = options.get("include_prompt")
        if include is not None and include != INCLUDES_PROMPT.get(name, include):
            raise UnsupportedSamplingError(
                f"sampling.processors.{name}.include_prompt={include!r} cannot run on the '{engine}' "
                f"engine ({runtime.short}'s {name} penalty {'counts' if not include else 'does not count'} "
                "the prompt): remove the option or use engine 'transformers'"
            )
    return frozenset(name for name, _ in steps)


def check_params(params: GenerationParams, runtime: Runtime) -> None:
    """Refuse parameters the runtime cannot honour (an ``UnsupportedSamplingError`` naming them)."""
    rules = (
        ("repetition", "multiplicative", "repetition penalty divides positive logits"),
        ("frequency", "subtractive", "frequency penalty is OpenAI's subtractive rule"),
        ("presence", "subtractive", "presence penalty is OpenAI's subtractive rule"),
    )
    for name, method, why in rules:
        value = getattr(params, f"{name}_penalty")
        used = getattr(params, f"{name}_penalty_method")
        if value is not None and used != method:
            raise UnsupportedSamplingError(
                f"{name}_penalty_method={used!r} is not supported by the '{runtime.engine}' engine "
                f"({runtime.short}'s {why}); use {name}_penalty_method={method!r} "
                "or the 'transformers' engine"
            )
