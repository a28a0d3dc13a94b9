"""The ``openvino`` engine: OpenVINO GenAI's continuous batching, a fast CPU (and Intel GPU) path.

Models: an OpenVINO IR directory (``openvino_model.xml`` with its converted tokenizer, as made by
``chatstream export-openvino``) or a ``.gguf`` file, which GenAI reads directly; no model serves
the embedded SmolLM2 GGUF. ``openvino_genai`` is imported only when the engine starts.

One background thread owns the ``ContinuousBatchingPipeline``: it adds newly submitted requests,
runs ``step()`` (one decode step over every running request; GenAI schedules prefill and decode
itself), reads each request's new token ids and hands them to the request's asyncio queue. The
request's own coroutine detokenizes and applies stop strings, as in the ``transformers`` engine,
so stop strings, Unicode safety and token counts behave the same. A request whose consumer went
away (or that hit a stop string) is cancelled in GenAI at the next step, which frees its KV blocks.

Sampling runs inside GenAI, so only what GenAI implements can be served: the operator's
``sampling.pipeline`` is checked at start-up and a step GenAI cannot run (a third-party logits
processor, a penalty option it has no equivalent for) is refused with a message naming it; a
request asking for something GenAI cannot do (a subtractive repetition penalty, a multiplicative
frequency or presence penalty) is refused with a ``ValueError`` naming the parameter.

Plugin options (``plugin_config.openvino``): ``device`` (``CPU``, ``GPU``, ``AUTO``; default the
``device`` setting, else ``CPU``), ``inference_precision`` (``f32``, ``bf16``, ``f16`` or
``default``; default ``f32``, which was faster than the CPU's bf16 default with quantized weights
here, see bench/RESULTS.md), ``kv_cache_gb`` (KV cache size, default 1), ``num_threads``
(default: OpenVINO's choice), ``pipeline`` (the ``sampling.pipeline`` names, when the builder
cannot tell them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import random
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatstream import runtime_sampling
from chatstream.detokenize import TokenTextStream
from chatstream.engine_queue import check_prompt_room, deliver, id_batches, text_deltas
from chatstream.hookspecs import hookimpl
from chatstream.runtime_sampling import Runtime
from chatstream.tokenization import SpecialStrings, encode_segments
from chatstream.types import (
    EngineConfig,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    Segment,
    TextDelta,
    joined,
)

log = logging.getLogger(__name__)

RUNTIME = Runtime("openvino", "OpenVINO GenAI", "GenAI")
ENGINE_NAME = "openvino"
INSTALL_HINT = "pip install 'openvino-genai>=2025.2'"
IR_FILE = "openvino_model.xml"
PRECISIONS = ("f32", "bf16", "f16", "default")
DEVICES = ("CPU", "GPU", "NPU", "AUTO")
_OPTION_NAMES = ("device", "inference_precision", "kv_cache_gb", "num_threads", "pipeline")


class EngineError(RuntimeError):
    """Generation failed inside OpenVINO GenAI (the message says why); the request ended."""


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


# -- the tokenizer -------------------------------------------------------------------------------------
class OpenVINOTokenizer:
    """GenAI's converted tokenizer with the small part of the Hugging Face interface chatstream uses.

    ``__call__``/``decode``/``apply_chat_template``/``chat_template``/``eos_token``/``bos_token``,
    enough for prompt formats (``hf``), the detokenizer and token counting.

    GenAI's tokenizer always turns a special-token string (``<|im_start|>``) into its control
    token and has no switch to keep it as text, so :meth:`encode_plain` does that here: it cuts
    the text at the special-token strings and spells each one with ordinary tokens.
    """

    def __init__(self, tokenizer: Any, name_or_path: str) -> None:
        self.genai = tokenizer
        self.name_or_path = name_or_path
        self.chat_template: str | None = tokenizer.chat_template or None
        self.eos_token: str = tokenizer.get_eos_token()
        self.bos_token: str = tokenizer.get_bos_token()
        self.eos_token_id: int = int(tokenizer.get_eos_token_id())
        self._special_text: dict[int, str | None] = {}  # token id -> its string when special
        self._plain_spelling: dict[str, list[int]] = {}  # special string -> ordinary token ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        if not text and not add_special_tokens:
            return []  # GenAI cannot tokenize nothing
        encoded = self.genai.encode(text, add_special_tokens=add_special_tokens)
        return [int(i) for i in encoded.input_ids.data[0]]

    def _learn_specials(self, ids: Sequence[int]) -> None:
        """Find out which of ``ids`` are special tokens (two batched decodes of the new ones).

        A special token is one that decoding with ``skip_special_tokens`` drops although it has
        text of its own (a byte-fallback piece of a character has none, and is not special).
        """
        new = sorted({int(i) for i in ids} - self._special_text.keys())
        if not new:
            return
        texts = self.genai.decode([[i] for i in new], skip_special_tokens=False)
        kept = self.genai.decode([[i] for i in new], skip_special_tokens=True)
        for token_id, text, visible in zip(new, texts, kept, strict=True):
            self._special_text[token_id] = text if text and not visible else None

    def special_text(self, token_id: int) -> str | None:
        """The string of ``token_id`` when it is a special token (``<|im_start|>``), else None."""
        self._learn_specials([token_id])
        return self._special_text[token_id]

    def special_strings(self, ids: Sequence[int]) -> set[str]:
        """The special-token strings among ``ids``."""
        self._learn_specials(ids)
        return {text for i in set(ids) if (text := self._special_text[int(i)])}

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with every special-token string in it spelled as plain text.

        Text between special-token strings is tokenized as usual; benign text gives exactly
        ``encode(text, add_special_tokens=False)``.
        """
        ids = self.encode(text, add_special_tokens=False)
        specials = {s for s in self.special_strings(ids) if s in text}
        if not specials:
            return ids
        out: list[int] = []
        cursor = 0
        while cursor < len(text):
            # The earliest special string, the longest at that place (as the tokenizer matches).
            found = [(text.find(s, cursor), -len(s), s) for s in specials]
            hits = sorted(hit for hit in found if hit[0] >= 0)
            if not hits:
                break
            start, _, special = hits[0]
            out += self.encode(text[cursor:start], add_special_tokens=False)
            out += self._spell(special)
            cursor = start + len(special)
        return out + self.encode(text[cursor:], add_special_tokens=False)

    def _spell(self, special: str) -> list[int]:
        """Ordinary token ids that decode to ``special``: the fewest over every cut into two parts
        that holds no special token (fewest puts the cut where the tokenizer's own pre-splitting
        would, so this is what a tokenizer that can split special tokens gives)."""
        if special in self._plain_spelling:
            return self._plain_spelling[special]
        best: list[int] | None = None
        for cut in range(1, len(special)):
            ids = self.encode(special[:cut], False) + self.encode(special[cut:], False)
            if any(self.special_text(i) for i in ids):
                continue
            if best is None or len(ids) < len(best):
                best = ids
        if best is None:  # no clean cut: one character at a time, leaving out any that is special
            best = [i for ch in special for i in self.encode(ch, False) if not self.special_text(i)]
        self._plain_spelling[special] = best
        return best

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Text of ``ids``. GenAI leaves out a trailing incomplete UTF-8 character (never U+FFFD)."""
        text: str = self.genai.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        """The chat template rendered by GenAI (text only)."""
        if tokenize:
            raise ValueError("OpenVINOTokenizer.apply_chat_template renders text only: use tokenize=False")
        text: str = self.genai.apply_chat_template(list(messages), add_generation_prompt)
        return text

    def __len__(self) -> int:
        # get_vocab_vector() fails on byte-level vocabularies (tokens that are not valid UTF-8).
        return len(self.genai.get_vocab())


# -- options and sampling --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenVINOOptions:
    """The engine's checked plugin options."""

    device: str = "CPU"
    inference_precision: str = "f32"
    kv_cache_gb: float = 1.0
    num_threads: int | None = None

    def properties(self) -> dict[str, Any]:
        """OpenVINO compile properties for these options."""
        props: dict[str, Any] = {}
        if self.inference_precision != "default":
            props["INFERENCE_PRECISION_HINT"] = self.inference_precision
        if self.num_threads is not None:
            props["INFERENCE_NUM_THREADS"] = self.num_threads
        return props


