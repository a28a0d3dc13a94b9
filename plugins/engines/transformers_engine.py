"""The ``transformers`` engine: any Hugging Face causal LM, with continuous batching.

One background thread owns the model and runs a step loop. Every decode step is ONE forward pass
over all active requests: their KV caches live side by side in one left-padded ``DynamicCache``
(an attention mask hides each row's padding; explicit ``position_ids`` keep every row's positions
its own). A new request is prefilled on its own (requests with equal prompt lengths together),
gets its first token at once, and its cache is padded and concatenated into the running batch; a
finished or cancelled request is sliced out at once and the padding every row shares is trimmed.
Per-request sampling goes through the logits pipeline built for the batch's current rows.

KV cache layout (``plugin_config.transformers.kv_cache``): ``dynamic`` (the default) is the layout
above. ``slots`` preallocates one cache row per batch slot, ``context_len`` long, once at start-up;
active requests sit in slots ``0..n-1``, each decode step writes every row's new key/value in place
at that row's own position and attends under a 4-D mask over a bucketed length, so nothing is
concatenated or re-allocated per step; a request that leaves has its slot filled by the last row.
Both give the same tokens. ``slots`` is the layout a captured (compiled) decode step needs; on CPU
it measured no faster than ``dynamic``, which needs no memory up front. Models whose cache cannot
be merged (sliding-window or recurrent layers) run one request at a time with their own cache,
whatever the setting.

Tokens travel to each request's asyncio queue with ``loop.call_soon_threadsafe`` (one call per
step and event loop); the request's own coroutine detokenizes and applies stop strings, so the
step loop does nothing per token but tensor work.

Recording (``plugin_config.transformers.record_dir``): every request that finishes (EOS, a stop
string or a length limit) is written to that directory in the format of
:mod:`chatstream.recording`, for the ``replay`` engine to serve without the model. The step loop
only keeps each recorded row's sampled token and its top ``record_top_logits`` scores (default 5)
per step; the request's coroutine keeps the streamed deltas and their timing, and a background
thread writes the files when the request ends. Cancelled requests are not recorded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatstream.detokenize import TokenTextStream
from chatstream.engine_queue import check_prompt_room, deliver, id_batches, text_deltas
from chatstream.hookspecs import hookimpl
from chatstream.recording import GenerationRecord, RecordedDelta, RecordingWriter
from chatstream.tokenization import HFPromptEncoder
from chatstream.types import (
    EngineConfig,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    LogitsProcessor,
    RowInfo,
    Segment,
    TextDelta,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"

_REASON_CODES = (None, FinishReason.STOP, FinishReason.LENGTH)


class EngineError(RuntimeError):
    """Generation failed inside the engine (the message says why); the request ended."""


def _pipeline_sampler() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(sample_next_tokens, make_generator)`` from ``chatstream.pipeline``, or local equivalents."""
    try:
        from chatstream.pipeline import make_generator, sample_next_tokens
    except ImportError:
        return _sample_next_tokens, _make_generator
    return sample_next_tokens, make_generator


