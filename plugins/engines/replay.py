"""The ``replay`` engine plugin: serves generations recorded by the ``transformers`` engine, with no model.

Record once with ``plugin_config.transformers.record_dir``; replay anywhere with
``engine = "replay"`` and ``plugin_config.replay`` (:class:`~chatstream.replay_engine.ReplayOptions`):

- ``dir`` (required): the recording directory (format: :mod:`chatstream.recording`).
- ``fallback``: what a request that was never recorded gets. ``"error"`` (default) raises
  :class:`~chatstream.recording.RecordingNotFoundError`, whose message names the nearest recorded
  prompt; ``"mock"`` streams the generator mock's canned answers; any other string is streamed
  as a fixed answer.
- ``timing``: ``"none"`` (default) streams as fast as the consumer reads; ``"recorded"`` waits
  so that each delta arrives at the offset it was recorded at.

The engine itself is :class:`chatstream.replay_engine.ReplayEngine`. A ``MockTransformer``
stand-in model (``chatstream.mock_transformer``) brings its own recording and options. The plugin
also adds ``chatstream recordings DIR``.
"""

from __future__ import annotations

from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.recording import RecordingStore
from chatstream.replay_engine import ENGINE_NAME, ReplayEngine, ReplayOptions, engine_from_options
from chatstream.types import EngineConfig

__all__ = ["ReplayEngine", "ReplayOptions", "create_replay_engine", "engine_from_options"]


def create_replay_engine(config: EngineConfig) -> ReplayEngine:
    """The engine factory registered as ``replay`` (a ``MockTransformer`` model brings its own options)."""
    from chatstream.mock_transformer import MockModel

    if isinstance(config.model, MockModel):
        return config.model.mock.create_engine(config)
    return engine_from_options(config.options, config.add_special_tokens)


@hookimpl
def register_engines(register: Any) -> None:
    """Register the ``replay`` engine."""
    register(ENGINE_NAME, create_replay_engine, options=ReplayOptions)


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``chatstream recordings DIR``: list what a recording directory holds."""
    import click

    @cli.command("recordings")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def recordings(directory: str, as_json: bool) -> None:
        """List the generations recorded in DIRECTORY (for the replay engine)."""
        import json

        store = RecordingStore(directory)
        rows = [
            {
                "name": r.name,
                "prompt": r.prompt,
                "answer": r.text,
                "finish_reason": r.finish_reason,
                "tokens": len(r.token_ids),
                "temperature": r.params.get("temperature"),
                "seed": r.params.get("seed"),
            }
            for r in store.records
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        model = store.manifest.get("model") or "(unknown model)"
        click.echo(f"{len(rows)} generation(s) recorded from {model}")
        for row in rows:
            prompt = str(row["prompt"]).replace("\n", "\\n")
            answer = str(row["answer"]).replace("\n", "\\n")
            click.echo(
                f"- {prompt[-60:]!r} -> {answer[:60]!r} [{row['finish_reason']}, {row['tokens']} tokens]"
            )
