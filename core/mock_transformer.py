"""``MockTransformer``: model and tokenizer stand-ins that replay a recording.

A ChatStream built the documented way with a real model::

    model, tokenizer = load_my_model()
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, ...)

switches to recorded answers (no model, no torch) with one changed line::

    model, tokenizer = MockTransformer("recordings/").model_and_tokenizer()
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, ...)

The ``transformers`` engine factory sees the model stand-in and hands it to the ``replay`` engine
(through the engine registry), which replays the recording instead. The tokenizer stand-in carries
the recorded tokenizer's chat template and special tokens, so prompt formats render the same
prompts as when recording; it encodes and decodes only texts the recording holds.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .recording import RecordingStore

if TYPE_CHECKING:  # pragma: no cover
    from .replay_engine import ReplayEngine
    from .types import EngineConfig


class MockTransformerError(TypeError):
    """A stand-in was asked to do what only the real model or tokenizer can."""


class MockModel:
    """Stands in for the model: carries the recording; running it is an error that says why."""

    device = "cpu"

    def __init__(self, mock: MockTransformer) -> None:
        self.mock = mock
        self.name_or_path: str = str(mock.store.manifest.get("model") or "")
        info = mock.store.tokenizer_info
        self.config = SimpleNamespace(name_or_path=self.name_or_path, eos_token_id=info.get("eos_token_id"))
        self.generation_config = SimpleNamespace(eos_token_id=info.get("eos_token_id"))

    def eval(self) -> MockModel:
        return self

    def to(self, *args: Any, **kwargs: Any) -> MockModel:
        return self

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise MockTransformerError(
            f"this is a MockTransformer replaying {str(self.mock.store.directory)!r}, not a model: it "
            "cannot run forward passes or generate(). Pass it to ChatStream(model=..., tokenizer=...) and "
            "chatstream serves the recorded answers through the replay engine"
        )

    __call__ = _refuse
    forward = _refuse
    generate = _refuse


class MockTokenizer:
    """Stands in for the tokenizer with the recorded chat template and special tokens.

    ``apply_chat_template(..., tokenize=False)`` renders any conversation with the recorded
    template. Encoding works for recorded prompts and decoding for recorded outputs; anything else
    raises ``MockTransformerError``.
    """

    def __init__(self, store: RecordingStore) -> None:
        self.store = store
        info = store.tokenizer_info
        self.name_or_path: str = str(info.get("name_or_path") or "")
        self.chat_template: Any = info.get("chat_template")
        self.bos_token: str | None = info.get("bos_token")
        self.eos_token: str | None = info.get("eos_token")
        self.pad_token: str | None = info.get("pad_token")
        self.unk_token: str | None = info.get("unk_token")
        self.bos_token_id: int | None = info.get("bos_token_id")
        self.eos_token_id: int | None = info.get("eos_token_id")
        self.pad_token_id: int | None = info.get("pad_token_id")
        special = info.get("special_tokens_map")
        self.special_tokens_map: dict[str, Any] = dict(special) if isinstance(special, dict) else {}
        self._vocab_size = info.get("vocab_size")

    def __len__(self) -> int:
        return int(self._vocab_size or 0)

    def _template(self, chat_template: str | None) -> str:
        template = chat_template or self.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not isinstance(template, str) or not template:
            raise MockTransformerError(
                f"the recording in {str(self.store.directory)!r} has no chat template: set prompt_format "
                "to the format used when recording"
            )
        return template

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Render like ``transformers``: the recorded special tokens are template variables."""
        from .prompt_formats import render_chat_template

        variables = {k: v for k, v in self.special_tokens_map.items() if k not in ("bos_token", "eos_token")}
        variables.update(kwargs)
        text = render_chat_template(
            self._template(chat_template),
            conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The recorded token ids of a recorded prompt."""
        ids = self.store.prompt_token_ids(text, add_special_tokens)
        if ids is None:
            raise MockTransformerError(
                "the MockTransformer tokenizer can only encode recorded prompts, "
                f"and {text[:80]!r} was not one"
            )
        return ids

    def __call__(
        self, text: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        """The recorded decode of a recorded output (with or without its final EOS)."""
        ids = [int(i) for i in token_ids]
        for record in self.store.records:
            output = record.token_ids
            if output and output[-1] == self.eos_token_id:
                output = output[:-1]
            if record.decoded is not None and ids in (output, record.token_ids):
                return record.decoded
        raise MockTransformerError("the MockTransformer tokenizer can only decode recorded outputs")


class MockTransformer:
    """Model and tokenizer stand-ins over a recording directory.

    ``fallback`` and ``timing`` are the replay engine's options (:mod:`chatstream.replay_engine`).
    """

    def __init__(
        self, dirname: str | os.PathLike[str], *, fallback: str = "error", timing: str = "none"
    ) -> None:
        self.store = RecordingStore(dirname)
        self.fallback = fallback
        self.timing = timing
        self.model = MockModel(self)
        self.tokenizer = MockTokenizer(self.store)
        # Fail now, not on the first request, when an option is wrong.
        self.create_engine()

    def model_and_tokenizer(self) -> tuple[MockModel, MockTokenizer]:
        """``(model, tokenizer)``, in the order ``load_model_and_tokenizer`` returns them."""
        return self.model, self.tokenizer

    def create_engine(self, config: EngineConfig | None = None) -> ReplayEngine:
        """A replay engine over this recording (what the engine factories build for the stand-in)."""
        from .replay_engine import ReplayEngine

        return ReplayEngine(
            self.store,
            fallback=self.fallback,
            timing=self.timing,
            add_special_tokens=config.add_special_tokens if config is not None else None,
            tokenizer=self.tokenizer,
        )


def stand_in_engine(config: EngineConfig) -> Any:
    """The engine for a config whose model is a :class:`MockModel`: what the ``replay`` engine of
    the registry (``config.engines``, else the process-wide plugins') builds for it."""
    from .settings import SettingsError

    engines = config.engines
    if engines is None:
        from .plugin_manager import get_plugin_manager
        from .registry import registry

        engines = registry(get_plugin_manager(), "engines")
    replay = engines.get("replay")
    if replay is None:
        raise SettingsError(
            "the model is a MockTransformer stand-in, which only the 'replay' engine serves, and no "
            "plugin registers it: unblock chatstream.plugins.engines.replay (block_plugins)"
        )
    return replay.obj(config)


__all__ = ["MockModel", "MockTokenizer", "MockTransformer", "MockTransformerError", "stand_in_engine"]