def parse_options(config: EngineConfig) -> OpenVINOOptions:
    """Check ``plugin_config.openvino`` (and the ``device`` setting); errors name the option and the fix."""
    options = config.options
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"plugin_config.openvino has unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(_OPTION_NAMES)}"
        )
    device = options.get("device") or config.device or "CPU"
    if not isinstance(device, str) or device.split(":", 1)[0].split(".", 1)[0].upper() not in DEVICES:
        raise ValueError(
            f"device={device!r} is not an OpenVINO device: use one of {', '.join(DEVICES)} "
            "(e.g. CHATSTREAM_PLUGIN_CONFIG__OPENVINO__DEVICE=CPU)"
        )
    device = device.upper()
    precision = options.get("inference_precision", "f32")
    if precision not in PRECISIONS:
        raise ValueError(
            f"plugin_config.openvino.inference_precision={precision!r} is invalid: use one of "
            f"{', '.join(PRECISIONS)} ('default' keeps the device's own choice, bf16 on recent CPUs)"
        )
    kv_cache = options.get("kv_cache_gb", 1.0)
    if isinstance(kv_cache, bool) or not isinstance(kv_cache, (int, float)) or not 0 < kv_cache <= 1024:
        raise ValueError(
            f"plugin_config.openvino.kv_cache_gb={kv_cache!r} is invalid: use a size in GB above 0, e.g. 1"
        )
    threads = options.get("num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(
            f"plugin_config.openvino.num_threads={threads!r} is invalid: "
            "use a whole number >= 1 or leave it unset"
        )
    return OpenVINOOptions(device, precision, float(kv_cache), threads)


