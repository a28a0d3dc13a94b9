"""Settings: constructor/CLI arguments > environment (``CHATSTREAM_``, nested with ``__``) >
TOML file (``--config`` or ``CHATSTREAM_CONFIG``) > defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from .types import PenaltyMethod


def _decode_leaves(value: Any) -> Any:
    """Env values under ``plugin_config`` arrive as text: each leaf that is JSON (``60``, ``true``,
    ``["a"]``) becomes that value, any other text stays a string. Plugin options are free-form, so
    pydantic-settings cannot know their types (its releases differ on whether they decode them)."""
    if isinstance(value, dict):
        return {key: _decode_leaves(item) for key, item in value.items()}
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class _EnvSource(EnvSettingsSource):
    """The environment, with ``plugin_config`` leaves decoded as JSON where they are JSON."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        if "plugin_config" in data:
            data["plugin_config"] = _decode_leaves(data["plugin_config"])
        return data


DEFAULT_PIPELINE = ["repetition", "frequency", "presence", "temperature", "top_k", "top_p", "min_p"]


class SamplingLimits(BaseModel):
    """Operator limits on per-request generation parameters (None: no limit).

    - ``max_new_tokens``: larger requests are cut to this many tokens.
    - ``max_temperature``: hotter requests are cooled to this temperature.
    - ``max_top_k``: a larger ``top_k``, or ``top_k=0`` (off), becomes this value.
    - ``max_penalty``: penalties are held to ``[-max_penalty, max_penalty]`` when subtractive and to
      ``[1/max_penalty, max_penalty]`` when multiplicative (so it must be >= 1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(None, ge=1)
    max_temperature: float | None = Field(None, ge=0.0)
    max_top_k: int | None = Field(None, ge=1)
    max_penalty: float | None = Field(None, ge=1.0)


# APIs each role may call by default; "*" means every API.
DEFAULT_ROLES: dict[str, list[str]] = {
    "default": [
        "chat_stream",
        "clear_context",
        "set_generation_params",
        "get_generation_params",
        "set_feedback",
        "get_load",
        "conversations",
    ],
    "admin": ["*"],
}


class ApiKey(BaseModel):
    """An API client's key and role. Give the key itself, or (better) its SHA-256 hex digest."""

    model_config = ConfigDict(extra="forbid")

    role: str
    key: SecretStr | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_of_key_or_hash(self) -> ApiKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256 for each API key")
        return self


class SamplingSettings(BaseModel):
    """The logits pipeline: which processors run, in which order, with which operator options."""

    model_config = ConfigDict(extra="forbid")

    pipeline: list[str] = Field(default_factory=lambda: list(DEFAULT_PIPELINE))
    processors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    limits: SamplingLimits = Field(default_factory=SamplingLimits)


class Settings(BaseSettings):
    """Every option of ``ChatStream(...)`` plus the server's and the plugins'.

    Plugin-specific options live under ``plugin_config.<plugin name>``.
    """

    model_config = SettingsConfigDict(
        env_prefix="CHATSTREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # The model: a local HF directory, a GGUF file, or None for the embedded SmolLM2.
    model: str | None = None
    tokenizer: str | None = None
    device: str | None = None
    engine: str | None = Field(
        None,
        description="engine plugin name; unset: openvino for the embedded model or an IR directory on a "
        "machine without a GPU when OpenVINO GenAI is installed, else transformers",
    )
    prompt_format: str | None = Field(None, description="chat_prompt_clazz by name; None picks by model")

    # Load control.
    num_of_concurrent_executions: int = Field(2, ge=1, le=4096)
    max_queue_size: int = Field(5, ge=0, le=1_000_000)
    too_many_request_as_http_error: bool = False

    # The generator mock.
    use_mock_response: bool = False
    mock_params: dict[str, Any] = Field(default_factory=lambda: {"type": "round"})

    # Generation defaults (per-request overrides are validated against these types).
    max_new_tokens: int = Field(256, ge=1)
    context_len: int = Field(1024, ge=16)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    repetition_penalty_method: PenaltyMethod = "multiplicative"
    add_special_tokens: bool | None = None
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)

    # Requests and sessions.
    request_handler: str = "simple_session"
    session_store: str = "memory"
    session_secret: SecretStr | None = None
    max_input_chars: int = Field(16_000, ge=1)
    max_conversations_per_owner: int = Field(
        1000, ge=1, description="conversations an owner (API key or browser) keeps; the oldest go first"
    )
    max_responses_per_owner: int = Field(
        1000, ge=1, description="stored /v1/responses an owner keeps; the oldest go first"
    )
    stream_format: Literal["cumulative", "delta"] = Field(
        "cumulative",
        description="/chat_stream chunks: the whole answer so far (documented client) or only new text",
    )

    # Roles and access (HTTP API): browser clients get default_role; API clients send X-API-Key.
    roles: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_ROLES.items()}
    )
    default_role: str = "default"
    api_keys: list[ApiKey] = Field(default_factory=list)

    # Server.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    transports: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["fastapi", "openai", "webui", "ops"]
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_grace_s: float = Field(30.0, ge=0, description="time in-flight answers get to finish on SIGTERM")
    client_read_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="a streamed answer whose client reads nothing for this long is ended and its slot "
        "freed (None: wait forever)",
    )

    # Plugins.
    plugins: Annotated[list[str] | None, NoDecode] = Field(
        None, description="third-party plugins to load (comma list or JSON); None loads all"
    )
    block_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    strict_plugins: bool = False
    plugin_config: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("plugins", "block_plugins", "transports", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvSource(settings_cls)]
        config_file = _config_file.get("path") or os.environ.get("CHATSTREAM_CONFIG")
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise SettingsError(
                    f"settings file {config_file!r} (CHATSTREAM_CONFIG / --config) does not exist"
                )
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _check_roles(self) -> Settings:
        if self.default_role not in self.roles:
            raise ValueError(
                f"default_role {self.default_role!r} is not one of the roles {sorted(self.roles)}"
            )
        for api_key in self.api_keys:
            if api_key.role not in self.roles:
                raise ValueError(
                    f"api_keys: role {api_key.role!r} is not one of the roles {sorted(self.roles)}"
                )
        return self


_config_file: dict[str, str | None] = {}


class SettingsError(ValueError):
    """A setting has a bad value; the message names it and says how to fix it."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad setting: its dotted name, the problem, and the environment variable to fix."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "(settings)"
        env = "CHATSTREAM_" + "__".join(str(part) for part in error["loc"]).upper()
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"setting {name!r}: {error['msg']}{shown}; set it with {env} or --config")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings from all sources; ``overrides`` (constructor/CLI values) win.

    Raises ``SettingsError`` with a message that names each bad setting.
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    _config_file["path"] = os.fspath(config_file) if config_file else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None
    except PydanticSettingsError as exc:  # a value that is not valid JSON where JSON is expected
        raise SettingsError(f'{exc}; nested and list settings take JSON, e.g. \'["a", "b"]\'') from None
    finally:
        _config_file["path"] = None
