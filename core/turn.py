"""One generation's life, whatever the transport: a :class:`Turn`.

``/chat_stream``, the OpenAI endpoints, the web UI (through ``/chat_stream``) and the console chat
all answer through a ``Turn``, which owns, each exactly once:

1. preparing the prompt (rendered as segments, tokenized, fitted into the context; off the loop);
2. admission: a generation slot, a place in the waiting line, or a refusal (429);
3. saving the question (a store that is down is a 503 before anything streams);
4. the engine's first event, before the transport sends any status line (refusals stay 4xx);
5. streaming the answer;
6. saving the (possibly partial) answer, re-reading the session's generation parameters first so a
   concurrent ``set_generation_params`` is kept;
7. freeing the engine row, the session and the slot;
8. reporting how it ended (``on_request_finished`` and the documented callback).

While it waits (for a slot, the first event or, for whole answers, the next one) it asks the
transport's ``is_connected`` whether the client is still there. When the server's drain runs out,
``ChatStream.stopping`` ends the answers still streaming, with their own reason (``server_shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .admission import TooManyRequests
from .errors import ChatStreamError, ClientDisconnected
from .types import FinishedReason, FinishReason, GenerationParams, GenerationRequest, TextDelta

if TYPE_CHECKING:  # pragma: no cover
    from .chatstream import ChatStream, GenerationStats
    from .hookspecs import RequestFinishedInfo
    from .sessions import ChatSession

T = TypeVar("T")
POLL_S = 0.1  # how often a waiting turn asks whether its client is still there


class _End:
    """The end of the engine's deltas: normal, or with the ``error`` the engine raised."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error


class ServerShutdown(Exception):
    """The server stopped this answer: its drain period ran out."""


class EngineFailed(Exception):
    """The engine failed after the answer started (the message says how)."""