def check_pipeline(config: EngineConfig) -> frozenset[str]:
    """The sampling steps the runtime will run (see :func:`chatstream.runtime_sampling.check_pipeline`)."""
    return runtime_sampling.check_pipeline(config, RUNTIME)


def check_params(params: GenerationParams) -> None:
    """Refuse parameters the runtime cannot honour (see :mod:`chatstream.runtime_sampling`)."""
    runtime_sampling.check_params(params, RUNTIME)


def generation_config(
    genai: Any, params: GenerationParams, steps: frozenset[str], max_new_tokens: int, eos_ids: Sequence[int]
) -> Any:
    """GenAI's ``GenerationConfig`` for ``params``; only the steps the operator's pipeline runs apply."""
    check_params(params)
    config = genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.stop_token_ids = set(eos_ids)
    if "repetition" in steps and params.repetition_penalty is not None:
        config.repetition_penalty = params.repetition_penalty
    if "frequency" in steps and params.frequency_penalty is not None:
        config.frequency_penalty = params.frequency_penalty
    if "presence" in steps and params.presence_penalty is not None:
        config.presence_penalty = params.presence_penalty
    if params.greedy:
        config.do_sample = False
        return config
    config.do_sample = True
    config.temperature = params.temperature if "temperature" in steps else 1.0
    if "top_k" in steps and params.top_k > 0:
        config.top_k = params.top_k
    if "top_p" in steps:
        config.top_p = params.top_p
    if "min_p" in steps and params.min_p > 0:
        config.min_p = params.min_p
    # GenAI seeds every request with 0 by default: unseeded requests would all draw alike.
    config.rng_seed = params.seed if params.seed is not None else random.getrandbits(31)
    return config


# -- model sources ---------------------------------------------------------------------------------------
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


# -- the engine ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Request:
    """One request as the step loop sees it."""

    prompt_ids: list[int]
    config: Any  # GenAI GenerationConfig
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    handle: Any = None
    cancelled: bool = False  # set by the consumer; the step loop cancels it in GenAI at once
    done: bool = False
    generated: int = 0
    last_token: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


