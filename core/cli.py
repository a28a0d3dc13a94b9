"""The ``chatstream`` command. Imports stay light here: torch loads only inside commands that need it."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import click

from .settings import Settings, SettingsError, load_settings


def _settings_from_cli(config: str | None, **cli: Any) -> Settings:
    try:
        return load_settings(config, **cli)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chatstream")
def cli() -> None:
    """Serve language models as multi-user streaming chat."""


_model_options = [
    click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML settings file."),
    click.option(
        "--model", help="Local Hugging Face model directory or GGUF file (default: embedded SmolLM2)."
    ),
    click.option(
        "--engine",
        help="Engine plugin name (default: openvino for the embedded model on a CPU when installed, "
        "else transformers).",
    ),
    click.option("--device", help="cpu, cuda, mps, ..."),
    click.option("--prompt-format", "prompt_format", help="Prompt format name (default: chosen by model)."),
    click.option(
        "--mock", "use_mock_response", is_flag=True, default=None, help="Stream canned text, load no model."
    ),
]


def model_options(fn: Any) -> Any:
    for option in reversed(_model_options):
        fn = option(fn)
    return fn


# The embedded model's card recommends these; a 135M model rambles at temperature 1.
EMBEDDED_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def with_embedded_model_defaults(settings: Settings) -> Settings:
    """Use the embedded model's recommended sampling unless the user chose values."""
    if (
        settings.model is not None
        or settings.use_mock_response
        or settings.engine not in (None, "transformers", "openvino")
    ):
        return settings
    update = {k: v for k, v in EMBEDDED_MODEL_SAMPLING.items() if k not in settings.model_fields_set}
    return settings.model_copy(update=update)


@cli.command()
@model_options
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--concurrency", "num_of_concurrent_executions", type=int, help="Generations at once.")
@click.option("--queue", "max_queue_size", type=int, help="Requests allowed to wait.")
def serve(config: str | None, **cli_options: Any) -> None:
    """Run the chat server (HTTP) with uvicorn.

    SIGTERM or Ctrl-C drains: new requests are refused (503) and /ready says "draining" while the
    answers in progress get ``shutdown_grace_s`` seconds to finish; the rest are stopped, then the
    process exits 0. A second signal stops at once.
    """
    settings = _settings_from_cli(config, **cli_options)
    if "too_many_request_as_http_error" not in settings.model_fields_set:
        settings = settings.model_copy(update={"too_many_request_as_http_error": True})
    settings = with_embedded_model_defaults(settings)
    from .app import create_app
    from .logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except (SettingsError, ValueError, KeyError) as exc:
        raise click.UsageError(str(exc)) from None
    _run_draining_server(app, settings, settings.shutdown_grace_s, settings.log_format)


# After the drain, what is left (answers past the grace period, requests finishing their last
# bytes) gets this long before uvicorn cancels it.
_AFTER_DRAIN_TIMEOUT_S = 2


def _run_draining_server(app: Any, settings: Settings, grace_s: float, log_format: str) -> None:
    """Run uvicorn, draining the ``ChatStream`` on the first SIGTERM/SIGINT while still listening."""
    import uvicorn

    cs = app.state.chatstream

    class DrainingServer(uvicorn.Server):
        """Keeps answering (503 for new requests, /ready "draining") while answers finish."""

        loop: asyncio.AbstractEventLoop | None = None
        drain_task: asyncio.Task[None] | None = None

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own handler would re-raise the signal after shutdown (exit status -15);
            # a drained server exits 0.
            if self.drain_task is None and self.loop is not None and not self.should_exit:
                self.loop.call_soon_threadsafe(self._begin_drain)
            elif self.should_exit:
                self.force_exit = True
            else:
                self.should_exit = True

        def _begin_drain(self) -> None:
            if self.drain_task is None:
                self.drain_task = asyncio.ensure_future(self._drain())

        async def _drain(self) -> None:
            logging.getLogger("chatstream").info("shutting down: draining for up to %.1f s", grace_s)
            await cs.drain(grace_s)
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=_AFTER_DRAIN_TIMEOUT_S,
        # JSON logs: uvicorn's loggers go through the root handler instead of its own text config.
        log_config=None if log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    DrainingServer(config).run()


