"""The transformers engine's step loop: prefill newcomers, one batched decode step, finish rows.

Every decode step is ONE forward pass over all active requests: their KV caches live side by side
in one left-padded ``DynamicCache`` (an attention mask hides each row's padding; explicit
``position_ids`` keep every row's positions its own), or in a :class:`~.kv_cache.SlotKVCache` with
``kv_cache = "slots"``. A new request is prefilled on its own (requests with equal prompt lengths
together), gets its first token at once, and its cache is padded and concatenated into the running
batch; a finished or cancelled request is sliced out at once. Per-request sampling goes through
the logits pipeline built for the batch's current rows, then ``chatstream.pipeline``'s sampler.
The thread, queue, cancellation, errors and streaming are :class:`~chatstream.step_loop.StepLoopEngine`'s.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from chatstream.engine_queue import deliver
from chatstream.options import parse_options
from chatstream.prefix_cache import MIN_REUSE, Hit, PrefixCache
from chatstream.step_loop import StepLoopEngine
from chatstream.tokenization import HFPromptEncoder
from chatstream.types import EngineConfig, FinishReason, LogitsProcessor, Segment

from .batch import _Batch, _keep_rows, _merge, _Row
from .kv_cache import SlotKVCache, cache_is_mergeable, cache_of
from .options import TransformersOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
OPTIONS_PATH = "plugin_config.transformers"

_REASON_CODES = (None, FinishReason.STOP, FinishReason.LENGTH)


class TransformersEngine(StepLoopEngine[_Row]):
    """Serves a Hugging Face causal LM to many concurrent requests with continuous batching.

    Recording (``record_dir``) is applied by the registered factory (``create_engine``), which
    wraps this engine in a :class:`~chatstream.recording_engine.RecordingEngine`.
    """

    name = ENGINE_NAME
    row_type = _Row

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if config.model is not None and config.tokenizer is None:
            raise ValueError("EngineConfig.tokenizer is required when EngineConfig.model is given")
        self.options = parse_options(TransformersOptions, config.options, OPTIONS_PATH)
        self.options.refuse_recording(OPTIONS_PATH)
        self.model: Any = config.model
        self.tokenizer: Any = config.tokenizer
        self.device: Any = None
        self.eos_token_ids: list[int] = []
        self._prefill_kwargs: dict[str, Any] = {}
        self._cache_arg = "past_key_values"
        self._batchable = True
        self._eos: Any = None
        self._slots: SlotKVCache | None = None
        self._batch: _Batch | None = None
        # Finished turns' KV caches: per layer (keys, values), each [1, heads, positions, dim].
        self._prefix: PrefixCache[tuple[tuple[Any, Any], ...]] | None = (
            PrefixCache(int(self.options.prefix_cache_mb * 2**20)) if self.options.prefix_cache else None
        )
        self._sample: Any = None  # chatstream.pipeline's sampler, bound once torch is wanted
        self._make_generator: Any = None

    # -- loading ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = self._load()
        self._prepare()

    def _load(self) -> tuple[Any, Any]:
        from chatstream.loadtime import LoadTime
        from chatstream.models import load_model_and_tokenizer, model_display_name

        path = self.config.model_path
        model, tokenizer = LoadTime(
            name=model_display_name(path),
            fn=lambda: load_model_and_tokenizer(path, self.config.device),
        )()
        if self.config.tokenizer is not None:
            tokenizer = self.config.tokenizer
        return model, tokenizer

    def _prepare(self) -> None:
        """Device, EOS ids, context length and forward options, worked out once."""
        import torch

        from chatstream.models import resolve_device
        from chatstream.pipeline import make_generator, sample_next_tokens

        self._sample, self._make_generator = sample_next_tokens, make_generator
        model = self.model
        if self.config.device is not None:
            self.device = torch.device(resolve_device(self.config.device))
            if model.device != self.device:
                model.to(self.device)
        else:
            self.device = model.device
        model.eval()
        self.eos_token_ids = _eos_token_ids(model, self.tokenizer)
        self._eos = torch.tensor(self.eos_token_ids or [-1], device=self.device)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and max_positions > 0:
            self.context_len = min(self.config.context_len, max_positions)
        accepted = inspect.signature(model.forward).parameters
        if "logits_to_keep" in accepted:
            self._prefill_kwargs["logits_to_keep"] = 1
        # transformers 5.2x names the KV cache argument ``cache`` (``past_key_values`` before).
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._batchable = cache_is_mergeable(model)
        if self.options.kv_cache == "slots" and self._batchable:
            self._slots = SlotKVCache.for_model(model, self.max_batch_size, self.context_len, self.device)
        if not self._batchable:
            self._prefix = None  # its cache layers cannot be sliced and resumed
            log.warning(
                "%s uses a KV cache that cannot be padded and merged (sliding window or recurrent "
                "layers): requests run one at a time",
                type(model).__name__,
            )

    @property
    def kv_cache_layout(self) -> str:
        """``slots`` or ``dynamic``: the layout in use once started."""
        return "slots" if self._slots is not None else "dynamic"

    @property
    def model_name(self) -> str:
        """The model's path or name (what a recording names)."""
        model = self.model
        name = (
            self.config.model_path
            or getattr(model, "name_or_path", None)
            or getattr(getattr(model, "config", None), "name_or_path", None)
        )
        return str(name) if name else type(model).__name__

    # -- prompts ----------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        """Prompt token ids. Special-token strings in template text (``<|im_start|>``) are control
        tokens; in message content (``Segment.content``) they are plain text. A string is all template.
        """
        if self.tokenizer is None:
            raise RuntimeError("the engine has no tokenizer yet: await engine.start() first")
        if add_special_tokens is None:
            add_special_tokens = self.config.add_special_tokens
        return HFPromptEncoder.of(self.tokenizer).encode(prompt, add_special_tokens)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` encodes to as a prompt."""
        return len(self.encode(text))

    def _prepare_row(self, row: _Row, room: int) -> None:
        if row.params.seed is not None:
            row.generator = self._make_generator(row.params.seed, self.device)

    # -- the step loop (background thread) --------------------------------------------------------
    def _step_context(self) -> AbstractContextManager[Any]:
        import torch

        return torch.inference_mode()

    def _running_count(self) -> int:
        return len(self._batch.rows) if self._batch is not None else 0

    def _release(self) -> list[_Row]:
        rows = self._batch.rows if self._batch is not None else []
        self._batch = None
        return rows

    def _step(self) -> None:
        if self._batch is not None:
            # A row its consumer stopped (a stop string, a client that left) still computed valid KV.
            self._remember(self._batch, [i for i, row in enumerate(self._batch.rows) if row.cancelled])
            self._batch = _keep_rows(
                self._batch, [not row.cancelled for row in self._batch.rows], self._slots
            )
        width = self._running_count()
        # Caches that cannot be merged run one request at a time.
        room = self.max_batch_size - width if self._batchable else int(width == 0)
        if room > 0 and self._waiting:
            self._batch = self._admit(self._batch, self._take_waiting(room))
        if self._batch is not None:
            self._batch = self._decode_step(self._batch)

    def _forward(self, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if "past_key_values" in kwargs and self._cache_arg != "past_key_values":
            kwargs[self._cache_arg] = kwargs.pop("past_key_values")
        out = self.model(use_cache=True, return_dict=True, **kwargs)
        return out.logits[:, -1, :].float(), cache_of(out)

    def _pipeline(self, rows: Sequence[_Row]) -> list[LogitsProcessor]:
        build = self.config.build_pipeline
        return list(build([row.info for row in rows])) if build is not None else []

    def _choose(
        self,
        rows: Sequence[_Row],
        processors: list[LogitsProcessor],
        generators: list[Any],
        history: torch.Tensor,
        scores: torch.Tensor,
    ) -> torch.Tensor:
        for processor in processors:
            scores = processor(history, scores)
        tokens: torch.Tensor = self._sample(
            scores, [row.info for row in rows], generators if any(generators) else None
        )
        if any(row.trace is not None for row in rows):
            _trace_steps(rows, scores, tokens)
        return tokens

    def _admit(self, batch: _Batch | None, rows: list[_Row]) -> _Batch | None:
        """Prefill newcomers, emit their first token, join them to the batch. Rows whose prompt
        starts with a cached prefix prefill only the rest, together; the others together."""
        fresh: list[_Row] = []
        resumed: list[tuple[_Row, Hit[Any]]] = []
        for row in rows:
            hit = self._lookup(row)
            if hit is None:
                fresh.append(row)
            else:
                resumed.append((row, hit))
        if fresh:
            batch = self._join(batch, fresh, *self._prefill(fresh))
        if resumed:
            batch = self._join(batch, [row for row, _ in resumed], *self._resume(resumed))
        return batch

    def _prefill(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """``(ids, mask, logits, cache)`` of the rows' prompts, in one left-padded forward pass."""
        import torch

        size = len(rows)
        length = max(len(row.prompt_ids) for row in rows)
        ids = torch.full((size, length), -1, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, length - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            row.cached_tokens = 0
        mask = (ids >= 0).long()
        if bool(mask.all()):
            logits, cache = self._forward(input_ids=ids, **self._prefill_kwargs)
        else:
            # Padding reads as token 0 with its own positions clamped at 0; the mask hides it.
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits, cache = self._forward(
                input_ids=ids.clamp(min=0),
                attention_mask=mask,
                position_ids=positions,
                **self._prefill_kwargs,
            )
            for layer in cache.layers:
                # Zero the padding's keys/values so nothing but finite numbers sits under the mask.
                hide = mask[:, None, :, None] == 0
                layer.keys = layer.keys.masked_fill(hide, 0)
                layer.values = layer.values.masked_fill(hide, 0)
        return ids, mask, logits, cache

    # -- KV reuse across turns ----------------------------------------------------------------------
    def _lookup(self, row: _Row) -> Hit[Any] | None:
        """The cached prefix this row's prompt starts with (at least one prompt token is left to
        compute, for the first token's logits), or None."""
        if self._prefix is None:
            return None
        confined = self.options.prefix_cache_scope == "session"
        if confined and row.cache_scope is None:
            return None  # no session to confine it to: never shared
        hit = self._prefix.lookup(row.prompt_ids, row.cache_scope, confined=confined)
        if hit is None:
            return None
        length = min(hit.length, len(row.prompt_ids) - 1)
        return Hit(hit.entry, length) if length >= MIN_REUSE else None

    def _resume(
        self, resumed: list[tuple[_Row, Hit[Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """``(ids, mask, logits, cache)`` of the rows' prompts in one forward pass that computes only
        what follows each row's cached prefix.

        Row ``i``'s cache is its kept prefix, left-padded to the longest; its new tokens follow,
        left-padded to the longest rest, so every row's last token is in the last column. The
        padding (before the prefix and between prefix and rest) is masked out and zeroed; explicit
        positions keep every token at its own position.
        """
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        width = max(hit.length for _, hit in resumed)
        rest = max(len(row.prompt_ids) - hit.length for row, hit in resumed)
        size, device = len(resumed), self.device
        inputs = torch.zeros((size, rest), dtype=torch.long, device=device)
        positions = torch.zeros((size, rest), dtype=torch.long, device=device)
        mask = torch.zeros((size, width + rest), dtype=torch.long, device=device)
        for i, (row, hit) in enumerate(resumed):
            new = row.prompt_ids[hit.length :]
            inputs[i, rest - len(new) :] = torch.tensor(new, device=device)
            positions[i, rest - len(new) :] = torch.arange(hit.length, len(row.prompt_ids), device=device)
            mask[i, width - hit.length : width] = 1
            mask[i, width + rest - len(new) :] = 1
            row.cached_tokens = hit.length
        cache = DynamicCache()
        for layer in range(len(resumed[0][1].entry.value)):
            parts = []
            for part in (0, 1):  # keys, values
                kept = [hit.entry.value[layer][part][:, :, : hit.length] for _, hit in resumed]
                parts.append(torch.cat([F.pad(k, (0, 0, width - k.shape[2], 0)) for k in kept]))
            cache.update(parts[0], parts[1], layer)  # copies: the kept entries stay as they are
        logits, cache = self._forward(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            **self._prefill_kwargs,
        )
        hide = mask[:, None, :, None] == 0
        for layer in cache.layers:
            layer.keys = layer.keys.masked_fill(hide, 0)
            layer.values = layer.values.masked_fill(hide, 0)
        length = max(len(row.prompt_ids) for row, _ in resumed)
        ids = torch.full((size, length), -1, dtype=torch.long, device=device)
        for i, (row, _) in enumerate(resumed):
            ids[i, length - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, device=device)
        return ids, mask, logits, cache

    def _remember(self, batch: _Batch, indices: Sequence[int], first_slot: int = 0) -> None:
        """Keep the KV cache of the batch's rows at ``indices`` (ending now) for later turns: the ids
        of every position the cache holds (prompt and answer, but the last sampled token)."""
        if self._prefix is None or not indices:
            return
        confined = self.options.prefix_cache_scope == "session"
        for i in indices:
            row = batch.rows[i]
            if confined and row.cache_scope is None:
                continue
            count = int(batch.positions[i])
            history = batch.history[i]
            ids = history[history >= 0][:count].tolist()
            real = None if self._slots is not None else batch.mask[i].bool()
            if len(ids) != count or (real is not None and int(real.sum()) != count):
                continue  # never store ids and positions that disagree
            if self._slots is not None:
                slot = first_slot + i
                layers = tuple(
                    (
                        self._slots.keys[layer, slot : slot + 1, :, :count].clone(),
                        self._slots.values[layer, slot : slot + 1, :, :count].clone(),
                    )
                    for layer in range(self._slots.keys.shape[0])
                )
            else:
                # The row's real positions, in order (padding may sit before and inside them).
                layers = tuple(
                    (layer.keys[i : i + 1, :, real].clone(), layer.values[i : i + 1, :, real].clone())
                    for layer in batch.cache.layers
                )
            nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
            self._prefix.insert(ids, layers, nbytes, row.cache_scope)

    def _join(
        self,
        batch: _Batch | None,
        rows: list[_Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        logits: torch.Tensor,
        cache: Any,
    ) -> _Batch | None:
        """Newcomers prefilled (their prompt ``ids``, left-padded, and ``mask``): sample their first
        token, and merge them into the running batch."""
        import torch

        size = len(rows)
        generators = [row.generator for row in rows]
        first = self._choose(rows, self._pipeline(rows), generators, ids, logits)
        if self._slots is not None:
            # Into the free slots after the running rows; the batch keeps no cache of its own.
            self._slots.fill(len(batch.rows) if batch is not None else 0, cache, mask)
            cache, mask = None, mask[:, :0]
        newcomer = _Batch(
            rows=rows,
            cache=cache,
            mask=mask,
            pending=first,
            positions=torch.tensor([len(row.prompt_ids) for row in rows], device=self.device),
            history=torch.cat([ids, first[:, None]], dim=1),
            generated=torch.ones(size, dtype=torch.long, device=self.device),
            limits=torch.tensor([row.max_new_tokens for row in rows], device=self.device),
            generators=generators,
        )
        width = len(batch.rows) if batch is not None else 0
        joined = self._finish_tokens(newcomer, first, first_slot=width)
        if joined is None:
            return batch
        return joined if batch is None else _merge(batch, joined)

    def _decode_step(self, batch: _Batch) -> _Batch | None:
        """One forward pass over every row, one new token per row."""
        import torch

        if self._slots is not None:
            mask = self._slots.prepare_step(batch.positions)
            logits, _ = self._forward(
                input_ids=batch.pending[:, None],
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                past_key_values=self._slots,
            )
        else:
            ones = torch.ones(len(batch.rows), 1, dtype=batch.mask.dtype, device=self.device)
            batch.mask = torch.cat([batch.mask, ones], dim=1)
            logits, batch.cache = self._forward(
                input_ids=batch.pending[:, None],
                attention_mask=batch.mask,
                position_ids=batch.positions[:, None],
                past_key_values=batch.cache,
            )
        batch.positions = batch.positions + 1
        if batch.processors is None:
            batch.processors = self._pipeline(batch.rows)
        tokens = self._choose(batch.rows, batch.processors, batch.generators, batch.history, logits)
        batch.history = torch.cat([batch.history, tokens[:, None]], dim=1)
        batch.pending = tokens
        batch.generated = batch.generated + 1
        self.steps += 1
        return self._finish_tokens(batch, tokens)

    def _finish_tokens(self, batch: _Batch, tokens: torch.Tensor, first_slot: int = 0) -> _Batch | None:
        """Deliver this step's tokens, end rows at EOS / length, drop ended rows from the batch
        (whose rows sit in slots from ``first_slot`` on, in slots mode)."""
        import torch

        is_eos = torch.isin(tokens, self._eos)
        # History holds prompt + every sampled token; a full context ends the row like a length limit.
        lengths = batch.positions + 1
        too_long = (batch.generated >= batch.limits) | (lengths >= self.context_len)
        codes = torch.where(is_eos, 1, torch.where(too_long, 2, 0))
        token_list, code_list = torch.stack([tokens, codes]).tolist()
        items: list[tuple[_Row, Any]] = []
        keep: list[bool] = []
        for row, token, code in zip(batch.rows, token_list, code_list, strict=True):
            if code != 1:
                items.append((row, token))
            if code:
                items.append((row, _REASON_CODES[code]))
                row.done = True
            keep.append(not code and not row.cancelled)
        deliver(items)
        self._remember(batch, [i for i, kept in enumerate(keep) if not kept], first_slot)
        return _keep_rows(batch, keep, self._slots, first_slot)


def _trace_steps(rows: Sequence[_Row], scores: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add each traced row's sampled token and top scores to its trace (two small copies per step)."""
    import torch

    k = min(max(row.trace.top_logits for row in rows if row.trace is not None), scores.shape[-1])
    if k:
        values, ids = scores.topk(k, dim=-1)
        id_rows = torch.cat([tokens[:, None], ids], dim=1).tolist()
        value_rows = values.float().tolist()
    else:
        id_rows = tokens[:, None].tolist()
        value_rows = [[] for _ in rows]
    for row, row_ids, row_values in zip(rows, id_rows, value_rows, strict=True):
        if row.trace is not None:
            top = row.trace.top_logits
            row.trace.add(row_ids[0], row_ids[1 : 1 + top], row_values[:top])


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: generation config's (int or list), model config's, tokenizer's."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        values = value if isinstance(value, (list, tuple)) else [value]
        found.extend(int(v) for v in values if isinstance(v, int) and int(v) not in found)
    return found