class OpenVINOEngine:
    """Serves an OpenVINO IR or GGUF model through GenAI's ``ContinuousBatchingPipeline``."""

    name = ENGINE_NAME

    def __init__(self, config: EngineConfig) -> None:
        if config.model is not None:
            raise ValueError(
                "the 'openvino' engine loads its model from a path: set model to an OpenVINO IR "
                "directory or a .gguf file instead of passing a model object"
            )
        if config.tokenizer is not None:
            raise ValueError(
                "the 'openvino' engine uses the model's own converted tokenizer: leave tokenizer unset"
            )
        if config.max_batch_size < 1:
            raise ValueError(f"max_batch_size={config.max_batch_size} is invalid: use 1 or more")
        if config.context_len < 2:
            raise ValueError(f"context_len={config.context_len} is invalid: use 2 or more")
        self.config = config
        self.options = parse_options(config)
        self.steps_enabled = check_pipeline(config)  # refuse at start-up, before any load
        self.model_path = resolve_model_path(config.model_path)
        self.max_batch_size = config.max_batch_size
        self.context_len = config.context_len
        self.tokenizer: OpenVINOTokenizer | None = None
        self.pipeline: Any = None
        self.eos_token_ids: list[int] = []
        self._genai: Any = None
        self._incoming: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ids = itertools.count()
        # Observability (written only by the step loop).
        self.active_rows = 0
        self.steps = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the pipeline (GGUF or IR), then start the step loop."""
        if self._thread is not None:
            return
        if self.pipeline is None:
            await asyncio.to_thread(self._load)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="chatstream-openvino", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from chatstream.loadtime import LoadTime
        from chatstream.models import EMBEDDED_MODEL_ID

        genai = import_genai()
        scheduler = genai.SchedulerConfig()
        scheduler.cache_size = max(1, round(self.options.kv_cache_gb))
        scheduler.max_num_seqs = self.max_batch_size
        display = EMBEDDED_MODEL_ID if self.config.model_path is None else str(self.model_path)
        self.pipeline = LoadTime(
            name=f"openvino:{display}",
            fn=lambda: genai.ContinuousBatchingPipeline(
                str(self.model_path), scheduler, self.options.device, self.options.properties()
            ),
        )()
        self._genai = genai
        self.tokenizer = OpenVINOTokenizer(self.pipeline.get_tokenizer(), display)
        self.eos_token_ids = _eos_token_ids(self.pipeline, self.tokenizer)

    async def close(self) -> None:
        """Stop the step loop; requests still running end with ``CANCELLED``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._incoming.put(None)
        await asyncio.to_thread(thread.join)

    # -- public helpers ----------------------------------------------------------------------------
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
        segments = [Segment.template(prompt)] if isinstance(prompt, str) else prompt
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

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return self.encode(request.prompt_segments(), request.add_special_tokens)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` encodes to as a prompt."""
        return len(self.encode(text))

    # -- generation --------------------------------------------------------------------------------
    def _submit(self, prompt_ids: list[int], params: GenerationParams) -> _Request:
        if self._thread is None:
            raise RuntimeError("the engine is not running: await engine.start() first")
        room = check_prompt_room(prompt_ids, self.context_len)
        config = generation_config(
            self._genai, params, self.steps_enabled, min(params.max_new_tokens, room), self.eos_token_ids
        )
        request = _Request(prompt_ids, config, asyncio.get_running_loop(), asyncio.Queue())
        self._incoming.put(request)
        return request

    def _cancel(self, request: _Request) -> None:
        if not request.done and not request.cancelled:
            request.cancelled = True
            self._incoming.put(None)  # wakes an idle step loop

    async def generate_ids(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        """Stream the request's new token ids (EOS excluded), ignoring stop strings."""
        prompt_ids = self._prompt_ids(request)
        row = self._submit(prompt_ids, request.params)
        try:
            async for ids in id_batches(row.queue):
                yield ids
        finally:
            self._cancel(row)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        """Stream detokenized, stop-filtered text; the last delta carries the finish reason."""
        prompt_ids = self._prompt_ids(request)
        row = self._submit(prompt_ids, request.params)
        assert self.tokenizer is not None
        try:
            async for delta in text_deltas(
                row.queue, TokenTextStream(self.tokenizer, prompt_ids, request.stop)
            ):
                yield delta
        finally:
            self._cancel(row)

    # -- the step loop (background thread) ---------------------------------------------------------
    def _run(self) -> None:
        running: list[_Request] = []
        try:
            while not self._stopping.is_set():
                if self._drain(running, block=not running):
                    break
                try:
                    self._step(running)
                except Exception as exc:
                    log.exception("openvino generation step failed")
                    error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                    deliver([(row, error) for row in running])
                    for row in running:
                        row.done = True
                        with contextlib.suppress(Exception):
                            row.handle.cancel()
                    running.clear()
                self.active_rows = len(running)
        finally:
            for row in running:
                with contextlib.suppress(Exception):
                    row.handle.cancel()
            deliver([(row, FinishReason.CANCELLED) for row in running])
            self.active_rows = 0

    def _drain(self, running: list[_Request], block: bool) -> bool:
        """Add submitted requests to GenAI and cancel abandoned ones; True when closing."""
        import numpy as np
        import openvino as ov

        try:
            item = self._incoming.get() if block else self._incoming.get_nowait()
            while True:
                if item is None:
                    if self._stopping.is_set():
                        return True
                elif not item.cancelled:
                    ids = ov.Tensor(np.array([item.prompt_ids], dtype=np.int64))
                    item.handle = self.pipeline.add_request(next(self._ids), ids, item.config)
                    running.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass
        for row in [r for r in running if r.cancelled]:
            # GenAI frees a cancelled request's KV blocks at its next step.
            row.handle.cancel()
            row.done = True
            running.remove(row)
        return False

    def _step(self, running: list[_Request]) -> None:
        """One GenAI step, then every request's new tokens and endings to their queues."""
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


def create_engine(config: EngineConfig) -> OpenVINOEngine:
    """The engine factory registered as ``openvino``."""
    return OpenVINOEngine(config)


# -- export ----------------------------------------------------------------------------------------------
WEIGHT_FORMATS = ("int8", "int4", "fp16", "fp32")
# The packages whose versions the export environment must share with this one: the IR and its
# converted tokenizer must be readable by the OpenVINO that serves them, and torch is reused.
_SHARED_PACKAGES = ("torch", "openvino", "openvino-tokenizers")


def int4_group_size(*widths: int, preferred: Sequence[int] = (128, 64, 32, 16)) -> int:
    """The largest usual int4 group size that divides every matmul input width (``hidden_size``,
    ``intermediate_size``): 576 for SmolLM2 gives 64, 96 gives 32; -1 (per channel) when none does."""
    for size in preferred:
        if all(width % size == 0 for width in widths):
            return size
    return -1  # per-channel quantization: always valid


def export_command(model: str, out: str, weights: str, group_size: int | None) -> list[str]:
    """The ``optimum-cli export openvino`` command line for these choices."""
    command = ["optimum-cli", "export", "openvino", "--model", model, "--task", "text-generation-with-past"]
    command += ["--weight-format", weights]
    if weights == "int4" and group_size is not None:
        command += ["--group-size", str(group_size), "--ratio", "1.0"]
    return [*command, out]


def _matmul_widths(model: str) -> list[int]:
    """The input widths of the model's linear layers, from its ``config.json`` (empty if unknown)."""
    import json

    try:
        data = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    text_config = data.get("text_config")
    config: dict[str, Any] = text_config if isinstance(text_config, dict) else data
    widths = [config.get("hidden_size"), config.get("intermediate_size")]
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths.append(heads * head_dim)  # the attention output projection's input
    return [w for w in widths if isinstance(w, int) and not isinstance(w, bool) and w > 0]


def _optimum_intel_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.intel") is not None
    except ImportError:  # find_spec imports the parent package, and optimum itself may be missing
        return False


def export_environment_commands(
    venv: str = "~/.venvs/ov-export", constraints: str | None = None
) -> list[str]:
    """Shell commands that make a virtual environment able to run the export.

    The new venv sees this environment's packages after its own: a ``.pth`` file adds this
    interpreter's site-packages (and the ``.pth`` files in them, so an editable chatstream too) at
    the end of its path. That holds where this environment is itself a venv, which
    ``--system-site-packages`` does not (it sees only the base interpreter's). So torch and OpenVINO
    are reused at their installed versions (pinned, so pip downloads neither) and only optimum-intel
    with the older transformers it needs goes into the venv, ahead of ours. optimum-intel also pulls
    torchvision, whose PyPI build does not load next to a CPU-only torch; text models never use it,
    so it is removed when it cannot be imported. ``constraints`` pins the rest (a pip constraints file).
    """
    import shlex
    import sys
    import sysconfig
    from importlib.metadata import PackageNotFoundError, version

    pins: list[str] = []
    for name in _SHARED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{name}=={version(name).split('+', 1)[0]}")
    sites = list(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    pth = "import site; " + "; ".join(f"site.addsitedir({site!r})" for site in sites)
    python, pip = f"{venv}/bin/python", f"{venv}/bin/pip"
    where = f"$({python} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    base = shlex.quote(getattr(sys, "_base_executable", sys.executable))
    pin_file = f" -c {shlex.quote(constraints)}" if constraints else ""
    return [
        f"{base} -m venv {venv}",
        f'printf %s {shlex.quote(pth)} > "{where}/chatstream-main-env.pth"',
        f"{pip} install{pin_file} 'optimum-intel[openvino]' " + " ".join(f"'{pin}'" for pin in pins),
        f"{python} -c 'import torchvision' 2>/dev/null || {pip} uninstall -y torchvision",
    ]


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``chatstream export-openvino``."""
    import click

    @cli.command("export-openvino")
    @click.argument("model")
    @click.argument("out")
    @click.option(
        "--weights",
        type=click.Choice(WEIGHT_FORMATS),
        default="int8",
        show_default=True,
        help="weight compression of the exported IR",
    )
    @click.option(
        "--group-size",
        type=int,
        default=None,
        help="int4 group size (default: the largest of 128/64/32/16 dividing the layer widths)",
    )
    def export_openvino(model: str, out: str, weights: str, group_size: int | None) -> None:
        """Convert a local Hugging Face model directory MODEL to an OpenVINO IR directory OUT
        (the model, its converted tokenizer and detokenizer).

        Needs optimum-intel; without it, prints how to export in a separate environment.
        Serve the result with: chatstream serve --engine openvino --model OUT
        """
        import shlex
        import subprocess
        import sys

        if weights == "int4":
            widths = _matmul_widths(model)
            if group_size is None:
                group_size = int4_group_size(*widths) if widths else 64
            elif group_size > 0 and any(width % group_size for width in widths):
                raise click.BadParameter(
                    f"{group_size} does not divide the layer widths {widths} (config.json): "
                    f"use --group-size {int4_group_size(*widths)}",
                    param_hint="--group-size",
                )
        command = export_command(model, out, weights, group_size)
        if not _optimum_intel_installed():
            venv = "~/.venvs/ov-export"
            steps = "\n".join(f"  {line}" for line in export_environment_commands(venv))
            click.echo(
                "optimum-intel is not installed here (it pins an older transformers than chatstream "
                "needs), so export in a separate virtual environment:\n\n"
                f"{steps}\n  {venv}/bin/{shlex.join(command)}\n\n"
                f"then serve it: chatstream serve --engine openvino --model {shlex.quote(out)}",
                err=True,
            )
            sys.exit(1)
        # The optimum-cli of this interpreter, found without relying on PATH (a venv's python run
        # directly has its bin/ off PATH).
        sys.exit(subprocess.call([sys.executable, "-m", "optimum.commands.optimum_cli", *command[1:]]))


@hookimpl
def register_engines(register: Callable[..., None]) -> None:
    """Register the ``openvino`` engine."""
    register(ENGINE_NAME, create_engine)