def _make_generator(seed: int, device: Any) -> torch.Generator:
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _sample_next_tokens(
    scores: torch.Tensor, rows: Sequence[RowInfo], generators: Sequence[Any] | None = None
) -> torch.Tensor:
    """Greedy for rows with temperature 0, otherwise a draw from softmax(scores) (seeded per row)."""
    import torch

    tokens = scores.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not sampled:
        return tokens
    probs = torch.softmax(scores.float(), dim=-1)
    unseeded = []
    for i in sampled:
        generator = generators[i] if generators is not None else None
        if generator is None:
            unseeded.append(i)
        else:
            tokens[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    if unseeded:
        index = torch.tensor(unseeded, device=scores.device)
        tokens[index] = torch.multinomial(probs[index], 1)[:, 0]
    return tokens


@dataclass(eq=False)
class _Row:
    """One request as the step loop sees it."""

    prompt_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    request_id: str = ""
    generator: Any = None
    # When recording: per step (sampled token, top ids, top scores), appended by the step loop.
    steps: list[tuple[int, list[int], list[float]]] | None = None
    cancelled: bool = False  # set by the consumer; the step loop drops the row at its next step
    done: bool = False  # set by the step loop once the row left the batch

    @property
    def info(self) -> RowInfo:
        return RowInfo(params=self.params, prompt_len=len(self.prompt_ids))


@dataclass
class _Batch:
    """The running batch: rows side by side in one left-padded KV cache.

    Invariants: the cache holds every row's history except its last token (``pending``), which
    the next decode step feeds; ``mask`` marks real cache positions (1) vs left padding (0);
    ``positions`` is each row's next position id; ``history`` is every row's full token history
    left-padded with -1 (what processors see); ``generated`` counts tokens sampled per row.
    """

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    pending: torch.Tensor
    positions: torch.Tensor
    history: torch.Tensor
    generated: torch.Tensor
    limits: torch.Tensor  # per row: max_new_tokens
    processors: list[LogitsProcessor] | None = None  # None = rebuild before the next use
    generators: list[Any] = field(default_factory=list)


class TransformersEngine:
    """Serves a Hugging Face causal LM to many concurrent requests with continuous batching."""

    name = ENGINE_NAME

    def __init__(self, config: EngineConfig) -> None:
        if config.max_batch_size < 1:
            raise ValueError(f"max_batch_size={config.max_batch_size} is invalid: use 1 or more")
        if config.context_len < 2:
            raise ValueError(f"context_len={config.context_len} is invalid: use 2 or more")
        if config.model is not None and config.tokenizer is None:
            raise ValueError("EngineConfig.tokenizer is required when EngineConfig.model is given")
        self.config = config
        self.model: Any = config.model
        self.tokenizer: Any = config.tokenizer
        self.max_batch_size = config.max_batch_size
        self.device: Any = None
        self.context_len = config.context_len
        self.eos_token_ids: list[int] = []
        self._incoming: queue.SimpleQueue[_Row | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sample, self._make_generator = _pipeline_sampler()
        self._prefill_kwargs: dict[str, Any] = {}
        self._batchable = True
        self._eos: Any = None
        self._recorder, self._record_top = _recording_options(config.options)
        self._kv_layout = _kv_cache_option(config.options)
        self._slots: SlotKVCache | None = None
        # Observability (read from other threads; written only by the step loop).
        self.active_rows = 0
        self.waiting_rows = 0
        self.steps = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model when none was given, then start the step loop."""
        if self._thread is not None:
            return
        if self.model is None:
            self.model, self.tokenizer = await asyncio.to_thread(self._load)
        await asyncio.to_thread(self._prepare)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="chatstream-transformers", daemon=True)
        self._thread.start()

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
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self._prefill_kwargs["logits_to_keep"] = 1
        self._batchable = _cache_is_mergeable(model)
        if self._kv_layout == "slots" and self._batchable:
            self._slots = SlotKVCache.for_model(model, self.max_batch_size, self.context_len, self.device)
        if self._recorder is not None:
            self._recorder.write_manifest(
                model=_model_name(model, self.config), engine=ENGINE_NAME, tokenizer=self.tokenizer
            )
        if not self._batchable:
            log.warning(
                "%s uses a KV cache that cannot be padded and merged (sliding window or recurrent "
                "layers): requests run one at a time",
                type(model).__name__,
            )

    async def close(self) -> None:
        """Stop the step loop; requests still running end with ``CANCELLED``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._incoming.put(None)
        await asyncio.to_thread(thread.join)
        if self._recorder is not None:
            await asyncio.to_thread(self._recorder.close)

    @property
    def kv_cache_layout(self) -> str:
        """``slots`` or ``dynamic``: the layout in use once started."""
        return "slots" if self._slots is not None else "dynamic"

    @property
    def recorder(self) -> RecordingWriter | None:
        """The writer of recorded generations (``record_dir``), or None when not recording."""
        return self._recorder

    # -- public helpers ----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        """Prompt token ids. Special-token strings in template text (``<|im_start|>``) are control
        tokens; in message content (``Segment.content``) they are plain text. A string is all template.
        """
        if self.tokenizer is None:
            raise RuntimeError("the engine has no tokenizer yet: await engine.start() first")
        if add_special_tokens is None:
            add_special_tokens = self.config.add_special_tokens
        return HFPromptEncoder.of(self.tokenizer).encode(prompt, add_special_tokens)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return self.encode(request.prompt_segments(), request.add_special_tokens)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` encodes to as a prompt."""
        return len(self.encode(text))

    # -- generation --------------------------------------------------------------------------------
    def _submit(
        self, prompt_ids: list[int], params: GenerationParams, request_id: str, record: bool = False
    ) -> _Row:
        if self._thread is None:
            raise RuntimeError("the engine is not running: await engine.start() first")
        check_prompt_room(prompt_ids, self.context_len)
        row = _Row(
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=params.max_new_tokens,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            request_id=request_id,
            generator=None if params.seed is None else self._make_generator(params.seed, self.device),
            steps=[] if record else None,
        )
        self._incoming.put(row)
        return row

    def _cancel(self, row: _Row) -> None:
        if not row.done and not row.cancelled:
            row.cancelled = True
            self._incoming.put(None)  # wakes an idle step loop so it forgets the row now

    async def generate_ids(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        """Stream the request's new token ids (EOS excluded), ignoring stop strings.

        Yields lists of ids as they arrive; ends at EOS, ``max_new_tokens`` or a full context.
        """
        row = self._submit(
            self._prompt_ids(request),
            request.params,
            request.request_id,
        )
        try:
            async for ids in id_batches(row.queue):
                yield ids
        finally:
            self._cancel(row)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        """Stream detokenized, stop-filtered text; the last delta carries the finish reason."""
        started = time.monotonic()
        prompt_ids = self._prompt_ids(request)
        recording = self._recorder is not None
        row = self._submit(prompt_ids, request.params, request.request_id, record=recording)
        stream = TokenTextStream(self.tokenizer, prompt_ids, request.stop)
        deltas: list[RecordedDelta] = []
        try:
            async for delta in text_deltas(row.queue, stream):
                reason = delta.finish_reason
                if recording and reason in (None, FinishReason.STOP, FinishReason.LENGTH):
                    elapsed = time.monotonic() - started
                    deltas.append(
                        RecordedDelta(delta.text, delta.tokens, elapsed, reason.value if reason else None)
                    )
                    if reason is not None:
                        # EOS is a sampled step the consumer never sees as a token.
                        ended_on_eos = reason == FinishReason.STOP and not stream.stopped
                        steps = delta.tokens + int(ended_on_eos)
                        self._record(request, prompt_ids, row, deltas, steps, delta.tokens)
                yield delta
        finally:
            self._cancel(row)

    def _effective_add_special_tokens(self, request: GenerationRequest) -> bool | None:
        if request.add_special_tokens is not None:
            return request.add_special_tokens
        return self.config.add_special_tokens

    def _record(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        row: _Row,
        deltas: list[RecordedDelta],
        steps: int,
        output_tokens: int,
    ) -> None:
        """Hand a finished request to the writer thread, which writes its files."""
        assert self._recorder is not None and row.steps is not None
        # The step loop may still append steps of a row cut by a stop string: copy what counts.
        taken = row.steps[:steps]
        token_ids = [step[0] for step in taken]
        record = GenerationRecord(
            prompt=request.prompt,
            params=request.params.model_dump(mode="json"),
            deltas=list(deltas),
            finish_reason=deltas[-1].finish_reason or FinishReason.STOP.value,
            stop=[s for s in request.stop if s],
            add_special_tokens=self._effective_add_special_tokens(request),
            prompt_token_ids=list(prompt_ids),
            token_ids=token_ids,
            top_logits=len(taken[0][1]) if taken else 0,
            engine=ENGINE_NAME,
            model=_model_name(self.model, self.config),
            request_id=request.request_id,
        )
        # One decode per finished request, here: the tokenizer is not shared with another thread.
        # Special tokens left out, as they are from the streamed text.
        record.decoded = self.tokenizer.decode(
            token_ids[:output_tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        top_ids = [step[1] for step in taken] if record.top_logits else None
        top_values = [step[2] for step in taken] if record.top_logits else None
        self._recorder.submit(record, top_ids, top_values)

    # -- the step loop (background thread) ---------------------------------------------------------
    def _run(self) -> None:
        import torch

        waiting: list[_Row] = []
        batch: _Batch | None = None
        with torch.inference_mode():
            while True:
                block = batch is None and not waiting
                stop = self._drain_incoming(waiting, block)
                if stop or self._stopping.is_set():
                    break
                waiting = [row for row in waiting if not row.cancelled]
                try:
                    if batch is not None:
                        batch = self._drop_rows(batch, [not row.cancelled for row in batch.rows])
                    width = len(batch.rows) if batch is not None else 0
                    # Caches that cannot be merged run one request at a time.
                    room = self.max_batch_size - width if self._batchable else int(width == 0)
                    if room > 0 and waiting:
                        admitted, waiting = waiting[:room], waiting[room:]
                        batch = self._admit(batch, admitted)
                    if batch is not None:
                        batch = self._decode_step(batch)
                except Exception as exc:
                    log.exception("generation step failed")
                    failed = (batch.rows if batch is not None else []) + waiting
                    error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                    deliver([(row, error) for row in failed])
                    for row in failed:
                        row.done = True
                    batch, waiting = None, []
                self.active_rows = len(batch.rows) if batch is not None else 0
                self.waiting_rows = len(waiting)
        leftover = (batch.rows if batch is not None else []) + waiting
        deliver([(row, FinishReason.CANCELLED) for row in leftover])
        self.active_rows = self.waiting_rows = 0

    def _drain_incoming(self, waiting: list[_Row], block: bool) -> bool:
        """Move submitted rows into ``waiting``; True when the engine is closing."""
        try:
            item = self._incoming.get() if block else self._incoming.get_nowait()
            while True:
                if item is not None:
                    waiting.append(item)
                elif self._stopping.is_set():
                    return True
                item = self._incoming.get_nowait()
        except queue.Empty:
            return False

    def _forward(self, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(use_cache=True, return_dict=True, **kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values

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
        if self._recorder is not None:
            self._keep_steps(rows, scores, tokens)
        return tokens

    def _keep_steps(self, rows: Sequence[_Row], scores: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append each recorded row's sampled token and top scores (two small copies per step)."""
        import torch

        k = min(self._record_top, scores.shape[-1])
        if k:
            values, ids = scores.topk(k, dim=-1)
            id_rows = torch.cat([tokens[:, None], ids], dim=1).tolist()
            value_rows = values.float().tolist()
        else:
            id_rows = tokens[:, None].tolist()
            value_rows = [[] for _ in rows]
        for row, row_ids, row_values in zip(rows, id_rows, value_rows, strict=True):
            if row.steps is not None:
                row.steps.append((row_ids[0], row_ids[1:], row_values))

    def _admit(self, batch: _Batch | None, rows: list[_Row]) -> _Batch | None:
        """Prefill newcomers in one left-padded forward pass, emit their first token, join them."""
        import torch

        size = len(rows)
        length = max(len(row.prompt_ids) for row in rows)
        ids = torch.full((size, length), -1, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, length - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
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
        return self._drop_rows(batch, keep, first_slot)

    def _drop_rows(self, batch: _Batch, keep: list[bool], first_slot: int = 0) -> _Batch | None:
        """Slice out rows that left, then trim the left padding every remaining row shares (in slots
        mode: move the last rows into the freed slots)."""
        import torch

        if all(keep):
            return batch
        for row, kept in zip(batch.rows, keep, strict=True):
            if not kept:
                row.done = True
        if not any(keep):
            return None
        if self._slots is not None:
            index = self._slots.compact(keep, first_slot)
            rows = torch.tensor(index, device=self.device)
            mask = batch.mask[: len(index)]
        else:
            index = [i for i, kept in enumerate(keep) if kept]
            rows = torch.tensor(index, device=self.device)
            mask = batch.mask.index_select(0, rows)
            # Columns that are padding in every remaining row can go: the cache shrinks with the batch.
            start = int((mask.sum(dim=0) > 0).long().argmax()) if mask.shape[1] else 0
            for layer in batch.cache.layers:
                layer.keys = layer.keys.index_select(0, rows)[:, :, start:]
                layer.values = layer.values.index_select(0, rows)[:, :, start:]
            mask = mask[:, start:]
        history = batch.history.index_select(0, rows)
        hist_start = int((history >= 0).any(dim=0).long().argmax())
        return _Batch(
            rows=[batch.rows[i] for i in index],
            cache=batch.cache,
            mask=mask,
            pending=batch.pending.index_select(0, rows),
            positions=batch.positions.index_select(0, rows),
            history=history[:, hist_start:],
            generated=batch.generated.index_select(0, rows),
            limits=batch.limits.index_select(0, rows),
            processors=None,
            generators=[batch.generators[i] for i in index],
        )


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch holding both: the shorter cache and history are left-padded to the longer."""
    import torch
    import torch.nn.functional as F

    length = max(a.mask.shape[1], b.mask.shape[1])

    def pad_left(tensor: torch.Tensor, dim_from_end: int, size: int, value: float = 0) -> torch.Tensor:
        missing = size - tensor.shape[-dim_from_end]
        if missing == 0:
            return tensor
        pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
        return F.pad(tensor, pad, value=value)

    if a.cache is not None and b.cache is not None:  # slots mode: the cache lives in the slots
        for layer_a, layer_b in zip(a.cache.layers, b.cache.layers, strict=True):
            layer_a.keys = torch.cat([pad_left(layer_a.keys, 2, length), pad_left(layer_b.keys, 2, length)])
            layer_a.values = torch.cat(
                [pad_left(layer_a.values, 2, length), pad_left(layer_b.values, 2, length)]
            )
    hist_len = max(a.history.shape[1], b.history.shape[1])
    return _Batch(
        rows=a.rows + b.rows,
        cache=a.cache,
        mask=torch.cat([pad_left(a.mask, 1, length), pad_left(b.mask, 1, length)]),
        pending=torch.cat([a.pending, b.pending]),
        positions=torch.cat([a.positions, b.positions]),
        history=torch.cat([pad_left(a.history, 1, hist_len, -1), pad_left(b.history, 1, hist_len, -1)]),
        generated=torch.cat([a.generated, b.generated]),
        limits=torch.cat([a.limits, b.limits]),
        processors=None,
        generators=a.generators + b.generators,
    )


class SlotKVCache:
    """A preallocated KV cache of ``slots`` rows, each ``max_len`` long, for every layer.

    Rows ``0..n-1`` of a forward pass are slots ``0..n-1``. ``prepare_step`` sets where each row
    writes (its own position) and returns the 4-D additive mask; ``update`` (what the model's
    attention layers call) writes the step's key/value in place and returns a view of the first
    ``n`` rows over ``kv_len`` positions, a multiple of ``bucket`` so lengths (and any compiled
    graph for them) change rarely.
    """

    bucket = 64

    def __init__(
        self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype: Any, device: Any
    ) -> None:
        import torch

        shape = (layers, slots, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.write_at: torch.Tensor | None = None
        self.kv_len = 0

    @classmethod
    def for_model(cls, model: Any, slots: int, max_len: int, device: Any) -> SlotKVCache:
        """Sized from one probe forward pass: layer count, KV heads, head size and dtype as the model
        really produces them (configs name these differently)."""
        import torch

        probe = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
        layers = probe.past_key_values.layers
        _, heads, _, head_dim = layers[0].keys.shape
        return cls(len(layers), slots, heads, max_len, head_dim, layers[0].keys.dtype, device)

    def fill(self, first_slot: int, cache: Any, mask: torch.Tensor) -> None:
        """Copy a prefilled, left-padded ``DynamicCache`` (``mask`` marks real positions) into slots
        ``first_slot...``, each row starting at position 0."""
        lengths = mask.sum(dim=1).tolist()
        width = mask.shape[1]
        for layer, source in enumerate(cache.layers):
            for i, length in enumerate(lengths):
                slot = first_slot + i
                self.keys[layer, slot, :, :length] = source.keys[i, :, width - length :]
                self.values[layer, slot, :, :length] = source.values[i, :, width - length :]

    def prepare_step(self, positions: torch.Tensor) -> torch.Tensor:
        """Before a decode step of ``len(positions)`` rows: where each writes, and the mask that
        lets row ``i`` see positions ``0..positions[i]``."""
        import torch

        self.write_at = positions
        top = int(positions.max()) + 1
        self.kv_len = min(self.max_len, -(-top // self.bucket) * self.bucket)
        seen = torch.arange(self.kv_len, device=positions.device)[None, :] <= positions[:, None]
        mask = torch.zeros(seen.shape, dtype=self.keys.dtype, device=positions.device)
        mask = mask.masked_fill(~seen, torch.finfo(self.keys.dtype).min)
        return mask[:, None, None, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's key/value per row at its position; keys/values of the rows so far."""
        import torch

        assert self.write_at is not None, "prepare_step() comes before a decode step"
        n = key_states.shape[0]
        rows = torch.arange(n, device=key_states.device)
        self.keys[layer_idx, rows, :, self.write_at] = key_states[:, :, -1]
        self.values[layer_idx, rows, :, self.write_at] = value_states[:, :, -1]
        return self.keys[layer_idx, :n, :, : self.kv_len], self.values[layer_idx, :n, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def compact(self, keep: Sequence[bool], first_slot: int = 0) -> list[int]:
        """Of the rows in slots ``first_slot...``, those in ``keep`` stay and the last kept ones move
        into the holes below. Returns, for each kept row in its new order, its old index."""
        count = sum(keep)
        holes = [i for i in range(count) if not keep[i]]
        movers = [i for i in range(count, len(keep)) if keep[i]]
        order = list(range(count))
        if holes:
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
            targets = [first_slot + i for i in holes]
            sources = [first_slot + i for i in movers]
            self.keys[:, targets] = self.keys[:, sources]
            self.values[:, targets] = self.values[:, sources]
        return order


def _kv_cache_option(options: dict[str, Any]) -> str:
    value = options.get("kv_cache", "dynamic")
    if value not in ("dynamic", "slots"):
        raise ValueError(
            f"plugin_config.transformers.kv_cache={value!r} is invalid: use 'dynamic' or 'slots'"
        )
    return str(value)


def _cache_is_mergeable(model: Any) -> bool:
    """True when the model's default cache is made of plain ``DynamicLayer`` layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a model whose config DynamicCache cannot read: be safe
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: generation config's (int or list), model config's, tokenizer's."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        values = value if isinstance(value, (list, tuple)) else [value]
        found.extend(int(v) for v in values if isinstance(v, int) and int(v) not in found)
    return found


def _recording_options(options: dict[str, Any]) -> tuple[RecordingWriter | None, int]:
    """``(writer or None, top scores per step)`` from the ``record_dir``/``record_top_logits`` options."""
    directory = options.get("record_dir")
    top = options.get("record_top_logits", 5)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 1000:
        raise ValueError(
            f"plugin_config.transformers.record_top_logits={top!r} is invalid: use an integer from 0 to 1000"
        )
    if directory in (None, ""):
        return None, top
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(
            f"plugin_config.transformers.record_dir={directory!r} is invalid: use a directory path"
        )
    return RecordingWriter(directory), top


def _model_name(model: Any, config: EngineConfig) -> str:
    name = (
        config.model_path
        or getattr(model, "name_or_path", None)
        or getattr(getattr(model, "config", None), "name_or_path", None)
    )
    return str(name) if name else type(model).__name__


def create_engine(config: EngineConfig) -> Any:
    """The engine factory registered as ``transformers``.

    A ``MockTransformer`` model stand-in (:mod:`chatstream.mock_transformer`) gets the ``replay``
    engine instead, so switching a ChatStream to recorded answers is a one-line change.
    """
    from chatstream.mock_transformer import MockModel

    if isinstance(config.model, MockModel):
        return config.model.mock.create_engine(config)
    return TransformersEngine(config)


@hookimpl
def register_engines(register: Any) -> None:
    """Register the ``transformers`` engine."""
    register(ENGINE_NAME, create_engine)
