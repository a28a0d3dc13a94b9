"""The OpenVINO engine's step loop over GenAI's ``ContinuousBatchingPipeline``.

Each pass adds newly submitted requests to the pipeline, cancels abandoned ones (GenAI frees a
cancelled request's KV blocks at its next step), runs ``step()`` (one decode step over every
running request; GenAI schedules prefill and decode itself), and hands each request's new token
ids and ending to its queue. The thread, queue, cancellation, errors and streaming are
:class:`~chatstream.step_loop.StepLoopEngine`'s. ``openvino_genai`` is imported only when the
engine starts.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatstream.engine_queue import deliver
from chatstream.options import parse_options
from chatstream.step_loop import StepLoopEngine, StepRow
from chatstream.tokenization import SpecialStrings, encode_segments
from chatstream.types import EngineConfig, FinishReason, Segment, joined

from . import generation
from .generation import RUNTIME
from .options import OpenVINOOptions, openvino_device
from .tokenizer import OpenVINOTokenizer

ENGINE_NAME = "openvino"
OPTIONS_PATH = "plugin_config.openvino"
INSTALL_HINT = "pip install 'openvino-genai>=2025.2'"
IR_FILE = "openvino_model.xml"


def import_genai() -> Any:
    """The ``openvino_genai`` module, or an ImportError that says how to install it."""
    try:
        import openvino_genai
    except ImportError as exc:
        raise ImportError(
            f"the 'openvino' engine needs the package openvino-genai ({exc}); install it with: "
            f"{INSTALL_HINT} (or pip install 'chatstream[openvino]')"
        ) from None
    return openvino_genai


def resolve_model_path(path: str | None) -> Path:
    """The GGUF file or IR directory to load: ``path``, or the embedded SmolLM2 GGUF when None."""
    if path is None:
        from chatstream.models import embedded_model_path

        return embedded_model_path()
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ValueError(
                f"model={path!r} is a file but not a .gguf file: the 'openvino' engine loads a .gguf "
                "file or an OpenVINO IR directory"
            )
        return local
    if local.is_dir():
        if not (local / IR_FILE).is_file():
            raise ValueError(
                f"model={path!r} has no {IR_FILE}: the 'openvino' engine needs an OpenVINO IR directory; "
                f"convert a Hugging Face model with: chatstream export-openvino {path} OUT_DIR --weights int8"
            )
        return local
    raise FileNotFoundError(
        f"model={path!r} does not exist; give an OpenVINO IR directory or a .gguf file (nothing is "
        "downloaded), or leave it unset for the embedded SmolLM2"
    )


@dataclass(eq=False)
class _Request(StepRow):
    """One request as the step loop sees it."""

    config: Any = None  # GenAI GenerationConfig
    handle: Any = None
    generated: int = 0
    last_token: int = -1


class OpenVINOEngine(StepLoopEngine[_Request]):
    """Serves an OpenVINO IR or GGUF model through GenAI's ``ContinuousBatchingPipeline``.

    Recording (``record_dir``) is applied by the registered factory (``create_engine``).
    """

    name = ENGINE_NAME
    row_type = _Request

    def __init__(self, config: EngineConfig) -> None:
        config.refuse_objects(
            ENGINE_NAME,
            "the path of an OpenVINO IR directory or a .gguf file",
            "the model's own converted tokenizer",
        )
        super().__init__(config)
        options = parse_options(OpenVINOOptions, config.options, OPTIONS_PATH)
        options.refuse_recording(OPTIONS_PATH)
        device = options.device or openvino_device(config.device or "CPU")
        self.options = options.model_copy(update={"device": device})
        # Refused at start-up, before any load.
        self.steps_enabled = RUNTIME.check_pipeline(config, self.options.pipeline)
        self.model_path = resolve_model_path(config.model_path)
        self.model_name = ""
        self.tokenizer: OpenVINOTokenizer | None = None
        self.pipeline: Any = None
        self.eos_token_ids: list[int] = []
        self._genai: Any = None
        self._ids = itertools.count()
        self._running: list[_Request] = []

    # -- loading ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Load the pipeline (GGUF or IR) unless it is loaded."""
        if self.pipeline is None:
            self._load()

    def _load(self) -> None:
        from chatstream.loadtime import LoadTime
        from chatstream.models import EMBEDDED_MODEL_ID

        genai = import_genai()
        scheduler = genai.SchedulerConfig()
        scheduler.cache_size = max(1, round(self.options.kv_cache_gb))
        scheduler.max_num_seqs = self.max_batch_size
        scheduler.enable_prefix_caching = self.options.prefix_cache
        display = EMBEDDED_MODEL_ID if self.config.model_path is None else str(self.model_path)
        self.pipeline = LoadTime(
            name=f"openvino:{display}",
            fn=lambda: genai.ContinuousBatchingPipeline(
                str(self.model_path), scheduler, self.options.device, self.options.properties()
            ),
        )()
        self._genai = genai
        self.tokenizer = OpenVINOTokenizer(self.pipeline.get_tokenizer(), display)
        self.model_name = display
        self.eos_token_ids = _eos_token_ids(self.pipeline, self.tokenizer)

    # -- prompts ----------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None) -> list[int]:
        """Prompt token ids, as GenAI's tokenizer makes them. Special-token strings in template
        text (``<|im_start|>``) are control tokens; in message content (``Segment.content``) they
        are plain text: a user cannot type a control token. A string is all template.
        """
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise RuntimeError("the engine has no tokenizer yet: await engine.start() first")
        if add_special_tokens is None:
            add_special_tokens = self.config.add_special_tokens
        add = add_special_tokens is not False
        segments: Sequence[Segment] = [Segment.template(prompt)] if isinstance(prompt, str) else prompt
        text = joined(segments)
        ids = tokenizer.encode(text, add_special_tokens=add)
        if not any(segment.literal for segment in segments):
            return ids

        def encode_text(whole: str) -> list[int]:
            return ids if whole == text else tokenizer.encode(whole, add_special_tokens=add)

        def encode_piece(piece: str, literal: bool) -> list[int]:
            return tokenizer.encode_plain(piece) if literal else tokenizer.encode(piece, False)

        # The special strings GenAI matched anywhere in the prompt (it has no list of them): a
        # content segment can only hold, or help form, one of these.
        return encode_segments(
            segments,
            SpecialStrings(tokenizer.special_strings(ids)),
            encode_text,
            encode_piece,
            lambda whole: tokenizer.encode(whole, add_special_tokens=False),
        )

    def _prepare_row(self, row: _Request, room: int) -> None:
        row.config = generation.generation_config(
            self._genai,
            row.params,
            self.steps_enabled,
            min(row.params.max_new_tokens, room),
            self.eos_token_ids,
        )

    # -- the step loop (background thread) --------------------------------------------------------
    def _running_count(self) -> int:
        return len(self._running)

    def _release(self) -> list[_Request]:
        rows, self._running = self._running, []
        for row in rows:
            with contextlib.suppress(Exception):
                row.handle.cancel()
        return rows

    def _step(self) -> None:
        """Add waiting requests to GenAI, cancel abandoned ones, then one GenAI step: every
        request's new tokens and endings to their queues."""
        import numpy as np
        import openvino as ov

        running = self._running
        for row in self._take_waiting():
            ids = ov.Tensor(np.array([row.prompt_ids], dtype=np.int64))
            row.handle = self.pipeline.add_request(next(self._ids), ids, row.config)
            running.append(row)
        for row in [r for r in running if r.cancelled]:
            # GenAI frees a cancelled request's KV blocks at its next step.
            row.handle.cancel()
            row.done = True
            running.remove(row)
        if not self.pipeline.has_non_finished_requests():
            return
        self.pipeline.step()
        self.steps += 1
        items: list[tuple[_Request, Any]] = []
        for row in list(running):
            handle = row.handle
            new: list[int] = []
            if handle.can_read():
                for output in handle.read().values():
                    new.extend(int(t) for t in output.generated_ids)
            status = handle.get_status().name
            finished = status != "RUNNING"
            reason: FinishReason | None = None
            if finished:
                if status in ("CANCEL", "IGNORED", "STOP") and row.cancelled:
                    reason = FinishReason.CANCELLED
                elif (new[-1] if new else row.last_token) in self.eos_token_ids:
                    reason = FinishReason.STOP
                elif status == "FINISHED":
                    reason = FinishReason.LENGTH
                else:
                    reason = FinishReason.ERROR
            if new:
                if row.trace is not None:
                    for token in new:
                        row.trace.add(token)
                row.last_token = new[-1]
                row.generated += len(new)
                visible = [t for t in new if t not in self.eos_token_ids]
                if visible:
                    items.append((row, visible))
            if reason is not None:
                items.append((row, reason))
                row.done = True
                running.remove(row)
        self.active_rows = len(running)  # before delivering, so a finished stream sees it current
        deliver(items)


def _eos_token_ids(pipeline: Any, tokenizer: OpenVINOTokenizer) -> list[int]:
    """The tokenizer's EOS plus any in the model's generation config."""
    found = [tokenizer.eos_token_id] if tokenizer.eos_token_id >= 0 else []
    with contextlib.suppress(Exception):
        config = pipeline.get_config()
        extra = [config.eos_token_id, *config.stop_token_ids]
        found.extend(int(i) for i in extra if int(i) >= 0 and int(i) not in found)
    return found
