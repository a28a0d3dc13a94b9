"""Recorded generations: the file format, its writer and its reader.

A model's output changes with the hardware even with a fixed seed, so tests of chat applications
break when the GPU changes. The ``transformers`` engine can record every finished request
(``plugin_config.transformers.record_dir``); the ``replay`` engine serves those recordings with
no model and no torch. The files are the contract between the two, across processes and machines.

Directory layout (format ``chatstream-recording``, version 1)::

    <dir>/recording.json                 the manifest
    <dir>/generations/<name>.json        one finished request
    <dir>/generations/<name>.npz         its tensors (numpy ``.npz``, no pickles)

``recording.json``::

    {"format": "chatstream-recording", "version": 1,
     "model": "<model name or path>", "engine": "transformers",
     "tokenizer": {"name_or_path", "chat_template", "bos_token", "eos_token", "pad_token",
                   "unk_token", "bos_token_id", "eos_token_id", "pad_token_id",
                   "special_tokens_map", "vocab_size"}}

The tokenizer entry is what a stand-in tokenizer needs to render the same prompts (the chat
template and special tokens); every value may be null.

``generations/<name>.json``::

    {"format": "chatstream-generation", "version": 1,
     "key": "<sha256 hex of the matching key, see below>",
     "prompt": "<the exact prompt text the engine received>",
     "params": {<every GenerationParams field>},
     "stop": ["<stop strings>"], "add_special_tokens": true | false | null,
     "prompt_token_ids": [ints] | null,
     "token_ids": [every sampled token, EOS included when the generation ended on it],
     "deltas": [{"text": str, "tokens": int, "t": seconds since the request was submitted,
                 "finish_reason": null | "stop" | "length"}],   the stream as the client saw it
     "finish_reason": "stop" | "length",
     "decoded": "<tokenizer.decode of the output tokens, EOS and special tokens excluded>" | null,
     "complete": true, "top_logits": K, "tensors": "<name>.npz" | null,
     "engine": str, "model": str, "request_id": str, "recorded_at": unix seconds}

``generations/<name>.npz`` holds ``top_ids`` (int64, ``[steps, K]``) and ``top_logits``
(float32, ``[steps, K]``): for each step, the K highest scores the token was chosen from, after
the logits pipeline (penalties, temperature, filters), highest first. One row per entry of
``token_ids``.

Matching key: the exact prompt text, the sorted stop strings, the effective
``add_special_tokens`` and every ``GenerationParams`` field, except that for greedy requests
(``temperature == 0``) ``seed``, ``top_k``, ``top_p`` and ``min_p`` are left out because they
cannot change an argmax. Several recordings with one key (unseeded sampling, a regenerated
answer) are replayed in the order they were recorded, then again from the first.

Files are written to a temporary name and renamed, so a reader never sees half a file; the
``.json`` is renamed last, so it marks a generation as present. Readers ignore generations with
``"complete": false`` and refuse versions newer than theirs. Nothing here imports torch; numpy is
imported only to write or read the tensors.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .types import GenerationParams

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "recording.json"
GENERATIONS_DIR = "generations"
MANIFEST_FORMAT = "chatstream-recording"
GENERATION_FORMAT = "chatstream-generation"
# Parameters a greedy request's output does not depend on.
_GREEDY_IRRELEVANT = ("seed", "top_k", "top_p", "min_p")
_TOKENIZER_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class RecordingFormatError(ValueError):
    """A recording directory or file is missing, unreadable or of an unknown version."""


class RecordingNotFoundError(LookupError):
    """No recorded generation matches a request; the message names the nearest recorded prompt.

    ``status`` and ``code`` tell an HTTP transport how to report it; ``nearest_prompt`` is the
    closest recorded prompt (None when the recording is empty) and ``similarity`` its difflib ratio.
    """

    status = 404
    code = "recording_not_found"

    def __init__(self, message: str, nearest_prompt: str | None = None, similarity: float = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.nearest_prompt = nearest_prompt
        self.similarity = similarity

    def __str__(self) -> str:
        return self.message


# -- the matching key ------------------------------------------------------------------------------


def key_fields(
    prompt: str,
    params: GenerationParams | Mapping[str, Any],
    stop: Sequence[str] = (),
    add_special_tokens: bool | None = None,
) -> dict[str, Any]:
    """What a recording is matched on (see the module docstring), as a plain dict."""
    model = params if isinstance(params, GenerationParams) else GenerationParams.model_validate(dict(params))
    values = model.model_dump(mode="json")
    if model.greedy:
        for name in _GREEDY_IRRELEVANT:
            values.pop(name, None)
    return {
        "prompt": prompt,
        "params": values,
        "stop": sorted(s for s in stop if s),
        "add_special_tokens": add_special_tokens,
    }


def generation_key(
    prompt: str,
    params: GenerationParams | Mapping[str, Any],
    stop: Sequence[str] = (),
    add_special_tokens: bool | None = None,
) -> str:
    """The sha256 hex digest of :func:`key_fields` in canonical JSON."""
    canonical = json.dumps(
        key_fields(prompt, params, stop, add_special_tokens), sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# -- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedDelta:
    """One streamed piece of text, as the client saw it."""

    text: str
    tokens: int
    t: float  # seconds since the request was submitted
    finish_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "t": round(self.t, 6),
            "finish_reason": self.finish_reason,
        }


@dataclass
class GenerationRecord:
    """One recorded request: what was asked, what was streamed, and the tokens behind it."""

    prompt: str
    params: dict[str, Any]
    deltas: list[RecordedDelta]
    finish_reason: str
    stop: list[str] = field(default_factory=list)
    add_special_tokens: bool | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    decoded: str | None = None
    complete: bool = True
    top_logits: int = 0
    tensors: str | None = None
    engine: str = ""
    model: str = ""
    request_id: str = ""
    recorded_at: float = 0.0
    name: str = ""  # the file stem, set when written or read
    path: Path | None = None  # the JSON file, set when read

    @property
    def key(self) -> str:
        """The matching key (recomputed from the fields, so it always follows this reader's rules)."""
        return generation_key(self.prompt, self.params, self.stop, self.add_special_tokens)

    @property
    def text(self) -> str:
        """The whole streamed answer."""
        return "".join(delta.text for delta in self.deltas)

    def to_json(self) -> dict[str, Any]:
        """The ``generations/<name>.json`` document."""
        return {
            "format": GENERATION_FORMAT,
            "version": FORMAT_VERSION,
            "key": self.key,
            "prompt": self.prompt,
            "params": self.params,
            "stop": list(self.stop),
            "add_special_tokens": self.add_special_tokens,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "deltas": [delta.to_json() for delta in self.deltas],
            "finish_reason": self.finish_reason,
            "decoded": self.decoded,
            "complete": self.complete,
            "top_logits": self.top_logits,
            "tensors": self.tensors,
            "engine": self.engine,
            "model": self.model,
            "request_id": self.request_id,
            "recorded_at": self.recorded_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path | None = None) -> GenerationRecord:
        """Read a ``generations/<name>.json`` document; errors name the file and the field."""
        where = str(path) if path else "generation record"
        _check_header(data, GENERATION_FORMAT, where)
        try:
            deltas = [
                RecordedDelta(str(d["text"]), int(d["tokens"]), float(d["t"]), d.get("finish_reason"))
                for d in data["deltas"]
            ]
            return cls(
                prompt=str(data["prompt"]),
                params=dict(data["params"]),
                deltas=deltas,
                finish_reason=str(data["finish_reason"]),
                stop=[str(s) for s in data.get("stop") or ()],
                add_special_tokens=data.get("add_special_tokens"),
                prompt_token_ids=data.get("prompt_token_ids"),
                token_ids=list(data.get("token_ids") or ()),
                decoded=data.get("decoded"),
                complete=bool(data.get("complete", True)),
                top_logits=int(data.get("top_logits") or 0),
                tensors=data.get("tensors"),
                engine=str(data.get("engine", "")),
                model=str(data.get("model", "")),
                request_id=str(data.get("request_id", "")),
                recorded_at=float(data.get("recorded_at") or 0.0),
                name=path.stem if path else "",
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordingFormatError(
                f"{where}: missing or bad field ({type(exc).__name__}: {exc})"
            ) from None


def _check_header(data: Mapping[str, Any], expected: str, where: str) -> None:
    if not isinstance(data, Mapping) or data.get("format") != expected:
        raise RecordingFormatError(
            f"{where} is not a {expected} file (its 'format' field is not {expected!r})"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RecordingFormatError(
            f"{where} has format version {version!r}; this chatstream reads versions up to {FORMAT_VERSION}: "
            "upgrade chatstream or record again"
        )


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """What a stand-in tokenizer needs to render the same prompts, JSON-ready."""
    if tokenizer is None:
        return {}
    info: dict[str, Any] = {"name_or_path": _json_or_none(getattr(tokenizer, "name_or_path", None))}
    template = getattr(tokenizer, "chat_template", None)
    info["chat_template"] = template if isinstance(template, (str, dict)) else None
    for name in _TOKENIZER_TOKENS:
        value = getattr(tokenizer, name, None)
        info[name] = value if isinstance(value, str) else None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        info[name] = value if isinstance(value, int) else None
    special = getattr(tokenizer, "special_tokens_map", None)
    info["special_tokens_map"] = _json_or_none(dict(special)) if isinstance(special, Mapping) else {}
    try:
        info["vocab_size"] = len(tokenizer)
    except TypeError:
        info["vocab_size"] = None
    return info


def _json_or_none(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


# -- writing ---------------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write (bytes) through a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: Any) -> None:
    encoded = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
    _write_atomic(path, lambda handle: handle.write(encoded))


class RecordingWriter:
    """Writes generation records into a directory from one background thread.

    :meth:`submit` returns at once (the caller may be an event loop or a step loop); the files are
    written in submission order. :meth:`flush` waits for every submitted record; :meth:`close`
    flushes and stops the thread. Errors are logged, never raised into generation.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._lock = threading.Lock()
        self.written = 0
        self.failed = 0

    def _ensure_dirs(self) -> None:
        try:
            (self.directory / GENERATIONS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordingFormatError(
                f"cannot create the recording directory {str(self.directory)!r} (record_dir): {exc}"
            ) from None

    def write_manifest(self, *, model: str = "", engine: str = "", tokenizer: Any = None) -> None:
        """Write ``recording.json`` now (atomically); called when the engine starts."""
        self._ensure_dirs()
        _write_json(
            self.directory / MANIFEST_NAME,
            {
                "format": MANIFEST_FORMAT,
                "version": FORMAT_VERSION,
                "model": model,
                "engine": engine,
                "tokenizer": tokenizer_info(tokenizer),
            },
        )

    def submit(
        self,
        record: GenerationRecord,
        top_ids: Sequence[Sequence[int]] | None = None,
        top_logits: Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Queue ``record`` (and its per-step top scores) for writing; returns at once."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="chatstream-recorder"
                )
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._executor.submit(self._write, record, top_ids, top_logits))

    def _write(
        self,
        record: GenerationRecord,
        top_ids: Sequence[Sequence[int]] | None,
        top_logits: Sequence[Sequence[float]] | None,
    ) -> None:
        try:
            self.write(record, top_ids, top_logits)
        except Exception:
            self.failed += 1
            log.exception("could not write a recorded generation to %s", self.directory)

    def write(
        self,
        record: GenerationRecord,
        top_ids: Sequence[Sequence[int]] | None = None,
        top_logits: Sequence[Sequence[float]] | None = None,
    ) -> Path:
        """Write ``record`` now, on the calling thread; returns the JSON file's path."""
        self._ensure_dirs()
        folder = self.directory / GENERATIONS_DIR
        if not record.name:
            record.name = f"{record.key[:16]}-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        if not record.recorded_at:
            record.recorded_at = time.time()
        if top_ids is not None and top_logits is not None and record.top_logits > 0:
            import numpy as np

            ids = np.asarray(top_ids, dtype=np.int64).reshape(-1, record.top_logits)
            values = np.asarray(top_logits, dtype=np.float32).reshape(-1, record.top_logits)
            record.tensors = f"{record.name}.npz"
            _write_atomic(
                folder / record.tensors,
                lambda handle: np.savez(handle, top_ids=ids, top_logits=values),
            )
        path = folder / f"{record.name}.json"
        _write_json(path, record.to_json())
        self.written += 1
        return path

    def flush(self) -> None:
        """Wait until every submitted record is on disk."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending)

    def close(self) -> None:
        """Flush and stop the writer thread (a later :meth:`submit` starts a new one)."""
        with self._lock:
            executor, self._executor = self._executor, None
            self._pending = []
        if executor is not None:
            executor.shutdown(wait=True)


# -- reading ---------------------------------------------------------------------------------------


class RecordingStore:
    """Reads a recording directory and finds the generation recorded for a request.

    The directory is read when the store is made; a lookup that finds nothing reads it again if
    files were added since (another process may still be recording).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise RecordingFormatError(
                f"recording directory {str(self.directory)!r} does not exist: record one with the "
                "transformers engine option record_dir (plugin_config.transformers.record_dir)"
            )
        self.manifest: dict[str, Any] = {}
        self._records: list[GenerationRecord] = []
        self._by_key: dict[str, list[GenerationRecord]] = {}
        self._prompt_counts: dict[str, int] = {}
        self._seen: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self.reload()

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        """The manifest's tokenizer entry (empty when there is no manifest)."""
        info = self.manifest.get("tokenizer")
        return dict(info) if isinstance(info, Mapping) else {}

    @property
    def records(self) -> list[GenerationRecord]:
        """Every complete generation, oldest first."""
        return list(self._records)

    def _listing(self) -> frozenset[str]:
        folder = self.directory / GENERATIONS_DIR
        try:
            return frozenset(entry.name for entry in os.scandir(folder) if entry.name.endswith(".json"))
        except FileNotFoundError:
            return frozenset()

    def reload(self) -> bool:
        """Read the directory again when its files changed; True when it did."""
        listing = self._listing()
        manifest_path = self.directory / MANIFEST_NAME
        with self._lock:
            if listing == self._seen and self._records:
                return False
            if manifest_path.is_file():
                manifest = _read_json(manifest_path)
                _check_header(manifest, MANIFEST_FORMAT, str(manifest_path))
                self.manifest = manifest
            records = []
            for name in sorted(listing):
                if name.startswith("."):
                    continue
                path = self.directory / GENERATIONS_DIR / name
                record = GenerationRecord.from_json(_read_json(path), path)
                if record.complete:
                    records.append(record)
            records.sort(key=lambda r: (r.recorded_at, r.name))
            self._records = records
            self._by_key = {}
            self._prompt_counts = {}
            for record in records:
                self._by_key.setdefault(record.key, []).append(record)
                if record.prompt_token_ids is not None:
                    self._prompt_counts.setdefault(record.prompt, len(record.prompt_token_ids))
            self._seen = listing
            return True

    def find(
        self,
        prompt: str,
        params: GenerationParams | Mapping[str, Any],
        stop: Sequence[str] = (),
        add_special_tokens: bool | None = None,
    ) -> list[GenerationRecord]:
        """Every recording of this request, oldest first (empty when none)."""
        key = generation_key(prompt, params, stop, add_special_tokens)
        found = self._by_key.get(key)
        if not found and self.reload():
            found = self._by_key.get(key)
        return list(found or ())

    def prompt_token_count(self, text: str) -> int | None:
        """How many tokens ``text`` was as a recorded prompt, or None when it never was one."""
        return self._prompt_counts.get(text)

    def prompt_token_ids(self, text: str, add_special_tokens: bool | None = None) -> list[int] | None:
        """The recorded token ids of prompt ``text`` (preferring the same ``add_special_tokens``)."""
        fallback = None
        for record in self._records:
            if record.prompt == text and record.prompt_token_ids is not None:
                if record.add_special_tokens == add_special_tokens:
                    return list(record.prompt_token_ids)
                fallback = fallback or list(record.prompt_token_ids)
        return fallback

    def not_found(
        self,
        prompt: str,
        params: GenerationParams | Mapping[str, Any],
        stop: Sequence[str] = (),
        add_special_tokens: bool | None = None,
    ) -> RecordingNotFoundError:
        """The error for a request with no recording: names the nearest prompt and what differs."""
        wanted = key_fields(prompt, params, stop, add_special_tokens)
        if not self._records:
            return RecordingNotFoundError(
                f"the recording in {str(self.directory)!r} holds no generations: record some with the "
                "transformers engine option record_dir, or set the replay option fallback"
            )
        same_prompt = [r for r in self._records if r.prompt == prompt]
        if same_prompt:
            last = same_prompt[-1]
            recorded = key_fields(last.prompt, last.params, last.stop, last.add_special_tokens)
            differences = _differences(recorded, wanted)
            return RecordingNotFoundError(
                f"the prompt was recorded in {str(self.directory)!r}, but with other generation settings: "
                f"{differences}. Request it with the recorded settings or record it again with these",
                nearest_prompt=prompt,
                similarity=1.0,
            )
        nearest, ratio = nearest_prompt(prompt, [r.prompt for r in self._records])
        shown = _shorten(nearest)
        where = _first_difference(prompt, nearest)
        return RecordingNotFoundError(
            f"no generation recorded in {str(self.directory)!r} for this prompt ({len(prompt)} characters: "
            f"{_shorten(prompt)!r}); the nearest recorded prompt (similarity {ratio:.2f}, first difference "
            f"at character {where}) is {shown!r}. Record this conversation with the transformers engine "
            "option record_dir, or set the replay option fallback ('mock' or a fixed text)",
            nearest_prompt=nearest,
            similarity=ratio,
        )

    def load_tensors(self, record: GenerationRecord) -> dict[str, Any]:
        """``{"top_ids": int64 [steps, K], "top_logits": float32 [steps, K]}`` (numpy); {} without tensors."""
        if not record.tensors:
            return {}
        import numpy as np

        with np.load(self.directory / GENERATIONS_DIR / record.tensors, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordingFormatError(f"cannot read recording file {str(path)!r}: {exc}") from None


def nearest_prompt(prompt: str, candidates: Sequence[str]) -> tuple[str, float]:
    """The candidate most similar to ``prompt`` and its difflib ratio (cheap upper bounds first)."""
    best, best_ratio = "", -1.0
    for candidate in sorted(
        set(candidates), key=lambda c: -difflib.SequenceMatcher(None, prompt, c).quick_ratio()
    ):
        matcher = difflib.SequenceMatcher(None, prompt, candidate, autojunk=False)
        if matcher.quick_ratio() <= best_ratio:
            break  # sorted by the upper bound: nothing later can do better
        ratio = matcher.ratio()
        if ratio > best_ratio:
            best, best_ratio = candidate, ratio
    return best, max(best_ratio, 0.0)


def _first_difference(a: str, b: str) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def _differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    parts = []
    for name in ("stop", "add_special_tokens"):
        if recorded.get(name) != wanted.get(name):
            parts.append(f"{name} recorded {recorded.get(name)!r}, requested {wanted.get(name)!r}")
    old, new = recorded.get("params", {}), wanted.get("params", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            parts.append(f"{name} recorded {old.get(name)!r}, requested {new.get(name)!r}")
    return "; ".join(parts) or "none visible (a recording file may be damaged)"


__all__ = [
    "FORMAT_VERSION",
    "GenerationRecord",
    "RecordedDelta",
    "RecordingFormatError",
    "RecordingNotFoundError",
    "RecordingStore",
    "RecordingWriter",
    "generation_key",
    "key_fields",
    "nearest_prompt",
    "tokenizer_info",
]