@cli.command()
@model_options
def chat(config: str | None, **cli_options: Any) -> None:
    """Chat with the model in the terminal (empty line or Ctrl-D to quit)."""
    settings = with_embedded_model_defaults(_settings_from_cli(config, **cli_options))
    from .chatstream import ChatStream

    cs = ChatStream(settings=settings)

    async def run() -> None:
        await cs.start()
        try:
            while True:
                try:
                    user_input = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    break
                if not user_input.strip():
                    break
                shown = 0
                click.echo("bot> ", nl=False)
                async for text in cs.handle_console_input(user_input):
                    click.echo(text[shown:], nl=False)
                    shown = len(text)
                click.echo()
        finally:
            await cs.close()

    asyncio.run(run())


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML settings file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--options", "show_options", is_flag=True, help="Show each contribution and its options.")
def plugins(config: str | None, as_json: bool, show_options: bool) -> None:
    """List plugins: name, distribution, version and the hooks each implements.

    With --options: every contribution (engines, stores, transports, ...), the plugin that gave it,
    where its options live in the settings, and each option's type, default and description.
    """
    from .plugin_manager import describe_plugins, get_loaded_plugins

    loaded = get_loaded_plugins(_settings_from_cli(config) if config else None)
    if show_options:
        _show_contributions(loaded.pm, as_json)
        return
    infos = describe_plugins(loaded)
    if as_json:
        click.echo(json.dumps([info.__dict__ for info in infos], indent=2))
        return
    for info in infos:
        source = f"{info.distribution or '?'} {info.version or ''}".strip()
        if info.error:
            click.echo(f"{info.name}  [{source}]  BROKEN: {info.error}")
        else:
            click.echo(f"{info.name}  [{source}]  hooks: {', '.join(info.hooks)}")


def _show_contributions(pm: Any, as_json: bool) -> None:
    from dataclasses import asdict

    from .options import describe_options
    from .registry import KINDS, registry

    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        for contribution in registry(pm, kind).values():
            options = [asdict(option) for option in describe_options(contribution.options)]
            rows.append(
                {
                    "kind": kind,
                    "name": contribution.name,
                    "plugin": contribution.plugin,
                    "distribution": contribution.distribution,
                    "options_path": None if kind == "prompt_formats" else contribution.options_path(),
                    "typed_options": contribution.options is not None,
                    "options": options,
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    heading = None
    for row in rows:
        if row["kind"] != heading:
            heading = row["kind"]
            click.echo(f"{heading}:")
        where = f"  ({row['options_path']})" if row["options_path"] and row["options"] else ""
        click.echo(f"  {row['name']}  [{row['plugin']}, {row['distribution'] or '?'}]{where}")
        if row["options_path"] and not row["typed_options"]:
            click.echo("      options: not declared (a dict is passed as it is)")
        for option in row["options"]:
            line = f"      {option['name']}: {option['type']} = {option['default']}"
            click.echo(line + (f"  -- {option['description']}" if option["description"] else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--model", help="Say which format this model id or path gets (default: the configured model).")
def prompts(as_json: bool, model: str | None) -> None:
    """List prompt formats, the plugin that provides each, and the one the model gets."""
    from .models import EMBEDDED_MODEL_ID
    from .plugin_manager import get_plugin_manager
    from .prompt_formats import describe_prompt_formats, prompt_format_registry, select_prompt_format

    settings = _settings_from_cli(None)
    formats = prompt_format_registry(get_plugin_manager())
    rows = describe_prompt_formats(formats)
    model_id = model or settings.model or EMBEDDED_MODEL_ID
    chosen, reason = select_prompt_format(formats, name=settings.prompt_format, model_id=model_id)
    if as_json:
        click.echo(
            json.dumps([row._asdict() | {"selected": row.name == chosen.name} for row in rows], indent=2)
        )
        return
    for row in rows:
        marker = "*" if row.name == chosen.name else " "
        click.echo(f"{marker} {row.name}  [{row.plugin}]  {row.description}")
    click.echo(f"\n* selected for {model_id}: {chosen.name} ({reason})")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``chatstream`` command: adds plugin commands, then runs."""
    from .plugin_manager import get_plugin_manager

    try:
        get_plugin_manager().hook.register_commands(cli=cli)
    except Exception as exc:  # a broken plugin or setting must not hide `plugins` and `--help`
        click.echo(f"warning: plugin commands not loaded: {exc}", err=True)
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="chatstream")
