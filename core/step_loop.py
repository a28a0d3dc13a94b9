"""The base of engines that run one model step at a time over many requests (a step loop).

An engine built on :class:`StepLoopEngine` gets, from here: the background thread that runs its
step loop, the queue through which requests reach that thread, cancellation (a consumer that
goes away marks its row, and the engine drops it at its next step), error delivery (a step that
raises ends every request the engine holds with :class:`EngineError`, and the loop goes on
serving new ones), and streaming: raw token ids (``generate_ids``) or detokenized, stop-filtered
text (``generate``, through :class:`~chatstream.detokenize.TokenTextStream`).

The engine brings only what is its own: how it loads (``_setup``), how it fills in a new row
(``_prepare_row``), one pass of its loop (``_step``: admit waiting rows with
``_take_waiting``, run one step, hand out tokens and endings with
:func:`~chatstream.engine_queue.deliver`), how many rows it runs (``_running_count``) and how it
lets go of them (``_release``).

A :class:`TokenTrace` passed to ``generate`` asks the engine to keep each sampled token (and,
where it has them, the top scores it was drawn from): the recording wrapper
(:mod:`chatstream.recording_engine`) uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from .detokenize import TokenTextStream
from .engine_queue import check_prompt_room, deliver, id_batches, text_deltas
from .types import EngineConfig, FinishReason, GenerationParams, GenerationRequest, Segment, TextDelta

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """Generation failed inside the engine (the message says why); the request ended."""


@dataclass
class TokenTrace:
    """What a step-loop engine keeps of one request for whoever asked (a recording).

    ``steps`` gets one ``(token, top ids, top scores)`` per sampled token, EOS included, from the
    step loop; an engine that has no scores leaves the two lists empty. ``prompt_ids`` are the
    ids the request was generated from; ``ended_on_eos`` is set when the stream ended on EOS
    (rather than on a stop string or a length limit).
    """

    top_logits: int = 0  # how many of the highest scores to keep per step
    prompt_ids: list[int] = field(default_factory=list)
    steps: list[tuple[int, list[int], list[float]]] = field(default_factory=list)
    ended_on_eos: bool = False

    def add(self, token: int, top_ids: Sequence[int] = (), top_scores: Sequence[float] = ()) -> None:
        """One sampled step (called by the step loop)."""
        self.steps.append((int(token), list(top_ids), list(top_scores)))


@dataclass(eq=False)
class StepRow:
    """One request as a step loop sees it; engines subclass it for their own per-row state
    (every added field needs a default)."""

    prompt_ids: list[int]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    request_id: str = ""
    trace: TokenTrace | None = None
    cancelled: bool = False  # set by the consumer; the step loop drops the row at its next step
    done: bool = False  # set once the row has left the engine
    cache_scope: str | None = None  # the request's session, for engines that reuse KV caches
    # Set by the engine when it admits the row, before its first token: prompt positions taken
    # from a cached prefix instead of computed (None: the engine does not say).
    cached_tokens: int | None = None


R = TypeVar("R", bound=StepRow)


class StepLoopEngine(Generic[R]):
    """One background thread running a step loop for many requests; see the module docstring."""

    name: str = "step-loop"
    tokenizer: Any = None
    row_type: type[R]
    supports_trace: ClassVar[bool] = True  # ``generate`` takes ``trace=`` (see TokenTrace)

    def __init__(self, config: EngineConfig) -> None:
        config.check_limits()
        self.config = config
        self.max_batch_size = config.max_batch_size
        self.context_len = config.context_len
        self._incoming: queue.SimpleQueue[R | None] = queue.SimpleQueue()
        self._waiting: list[R] = []  # submitted, not yet admitted (step-loop thread only)
        self._taken: list[R] = []  # admitted during the current step (failed with it if it raises)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Observability (read from other threads; written only by the step loop).
        self.active_rows = 0
        self.waiting_rows = 0
        self.steps = 0

    # -- what an engine brings ------------------------------------------------------------------
    def _setup(self) -> None:
        """Load and prepare whatever is missing; runs in a worker thread before the loop starts."""

    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        """Prompt token ids of ``prompt`` (a string is all template text)."""
        raise NotImplementedError

    def _prepare_row(self, row: R, room: int) -> None:
        """Fill in the engine's own fields of a new row (``room``: tokens left for the answer);
        raising refuses the request before it is queued."""

    def _step(self) -> None:
        """One pass of the loop: admit rows (``_take_waiting``), run a step, deliver its tokens."""
        raise NotImplementedError

    def _running_count(self) -> int:
        """How many admitted rows the engine is running."""
        raise NotImplementedError

    def _release(self) -> list[R]:
        """Let go of every admitted row (freeing what the runtime holds for them; never raises)
        and return them."""
        raise NotImplementedError

    def _step_context(self) -> AbstractContextManager[Any]:
        """Entered once around the whole loop, on its thread (e.g. ``torch.inference_mode()``)."""
        return contextlib.nullcontext()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load what is missing (off the event loop), then start the step loop."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._setup)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"chatstream-{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the step loop; requests still running end with ``CANCELLED``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._incoming.put(None)
        await asyncio.to_thread(thread.join)

    # -- prompts ----------------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return self.encode(request.prompt_segments(), request.add_special_tokens)

    def count_tokens(self, text: str) -> int | None:
        """How many tokens ``text`` encodes to as a prompt."""
        return len(self.encode(text))

    # -- requests ---------------------------------------------------------------------------------
    def _submit(
        self, prompt_ids: list[int], request: GenerationRequest, trace: TokenTrace | None = None
    ) -> R:
        if self._thread is None:
            raise RuntimeError("the engine is not running: await engine.start() first")
        room = check_prompt_room(prompt_ids, self.context_len)
        row = self.row_type(
            prompt_ids=prompt_ids,
            params=request.params,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            request_id=request.request_id,
            trace=trace,
            cache_scope=request.cache_scope,
        )
        self._prepare_row(row, room)
        self._incoming.put(row)
        return row

    def _cancel(self, row: R) -> None:
        if not row.done and not row.cancelled:
            row.cancelled = True
            self._incoming.put(None)  # wakes an idle step loop so it forgets the row now

    async def generate_ids(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        """Stream the request's new token ids (EOS excluded), ignoring stop strings.

        Yields lists of ids as they arrive; ends at EOS, ``max_new_tokens`` or a full context.
        """
        row = self._submit(self._prompt_ids(request), request)
        try:
            async for ids in id_batches(row.queue):
                yield ids
        finally:
            self._cancel(row)

    async def generate(
        self, request: GenerationRequest, *, trace: TokenTrace | None = None
    ) -> AsyncIterator[TextDelta]:
        """Stream detokenized, stop-filtered text; the last delta carries the finish reason."""
        prompt_ids = self._prompt_ids(request)
        if trace is not None:
            trace.prompt_ids = list(prompt_ids)
        row = self._submit(prompt_ids, request, trace)
        stream = TokenTextStream(self.tokenizer, prompt_ids, request.stop)
        first = True
        try:
            async for delta in text_deltas(row.queue, stream):
                if trace is not None and delta.finish_reason is FinishReason.STOP:
                    trace.ended_on_eos = not stream.stopped
                if first:  # the row was admitted before its first token: its counts are known
                    first = False
                    delta = dataclasses.replace(
                        delta, prompt_tokens=len(prompt_ids), cached_tokens=row.cached_tokens
                    )
                yield delta
        finally:
            self._cancel(row)

    # -- the step loop (background thread) ------------------------------------------------------
    def _take_waiting(self, count: int | None = None) -> list[R]:
        """Up to ``count`` waiting rows (all when None), oldest first; they are the engine's now."""
        count = len(self._waiting) if count is None else max(0, count)
        taken, self._waiting = self._waiting[:count], self._waiting[count:]
        self._taken.extend(taken)
        return taken

    def _fail(self, rows: Sequence[R], exc: BaseException) -> None:
        """End ``rows`` with an :class:`EngineError` that says what went wrong."""
        error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        deliver([(row, error) for row in rows])
        for row in rows:
            row.done = True

    def _run(self) -> None:
        try:
            with self._step_context():
                while True:
                    block = not self._waiting and not self._running_count()
                    if self._drain(block) or self._stopping.is_set():
                        break
                    for row in self._waiting:
                        if row.cancelled:
                            row.done = True
                    self._waiting = [row for row in self._waiting if not row.cancelled]
                    try:
                        self._step()
                    except Exception as exc:
                        log.exception("%s generation step failed", self.name)
                        failed = list(dict.fromkeys([*self._taken, *self._release(), *self._waiting]))
                        self._waiting = []
                        self._fail(failed, exc)
                    self._taken = []
                    self.active_rows = self._running_count()
                    self.waiting_rows = len(self._waiting)
        finally:
            leftover = list(dict.fromkeys([*self._release(), *self._waiting]))
            self._waiting, self._taken = [], []
            deliver([(row, FinishReason.CANCELLED) for row in leftover])
            for row in leftover:
                row.done = True
            self.active_rows = self.waiting_rows = 0

    def _drain(self, block: bool) -> bool:
        """Move submitted rows into the waiting list; True when the engine is closing."""
        try:
            item = self._incoming.get() if block else self._incoming.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                elif self._stopping.is_set():
                    return True
                item = self._incoming.get_nowait()
        except queue.Empty:
            return False
