"""The ``ops`` transport: what operators and orchestrators need around the chat API.

- ``GET /health``: 200 ``{"status": "ok"}`` while the process is alive; 503 ``{"status": "failed"}``
  when the model failed to load (a liveness probe should restart the process).
- ``GET /ready``: 200 ``{"status": "ready"}`` when the model is loaded and requests are admitted;
  503 ``{"status": "loading"}`` while the model loads and ``{"status": "draining"}`` during shutdown.
- ``GET /metrics``: Prometheus text format (one registry per ``ChatStream``). Open by default, as
  scrapers rarely send keys; with option ``protect_metrics = true`` it needs a role allowed ``metrics``.

Plugin option (``plugin_config.ops``): ``protect_metrics`` (bool). Request ids (``X-Request-Id``),
the log format and the shutdown grace period are core's (``core/logs.py``, ``shutdown_grace_s``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from pydantic import Field, StrictBool

from chatstream.access import AccessDenied, AccessPolicy, presented_key
from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options

OPS_PATHS = ("/health", "/ready", "/metrics")

log = logging.getLogger("chatstream.requests")


# -- metrics ------------------------------------------------------------------------------------------
class _LoadCollector(Collector):
    """Load gauges read from the ``ChatStream`` at scrape time, so they are never stale."""

    def __init__(self, cs: ChatStream) -> None:
        self._cs = weakref.ref(cs)

    def collect(self) -> Iterator[Metric]:
        cs = self._cs()
        if cs is None:
            return
        load = cs.load
        values = (
            ("chatstream_active_generations", "Generations in progress.", load.processing),
            ("chatstream_queue_length", "Requests waiting for a generation slot.", load.waiting),
            ("chatstream_generation_slots", "Generations allowed at once.", load.max_processing),
            ("chatstream_queue_capacity", "Requests allowed to wait.", load.max_waiting),
            ("chatstream_ready", "1 when the model is loaded and requests are admitted.", _is_ready(cs)),
        )
        for name, documentation, value in values:
            yield GaugeMetricFamily(name, documentation, value=float(value))


class ChatStreamMetrics:
    """The Prometheus metrics of one ``ChatStream``, in a registry of its own."""

    def __init__(self, cs: ChatStream) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "chatstream_requests",
            "Chat requests by how they ended (on_request_finished reason) and transport.",
            ["transport", "reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "chatstream_generated_tokens",
            "Tokens generated, including those of answers the client left.",
            ["transport"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "chatstream_prompt_tokens",
            "Prompt tokens: computed (prefilled) or reused from the prefix cache of an earlier turn "
            "(requests of engines that report reuse).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("computed", "reused"):
            self.prompt_tokens.labels(kind=kind)  # both series exist from the start
        self.ttft = Histogram(
            "chatstream_time_to_first_token_seconds",
            "From receiving a request to its first generated token (queueing included).",
            ["transport"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.per_token = Histogram(
            "chatstream_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
            ["transport"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=self.registry,
        )
        self.duration = Histogram(
            "chatstream_request_duration_seconds",
            "From receiving a chat request to its end, by outcome.",
            ["transport", "reason"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.registry.register(_LoadCollector(cs))
        # Memory, CPU and open files of this process (Linux only; a no-op elsewhere).
        ProcessCollector(registry=self.registry)

    def observe(self, reason: str, info: dict[str, Any]) -> None:
        """Count one finished request from the ``on_request_finished`` info."""
        transport = str(info.get("transport") or "unknown")
        self.requests.labels(transport=transport, reason=reason).inc()
        tokens = int(info.get("tokens") or 0)
        if tokens:
            self.tokens.labels(transport=transport).inc(tokens)
        prompt, cached = info.get("prompt_tokens"), info.get("cached_tokens")
        if prompt is not None and cached is not None:  # counted where the engine reports reuse
            reused = min(int(cached), int(prompt))
            self.prompt_tokens.labels(kind="computed").inc(int(prompt) - reused)
            self.prompt_tokens.labels(kind="reused").inc(reused)
        ttft = info.get("ttft_s")
        duration = info.get("duration_s")
        if ttft is not None:
            self.ttft.labels(transport=transport).observe(ttft)
            # The first token's latency is the TTFT; the rest share the time after it.
            if duration is not None and tokens > 1:
                per_token = max(0.0, duration - ttft) / (tokens - 1)
                self.per_token.labels(transport=transport).observe(per_token)
        if duration is not None:
            self.duration.labels(transport=transport, reason=reason).observe(duration)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


# One metrics object per ChatStream, so several apps in one process never share counters.
_metrics: weakref.WeakKeyDictionary[ChatStream, ChatStreamMetrics] = weakref.WeakKeyDictionary()


def metrics_of(cs: ChatStream) -> ChatStreamMetrics:
    """The metrics of ``cs``, created on first use."""
    metrics = _metrics.get(cs)
    if metrics is None:
        metrics = _metrics[cs] = ChatStreamMetrics(cs)
    return metrics


# -- endpoints ----------------------------------------------------------------------------------------
def _is_ready(cs: ChatStream) -> bool:
    return cs.ready and not getattr(cs, "draining", False)


def _start_failure(request: Request) -> BaseException | None:
    """The error that stopped the model from loading in the background, if it did."""
    task = getattr(request.app.state, "chatstream_start", None)
    if task is None or not task.done() or task.cancelled():
        return None
    error: BaseException | None = task.exception()
    return error


class OpsOptions(PluginOptions):
    """``plugin_config.ops``."""

    protect_metrics: StrictBool = Field(
        False, description="/metrics needs a role allowed 'metrics' (scrapers then send X-API-Key)"
    )


def install(app: FastAPI, cs: ChatStream, options: OpsOptions | dict[str, Any] | None = None) -> None:
    """Mount /health, /ready and /metrics and the request id middleware on ``app``."""
    protect_metrics = parse_options(OpsOptions, options, "plugin_config.ops").protect_metrics
    metrics = metrics_of(cs)
    policy = AccessPolicy(cs.settings)

    async def health(request: Request) -> Response:
        """200 while the process is alive; 503 when the model failed to load."""
        error = _start_failure(request)
        if error is not None:
            return JSONResponse(
                {"status": "failed", "error": f"the model failed to load: {type(error).__name__}: {error}"},
                status_code=503,
            )
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        """200 when requests are admitted; 503 while loading, draining or after a failed load."""
        if getattr(cs, "draining", False):
            return JSONResponse({"status": "draining"}, status_code=503)
        if cs.ready:
            return JSONResponse({"status": "ready"})
        status = "failed" if _start_failure(request) is not None else "loading"
        return JSONResponse({"status": status}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics in text format."""
        if protect_metrics:
            try:
                policy.check(presented_key(request.headers), "metrics")
            except AccessDenied as exc:
                return JSONResponse(
                    {"error": "unauthorized" if exc.status == 401 else "forbidden", "message": exc.message},
                    status_code=exc.status,
                )
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/health", health, methods=["GET"], name="health")
    app.add_api_route("/ready", ready, methods=["GET"], name="ready")
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], name="metrics")
    # create_app's start-up gate lets these through while the model loads or the server drains.
    open_paths = getattr(app.state, "open_paths", None)
    if isinstance(open_paths, set):
        open_paths.update(OPS_PATHS)


# -- hooks --------------------------------------------------------------------------------------------
@hookimpl(trylast=True)
def register_transports(register: Any) -> None:
    register("ops", install, options=OpsOptions)


@hookimpl
def on_request_finished(chatstream: Any, request_id: str, reason: str, info: dict[str, Any]) -> None:
    """Count the request in the metrics (when ``ops`` is mounted for it) and log one line about it."""
    metrics = _metrics.get(chatstream)
    if metrics is None:
        return
    metrics.observe(reason, info)
    log.info(
        "chat request finished: %s",
        reason,
        extra={
            "reason": reason,
            "generation_id": request_id,
            "transport": info.get("transport"),
            "tokens": info.get("tokens"),
            "ttft_s": info.get("ttft_s"),
            "duration_s": info.get("duration_s"),
            "finish_reason": info.get("finish_reason"),
        },
    )
