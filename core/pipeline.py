"""The logits pipeline: composed once from settings, applied every step, then a token is picked.

``make_pipeline_builder`` checks ``sampling.pipeline`` and ``sampling.processors`` at start-up
and returns the ``build(rows)`` function engines receive. ``apply_pipeline`` runs the processors
in order; ``sample_next_tokens`` picks each row's next token (argmax for greedy rows, a draw
from the softmax otherwise, seeded rows with their own generator). ``clamp_params`` holds a
request's parameters to the operator's ``SamplingLimits``.

torch is imported inside functions so that importing this module stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel

from .plugin_manager import PluginError
from .registry import Contribution, registry
from .settings import SamplingLimits, SamplingSettings, SettingsError
from .types import GenerationParams, LogitsProcessor, PipelineBuilder, RowInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "SamplingLimits",
    "apply_pipeline",
    "clamp_params",
    "make_generator",
    "make_pipeline_builder",
    "processor_registry",
    "sample_next_tokens",
]


def processor_registry(pm: pluggy.PluginManager | None = None) -> dict[str, Contribution[Any]]:
    """Every registered logits processor factory by name (from the process-wide plugins by default)."""
    if pm is None:
        from .plugin_manager import get_plugin_manager

        pm = get_plugin_manager()
    return registry(pm, "logits_processors")


def make_pipeline_builder(
    sampling: SamplingSettings, processors: Mapping[str, Contribution[Any]]
) -> PipelineBuilder:
    """Check the sampling settings against the known processors and return ``build(rows)``.

    ``build(rows)`` returns the processors the batch needs, in ``sampling.pipeline`` order; a
    processor no row needs (its factory returned None) is left out. Every factory is also called
    once here with no rows, so that bad operator options fail at start-up, not on a request.
    Raises ``SettingsError`` naming the setting and the fix.
    """
    known = ", ".join(sorted(processors)) or "(none)"
    unknown = [name for name in sampling.pipeline if name not in processors]
    if unknown:
        raise SettingsError(
            f"setting 'sampling.pipeline' names unknown logits processor(s) {', '.join(map(repr, unknown))}; "
            f"known: {known}. Fix sampling.pipeline in the settings file or CHATSTREAM_SAMPLING__PIPELINE "
            '(a JSON list, e.g. \'["repetition", "temperature", "top_k"]\'), or install the plugin that '
            "provides the processor"
        )
    repeated = sorted({name for name in sampling.pipeline if sampling.pipeline.count(name) > 1})
    if repeated:
        raise SettingsError(
            f"setting 'sampling.pipeline' names {', '.join(map(repr, repeated))} more than once; "
            "name each processor once (CHATSTREAM_SAMPLING__PIPELINE)"
        )
    stray = sorted(set(sampling.processors) - set(sampling.pipeline))
    if stray:
        raise SettingsError(
            f"setting 'sampling.processors' has options for {', '.join(map(repr, stray))}, which "
            f"'sampling.pipeline' does not run (it runs: {', '.join(sampling.pipeline) or '(nothing)'}); "
            "add the processor to sampling.pipeline or remove its options "
            "(CHATSTREAM_SAMPLING__PROCESSORS)"
        )
    steps: list[tuple[str, Any, Any, str]] = []
    for name in sampling.pipeline:
        contribution = processors[name]
        # Typed options (an options model) are validated here, with errors naming the option.
        options = contribution.parse_options(sampling.processors.get(name))
        try:
            contribution.obj([], _fresh(options))
        except (ValueError, TypeError) as exc:
            raise SettingsError(
                f"setting 'sampling.processors.{name}' is invalid for processor {name!r} "
                f"(from plugin {contribution.plugin!r}): {exc}; "
                f"set it with CHATSTREAM_SAMPLING__PROCESSORS__{name.upper()} or --config"
            ) from None
        steps.append((name, contribution.obj, options, contribution.plugin))

    def build(rows: Sequence[RowInfo]) -> list[LogitsProcessor]:
        """The processors this batch needs, in the configured order."""
        built: list[LogitsProcessor] = []
        for name, factory, options, plugin in steps:
            processor = factory(rows, _fresh(options))
            if processor is None:
                continue
            if not callable(processor):
                raise PluginError(
                    f"the factory of logits processor {name!r} (plugin {plugin!r}) returned "
                    f"{type(processor).__name__}, not a processor or None"
                )
            built.append(processor)
        return built

    # Engines that cannot run arbitrary processors (OpenVINO GenAI) read the names and options.
    build.steps = tuple(  # type: ignore[attr-defined]
        (name, options.model_dump() if isinstance(options, BaseModel) else dict(options))
        for name, _factory, options, _plugin in steps
    )
    return build


def _fresh(options: Any) -> Any:
    """Options for one factory call: a model as it is (frozen), a dict copied."""
    return options if isinstance(options, BaseModel) else dict(options)


def apply_pipeline(
    processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """Run ``processors`` in order over one step's ``scores`` ([batch, vocab])."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def make_generator(seed: int, device: str | torch.device | None = None) -> torch.Generator:
    """A random generator on ``device`` seeded with ``seed``: one per seeded request."""
    import torch

    generator = torch.Generator(device=device or "cpu")
    generator.manual_seed(seed)
    return generator