class Turn:
    """One answer to one question. Build it with :meth:`ChatStream.turn`, then ``await start()``,
    iterate :meth:`stream` and always ``await finish()`` (it is idempotent and shielded)."""

    def __init__(
        self,
        cs: ChatStream,
        session: ChatSession,
        params: GenerationParams,
        *,
        transport: str,
        request: Any = None,
        request_id: str | None = None,
        is_connected: Callable[[], Awaitable[bool]] | None = None,
        callback: Callable[[Any, str], Any] | None = None,
        extra_stop: list[str] | None = None,
    ) -> None:
        from .chatstream import GenerationStats

        self.cs = cs
        self.session = session
        self.params = params
        self.transport = transport
        self.request = request
        self.request_id = request_id or uuid.uuid4().hex
        self.is_connected = is_connected
        self.callback = callback
        self.extra_stop = list(extra_stop or [])
        self.started_at = time.monotonic()
        self.stats: GenerationStats = GenerationStats()
        self.reason = FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING
        self.error: str | None = None
        self.streamed = False  # some answer text reached the transport
        self.answer = ""
        self.gen_request: GenerationRequest | None = None
        # The engine's deltas are pulled by one pump task (an engine's generator may hold
        # contexts, such as an HTTP stream, that must be entered and left in one task) into a
        # queue of one: the engine runs no further ahead of a slow client than before.
        self._pump: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[TextDelta | _End] = asyncio.Queue(maxsize=16)
        self._first: TextDelta | _End | None = None
        self._checked_at = 0.0
        self._stop_wait: asyncio.Future[Any] | None = None  # one per turn, not one per token
        self._stream: AsyncGenerator[str, None] | None = None
        self._holds_session = False
        self._admitted = False
        self._finished = False
        self._saved = False
        self.saved_question = False  # the question is in the store (the client may come back to it)

    @property
    def stores(self) -> bool:
        """Whether the conversation is kept (False for stateless requests)."""
        return self.session.id is not None

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's length in tokens: the ids sent, when core made them."""
        request = self.gen_request
        if request is None:
            return None
        if request.prompt_tokens is not None:
            return request.prompt_tokens
        return self.cs.engine.count_tokens(request.prompt)

    # -- before the first byte -------------------------------------------------------------------
    async def start(self, gen_request: GenerationRequest | None = None) -> None:
        """Everything before the answer streams. Raises ``ChatStreamError`` (a refusal, 4xx or 5xx)
        or ``ClientDisconnected``; the turn is then finished and reported already."""
        cs = self.cs
        try:
            if self.stores and cs.is_generating(self.session.id):
                raise ChatStreamError(
                    409,
                    "session_busy",
                    "this session is already generating an answer; wait for it or stop it",
                )
            if self.stores:  # taken before the first await: a second request meanwhile gets the 409
                cs._active_sessions.add(self.session.id or "")
                self._holds_session = True
            self.gen_request = gen_request or await cs.prepare_generation(
                self.session, self.params, self.request_id
            )
            if self.extra_stop:
                stop = list(self.gen_request.stop)
                self.gen_request.stop = [*stop, *(s for s in self.extra_stop if s not in stop)]
            try:
                await self._until(cs.admission.acquire())
            except TooManyRequests as exc:
                self.reason = FinishedReason.TOO_MANY_REQUESTS
                raise ChatStreamError(
                    429,
                    "too_many_requests",
                    "the server is busy: every generation slot is in use and the queue is full; retry later",
                    headers={"Retry-After": str(exc.retry_after)},
                ) from None
            self._admitted = True
            if self.stores:
                # Keep the question before the answer starts: a store that is down is a clear 503
                # now, not a history silently lost after the answer was shown.
                await cs.save_session(self.request, self.session)
                self.saved_question = True
            self._first = await self._first_event(self.gen_request)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._end_before_streaming(exc)
            if isinstance(exc, ChatStreamError | ClientDisconnected) or not isinstance(exc, Exception):
                raise
            raise ChatStreamError(500, "engine_error", f"generation could not start: {exc}") from exc

    async def _first_event(self, request: GenerationRequest) -> TextDelta | _End:
        """Start the engine and wait for its first delta (a refusal is a ``ChatStreamError``)."""
        try:
            deltas = self.cs.engine.generate(request)
        except Exception as exc:
            raise engine_refusal(exc) from exc
        self._pump = asyncio.ensure_future(self._pump_deltas(deltas))
        first = await self._until(self._queue.get())
        if isinstance(first, _End) and first.error is not None:
            raise engine_refusal(first.error) from first.error
        return first

    async def _pump_deltas(self, deltas: AsyncGenerator[TextDelta, None]) -> None:
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    await self._queue.put(delta)
        except Exception as exc:
            await self._queue.put(_End(exc))
        else:
            await self._queue.put(_End())

    async def _end_before_streaming(self, exc: BaseException) -> None:
        if isinstance(exc, ChatStreamError):
            if self.reason != FinishedReason.TOO_MANY_REQUESTS:
                self.reason = refusal_reason(exc)
            self.error = exc.message
        elif isinstance(exc, ClientDisconnected | asyncio.CancelledError):
            self.reason = self._cut_reason()
        else:
            self.reason = FinishedReason.UNKNOWN_ERROR_OCCURRED
            self.error = f"{type(exc).__name__}: {exc}"
            self.cs.logger.error("request %s: generation could not start: %s", self.request_id, self.error)
        if self._admitted and self.stores and not self.stats.tokens:
            self._saved = True  # the question stays stored, waiting for its answer
        await self.finish()

    async def _until(self, awaitable: Awaitable[T]) -> T:
        """``await awaitable``, giving up with ``ClientDisconnected`` when the client leaves."""
        task = asyncio.ensure_future(awaitable)
        if self.is_connected is None:
            return await task
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if not await self.is_connected() and not task.done():
                    raise ClientDisconnected()  # (a result that came meanwhile is kept: a slot must not leak)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            raise

    # -- the answer ---------------------------------------------------------------------------------
    def stream(self, *, watch_client: bool = False) -> AsyncGenerator[str, None]:
        """The answer's text, as it comes (output replacement rules applied).

        Ends early with ``ServerShutdown`` when the server stops it, ``EngineFailed`` when the
        engine fails, ``ClientDisconnected`` when ``watch_client`` is set and the client leaves
        (for answers sent whole, where no failed write would tell). A consumer that stops early
        needs not close it: ``finish()`` does.
        """
        self._stream = self._answer_text(watch_client)
        return self._stream

    async def _answer_text(self, watch_client: bool) -> AsyncGenerator[str, None]:
        if self._pump is None:
            raise RuntimeError("Turn.stream() before a successful start()")
        replacer = self.session.prompt.output_replacer()  # e.g. "<NL>" back to "\n"
        pending, self._first = self._first, None  # the first delta, which start() awaited
        self._checked_at = time.monotonic()
        try:
            while True:
                item = pending if pending is not None else await self._next_item(watch_client)
                pending = None
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    break
                delta = item
                self.stats.update(delta)
                shown = replacer.feed(delta.text) if delta.text else ""
                if shown:
                    self.answer += shown
                    self.streamed = True
                    yield shown
                if delta.finish_reason == FinishReason.ERROR:
                    raise EngineFailed("the engine reported an error")
            rest = replacer.flush()
            if rest:
                self.answer += rest
                self.streamed = True
                yield rest
            self.reason = FinishedReason.SUCCESS
        except ServerShutdown:
            self.reason = FinishedReason.SERVER_SHUTDOWN
            raise
        except (asyncio.CancelledError, GeneratorExit, ClientDisconnected):
            self.reason = self._cut_reason()
            raise
        except Exception as exc:
            self.reason = FinishedReason.UNKNOWN_ERROR_OCCURRED
            self.error = f"{type(exc).__name__}: {exc}"
            self.cs.logger.error("request %s failed: %s", self.request_id, self.error)
            raise EngineFailed(self.error) from exc

    async def _next_item(self, watch_client: bool) -> TextDelta | _End:
        """The engine's next delta; ``ServerShutdown`` when the server stops the answer first, and
        with ``watch_client`` ``ClientDisconnected`` when the client leaves."""
        if self.cs.stopping.is_set():
            raise ServerShutdown("the server is shutting down")
        if watch_client:
            await self._check_client()
        with contextlib.suppress(asyncio.QueueEmpty):
            return self._queue.get_nowait()  # the common case while tokens flow: no task, no wait
        step = asyncio.ensure_future(self._queue.get())
        if self._stop_wait is None:
            self._stop_wait = asyncio.ensure_future(self.cs.stopping.wait())
        try:
            while not step.done():
                await asyncio.wait(
                    {step, self._stop_wait},
                    timeout=POLL_S if watch_client else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if self._stop_wait.done() and not step.done():
                    raise ServerShutdown("the server is shutting down")
                if watch_client:
                    await self._check_client()
        finally:
            step.cancel()  # (no-op when done) a delta taken as the answer ends is not needed
        return step.result()

    async def _check_client(self) -> None:
        # Tokens may come faster than the poll: ask by the clock, not only on time-outs.
        if time.monotonic() - self._checked_at >= POLL_S:
            self._checked_at = time.monotonic()
            if not await self._client_connected():
                raise ClientDisconnected()

    async def _client_connected(self) -> bool:
        return self.is_connected is None or await self.is_connected()

    def _cut_reason(self) -> FinishedReason:
        if self.cs.draining and self.cs.stopping.is_set():
            return FinishedReason.SERVER_SHUTDOWN
        if self.streamed or self.stats.tokens:
            return FinishedReason.CLIENT_DISCONNECTED_WHILE_STREAMING
        return FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING

    # -- the end ------------------------------------------------------------------------------------
    async def finish(self) -> None:
        """Free the engine row, save the conversation, free the session and the slot, report: once.

        Saving comes before the slot is freed: once the load is back to zero, every conversation
        is stored. A turn whose answer failed keeps its question without a half answer, so
        ``regenerate`` asks again and a new message replaces it.
        """
        if self._finished:
            return
        self._finished = True
        cs = self.cs
        if self._stop_wait is not None:
            self._stop_wait.cancel()
        with anyio.CancelScope(shield=True):
            try:
                if self._stream is not None:  # a consumer that stopped early: how it ended
                    with contextlib.suppress(RuntimeError):
                        await self._stream.aclose()
                if self._pump is not None and not self._pump.done():
                    self._pump.cancel()  # the engine row stops at its next step
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._pump
            except Exception:
                cs.logger.exception("request %s: the engine row could not be closed", self.request_id)
            try:
                await self._save()
            finally:
                if self._holds_session:
                    cs._active_sessions.discard(self.session.id or "")
                if self._admitted:
                    cs.admission.release()
                await self._report()

    async def _save(self) -> None:
        if self._saved or not self.stores or not self._admitted:
            return
        self._saved = True
        prompt = self.session.prompt
        if self.reason == FinishedReason.UNKNOWN_ERROR_OCCURRED:
            prompt.clear_last_responder_message()
        else:
            prompt.set_responder_last_msg(self.answer)
        try:
            await self.cs.save_turn(self.request, self.session)
        except Exception:
            self.cs.logger.exception("request %s: the conversation could not be saved", self.request_id)

    async def _report(self) -> None:
        stats = self.stats
        cs = self.cs
        if self.callback is not None and self.reason != FinishedReason.INVALID_REQUEST:
            try:
                result = self.callback(self.request, self.reason.value)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                cs.logger.exception("request %s: the request-finished callback failed", self.request_id)
        await announce_finished(
            cs,
            self.request_id,
            self.reason,
            transport=self.transport,
            duration_s=time.monotonic() - self.started_at,
            error=self.error,
            tokens=stats.tokens,
            ttft_s=None if stats.first_token_at is None else stats.first_token_at - self.started_at,
            finish_reason=stats.finish_reason,
            prompt_tokens=stats.prompt_tokens,
            cached_tokens=stats.cached_tokens,
        )


def refusal_reason(error: ChatStreamError) -> FinishedReason:
    """How a refused request is reported: a server-side failure (5xx) or the client's (4xx)."""
    return FinishedReason.UNKNOWN_ERROR_OCCURRED if error.status >= 500 else FinishedReason.INVALID_REQUEST


async def report_refused(
    cs: ChatStream, transport: str, error: ChatStreamError, request_id: str | None
) -> None:
    """Report a request refused before its turn began (a body that does not parse, a bad
    parameter), so refusals count like every other outcome."""
    await announce_finished(
        cs, request_id or uuid.uuid4().hex, refusal_reason(error), transport=transport, error=error.message
    )


async def announce_finished(
    cs: ChatStream,
    request_id: str,
    reason: FinishedReason,
    *,
    transport: str,
    duration_s: float = 0.0,
    error: str | None = None,
    tokens: int = 0,
    ttft_s: float | None = None,
    finish_reason: str | None = None,
    prompt_tokens: int | None = None,
    cached_tokens: int | None = None,
) -> None:
    """The ``on_request_finished`` hook with every documented ``info`` key, in one place."""
    info: RequestFinishedInfo = {
        "duration_s": duration_s,
        "error": error,
        "tokens": tokens,
        "ttft_s": ttft_s,
        "finish_reason": finish_reason,
        "transport": transport,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
    }
    await cs.call_hook(
        "on_request_finished", chatstream=cs, request_id=request_id, reason=reason.value, info=info
    )


def engine_refusal(exc: Exception) -> Exception:
    """An engine's refusal as a ``ChatStreamError``: its own HTTP ``status``/``code`` when it has
    them, 400 for a ``ValueError`` (the request cannot be served as asked); other errors unchanged."""
    status, code = getattr(exc, "status", None), getattr(exc, "code", None)
    if isinstance(exc, ChatStreamError):
        return exc
    if isinstance(status, int) and isinstance(code, str):
        return ChatStreamError(status, code, str(exc))
    if isinstance(exc, ValueError):
        return ChatStreamError(400, "invalid_request", str(exc))
    return exc
