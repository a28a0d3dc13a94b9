"""The ``redis`` session store: sessions shared by every replica of the app, with a TTL per session."""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING, Any

from pydantic import Field

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options

if TYPE_CHECKING:  # pragma: no cover
    import redis.asyncio

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "chatstream:session:"
DEFAULT_TTL_S = 30 * 24 * 3600.0  # as long as the session cookie lives


class SessionStoreUnavailable(ConnectionError):
    """The session store cannot be reached; the request may succeed later (HTTP 503)."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<unparsable url>"


OPTIONS_PATH = "plugin_config.redis"


class RedisStoreOptions(PluginOptions):
    """``plugin_config.redis``."""

    url: str = Field(DEFAULT_URL, min_length=1, description="the Redis server, e.g. redis://host:6379/0")
    ttl_s: float | None = Field(
        DEFAULT_TTL_S, ge=0.001, description="seconds after its last use a session expires (null: never)"
    )
    prefix: str = Field(DEFAULT_PREFIX, description="key prefix, so several apps can share one Redis")
    timeout_s: float = Field(5.0, gt=0, description="how long one Redis call may take")


class RedisSessionStore:
    """Sessions as JSON strings under ``prefix + session_id`` in Redis (6.2 or newer).

    Every replica that points at the same Redis sees the same conversations. A save is one
    ``SET ... PX`` command, so Redis holds the old record or the new one, never a mix, whatever
    happens to the client mid-call. ``ttl_s`` after the last save or load a session expires
    (None: never). When Redis cannot be reached every call raises ``SessionStoreUnavailable``;
    the client reconnects by itself once Redis is back.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        ttl_s: float | None = DEFAULT_TTL_S,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
    ) -> None:
        options = parse_options(
            RedisStoreOptions,
            {"url": url, "ttl_s": ttl_s, "prefix": prefix, "timeout_s": timeout_s},
            OPTIONS_PATH,
        )
        self.url = options.url
        self.ttl_s = options.ttl_s
        self.prefix = options.prefix
        self.timeout_s = options.timeout_s
        self._client: redis.asyncio.Redis | None = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._client = self._new_client()  # checks the URL now; connects on first use

    def _new_client(self) -> redis.asyncio.Redis:
        try:
            import redis.asyncio
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff
        except ImportError:
            raise ImportError(
                "the redis session store needs the redis package: pip install redis "
                "(or set session_store to 'memory' or 'sqlite')"
            ) from None
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        try:
            return redis.asyncio.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                # A short retry rides out a dropped connection (every command here is idempotent)
                # without making a user wait long when Redis is really down.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
                health_check_interval=30,
            )
        except ValueError as exc:
            raise ValueError(
                f"redis store url={redact_url(self.url)!r}: {exc}; set plugin_config.redis.url to a URL like "
                f"{DEFAULT_URL!r} (rediss:// for TLS, unix:///path/to/redis.sock for a socket)"
            ) from None

    @property
    def client(self) -> redis.asyncio.Redis:
        """The redis-py client (created again after ``close``)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def key(self, session_id: str) -> str:
        """The Redis key of a session."""
        return self.prefix + session_id

    def _unavailable(self, exc: BaseException) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"the redis session store at {redact_url(self.url)} is unreachable "
            f"({type(exc).__name__}: {exc}); check that Redis is running and that the setting "
            "plugin_config.redis.url points at it"
        )

    def _ttl_ms(self) -> int | None:
        return None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))

    async def load(self, session_id: str) -> dict[str, Any] | None:
        """The session's record (its TTL starts again), or None when there is none or it expired."""
        client = self.client
        try:
            ttl_ms = self._ttl_ms()
            raw = await (
                client.get(self.key(session_id))
                if ttl_ms is None
                else client.getex(self.key(session_id), px=ttl_ms)
            )
        except self._errors as exc:
            raise self._unavailable(exc) from exc
        if raw is None:
            return None
        record: dict[str, Any] = json.loads(raw)
        return record

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        """Replace the session's record with one ``SET`` (atomic)."""
        try:
            text = json.dumps(data, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"redis store: the record of session {session_id!r} is not JSON-able: {exc}"
            ) from None
        client = self.client
        try:
            await client.set(self.key(session_id), text.encode(), px=self._ttl_ms())
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    async def delete(self, session_id: str) -> None:
        """Forget the session (nothing happens if it does not exist)."""
        client = self.client
        try:
            await client.delete(self.key(session_id))
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    async def close(self) -> None:
        """Close the connections; a later call opens new ones."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def create_redis_store(options: RedisStoreOptions | dict[str, Any]) -> RedisSessionStore:
    """Store factory (``plugin_config.redis``)."""
    return RedisSessionStore(**dict(parse_options(RedisStoreOptions, options, OPTIONS_PATH)))


@hookimpl(trylast=True)
def register_session_stores(register: Any) -> None:
    register("redis", create_redis_store, options=RedisStoreOptions)