def sample_next_tokens(
    scores: torch.Tensor,
    rows: Sequence[RowInfo],
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.LongTensor:
    """Each row's next token: argmax for greedy rows (temperature 0), else a draw from softmax(scores).

    The draw is the exponential race ``argmax(probs / q)`` with ``q ~ Exp(1)`` per token, which
    picks token i with probability ``probs[i]`` and never picks a ``-inf`` logit. A row with a
    generator draws its ``q`` from it alone, over its own surviving tokens in vocabulary order,
    so a seeded request gets the same tokens whatever else is in the batch.
    """
    import torch

    batch, vocab = scores.shape
    if len(rows) != batch:
        raise ValueError(f"sample_next_tokens got {len(rows)} rows for scores with {batch} rows")
    if generators is not None and len(generators) != batch:
        raise ValueError(f"sample_next_tokens got {len(generators)} generators for {batch} rows")
    # A NaN score (a processor that divided by zero) must never win: it counts as -inf.
    scores = torch.nan_to_num(scores, nan=-torch.inf)
    tokens = scores.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    seeded = [i for i in sampled if generators is not None and generators[i] is not None]
    free = [i for i in sampled if generators is None or generators[i] is None]
    tiny = torch.finfo(torch.float32).tiny  # exponential_ may return 0, and 0/0 would be nan
    if free:
        whole = len(free) == batch
        index = torch.tensor(free, device=scores.device)
        picked = scores if whole else scores[index]
        # After top-k/top-p most tokens are -inf: racing only the survivors saves a softmax term
        # and a random number per vocabulary entry (one host sync to learn how many survive).
        survivors = max(int(torch.isfinite(picked).sum(dim=-1).max().item()), 1)
        candidates = None
        if survivors <= vocab // 2:
            picked, candidates = picked.topk(survivors, dim=-1)
        probs = picked.float().softmax(dim=-1)
        race = torch.empty_like(probs).exponential_().clamp_(min=tiny)
        choice = (probs / race).argmax(dim=-1, keepdim=True)
        if candidates is not None:
            choice = candidates.gather(1, choice)
        if whole:
            tokens = choice.squeeze(1)
        else:
            tokens[index] = choice.squeeze(1)
    for i in seeded:
        generator = generators[i]  # type: ignore[index]
        row_scores = scores[i]
        keep = torch.isfinite(row_scores).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue  # nothing can be sampled; keep the argmax
        probs = row_scores[keep].float().softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=tiny)
        tokens[i] = keep[(probs / race).argmax()]
    return tokens  # type: ignore[return-value]


def clamp_params(params: GenerationParams, limits: SamplingLimits | Mapping[str, Any]) -> GenerationParams:
    """``params`` held within ``limits``; values inside the limits are kept as they are."""
    if not isinstance(limits, SamplingLimits):
        limits = SamplingLimits(**limits)
    changes: dict[str, Any] = {}
    if limits.max_new_tokens is not None and params.max_new_tokens > limits.max_new_tokens:
        changes["max_new_tokens"] = limits.max_new_tokens
    if limits.max_temperature is not None and params.temperature > limits.max_temperature:
        changes["temperature"] = limits.max_temperature
    if limits.max_top_k is not None and (params.top_k == 0 or params.top_k > limits.max_top_k):
        changes["top_k"] = limits.max_top_k
    if limits.max_penalty is not None:
        cap = limits.max_penalty
        for name in ("repetition", "frequency", "presence"):
            value = getattr(params, f"{name}_penalty")
            if value is None:
                continue
            low = 1.0 / cap if getattr(params, f"{name}_penalty_method") == "multiplicative" else -cap
            held = min(max(value, low), cap)
            if held != value:
                changes[f"{name}_penalty"] = held
    return params.model_copy(update=changes) if changes else params
