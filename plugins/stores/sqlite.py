"""The ``sqlite`` session store: one file on one machine, survives restarts, shared by worker processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, field_validator

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options

T = TypeVar("T")

DEFAULT_PATH = "chatstream-sessions.sqlite3"
DEFAULT_TTL_S = 30 * 24 * 3600.0  # as long as the session cookie lives
_PURGE_EVERY_S = 60.0  # how often one store sweeps expired rows; a load never returns them anyway

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chatstream_sessions (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS chatstream_sessions_expires_at ON chatstream_sessions (expires_at);
"""


OPTIONS_PATH = "plugin_config.sqlite"


class SQLiteStoreOptions(PluginOptions):
    """``plugin_config.sqlite``."""

    path: Path = Field(Path(DEFAULT_PATH), description="the database file (created when missing)")
    ttl_s: float | None = Field(
        DEFAULT_TTL_S, gt=0, description="seconds after its last use a session expires (null: never)"
    )
    timeout_s: float = Field(10.0, gt=0, description="how long a writer waits for another process's lock")

    @field_validator("path")
    @classmethod
    def _a_file(cls, value: Path) -> Path:
        if not str(value) or str(value) == ".":
            raise ValueError("must be a file path")
        return value.expanduser()


class SQLiteSessionStore:
    """Sessions as JSON rows in one SQLite file.

    Safe for several worker processes on one machine: the file is in WAL mode (readers never wait
    for the writer), a writer waits up to ``timeout_s`` for another process's lock, and every save
    is one transaction, so a crash or a cancelled request leaves the old record or the new one,
    never a mix. Blocking calls run on one worker thread per store, off the event loop, in the
    order they were made. ``ttl_s`` after the last save or load a session expires (None: never).
    The file does not suit a network file system (SQLite's locks are unreliable there); use the
    ``redis`` store for replicas on several machines.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        ttl_s: float | None = DEFAULT_TTL_S,
        timeout_s: float = 10.0,
    ) -> None:
        options = parse_options(
            SQLiteStoreOptions, {"path": path, "ttl_s": ttl_s, "timeout_s": timeout_s}, OPTIONS_PATH
        )
        self.path = options.path
        self.ttl_s = options.ttl_s
        self.timeout_s = options.timeout_s
        self._conn: sqlite3.Connection | None = None
        self._conn_pid = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._next_purge = 0.0
        # Open now, so a bad path fails when the app starts rather than on the first chat.
        try:
            self._submit(self._connect).result()
        except BaseException:
            self._stop_thread()
            raise

    # -- worker thread -------------------------------------------------------------------------------
    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._executor is None:
            # One thread owns the connection: sqlite3 objects must not be used from two threads at once.
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="chatstream-sqlite"
            )
        return self._executor.submit(fn)

    async def _call(self, fn: Callable[[], T]) -> T:
        # A cancelled caller stops waiting, but the job still runs to its end on the worker thread:
        # a transaction is never cut in half.
        return await asyncio.wrap_future(self._submit(fn))

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL and return the journal mode. Two processes opening a new file at once can
        see "database is locked" here at once, without the busy handler waiting (the switch needs
        the file to itself): retry until ``timeout_s``, as every other statement waits."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._conn_pid == os.getpid():
            return self._conn
        # A connection inherited through fork() must not be used by the child; open a fresh one.
        self._conn = None
        if not self.path.parent.is_dir():  # sqlite's own message would only say "unable to open"
            raise ValueError(
                f"sqlite store path={str(self.path)!r}: the directory {str(self.path.parent)!r} "
                "does not exist; create it or point plugin_config.sqlite.path into an existing directory"
            )
        try:
            # isolation_level=None: transactions are begun explicitly below, never implicitly.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise ValueError(
                f"sqlite store path={str(self.path)!r}: cannot open the database ({exc}); "
                "set plugin_config.sqlite.path to a writable file"
            ) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            mode = self._enable_wal(conn)
            if str(mode).lower() != "wal":
                raise ValueError(
                    f"sqlite store path={str(self.path)!r}: the file system does not support WAL mode "
                    f"(got {mode!r}); put the file on a local disk"
                )
            # FULL: a saved turn survives a power cut, not only a process crash.
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.OperationalError:  # locked past the timeout, I/O error: not the file's fault
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
            conn.close()
            raise ValueError(
                f"sqlite store path={str(self.path)!r}: not a usable session database ({exc}); "
                "set plugin_config.sqlite.path to a new file"
            ) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._conn_pid = os.getpid()
        return conn

    def _expiry(self, now: float) -> float | None:
        return None if self.ttl_s is None else now + self.ttl_s

    def _load(self, session_id: str) -> dict[str, Any] | None:
        conn = self._connect()
        now = time.time()  # wall clock: shared by processes and across restarts
        # A row's own expiry counts even if the store's ttl_s changed since it was saved.
        # fetchall() runs each statement to its end: a half-read statement would keep its
        # transaction (and, for the UPDATE, the write lock) open.
        if self.ttl_s is None:
            rows = conn.execute(
                "SELECT data FROM chatstream_sessions "
                "WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (session_id, now),
            ).fetchall()
        else:
            # Refresh the expiry and read in one statement, so an expired row is never revived.
            rows = conn.execute(
                "UPDATE chatstream_sessions SET expires_at = ? "
                "WHERE id = ? AND (expires_at IS NULL OR expires_at > ?) RETURNING data",
                (self._expiry(now), session_id, now),
            ).fetchall()
        if not rows:
            return None
        record: dict[str, Any] = json.loads(rows[0][0])
        return record

    def _save(self, session_id: str, text: str) -> None:
        conn = self._connect()
        now = time.time()
        # IMMEDIATE takes the write lock up front; a read-then-upgrade could fail with "locked"
        # without waiting for the busy timeout.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO chatstream_sessions (id, data, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at",
                (session_id, text, self._expiry(now)),
            )
            if now >= self._next_purge:
                conn.execute("DELETE FROM chatstream_sessions WHERE expires_at <= ?", (now,))
                self._next_purge = now + _PURGE_EVERY_S
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _delete(self, session_id: str) -> None:
        self._connect().execute("DELETE FROM chatstream_sessions WHERE id = ?", (session_id,))

    def _disconnect(self) -> None:
        if self._conn is not None and self._conn_pid == os.getpid():
            self._conn.close()
        self._conn = None

    # -- SessionStore ----------------------------------------------------------------------------------
    async def load(self, session_id: str) -> dict[str, Any] | None:
        """The session's record, or None when there is none or it expired."""
        return await self._call(lambda: self._load(session_id))

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        """Replace the session's record in one transaction."""
        # Serialise now: the caller may change ``data`` while the worker thread is busy.
        try:
            text = json.dumps(data, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"sqlite store: the record of session {session_id!r} is not JSON-able: {exc}"
            ) from None
        await self._call(lambda: self._save(session_id, text))

    async def delete(self, session_id: str) -> None:
        """Forget the session (nothing happens if it does not exist)."""
        await self._call(lambda: self._delete(session_id))

    async def close(self) -> None:
        """Close the file and stop the worker thread; a later call opens them again."""
        if self._executor is None:
            return
        await self._call(self._disconnect)
        self._stop_thread()

    def _stop_thread(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # nothing is queued: the thread ends at once
            self._executor = None


def create_sqlite_store(options: SQLiteStoreOptions | dict[str, Any]) -> SQLiteSessionStore:
    """Store factory (``plugin_config.sqlite``)."""
    return SQLiteSessionStore(**dict(parse_options(SQLiteStoreOptions, options, OPTIONS_PATH)))


@hookimpl(trylast=True)
def register_session_stores(register: Any) -> None:
    register("sqlite", create_sqlite_store, options=SQLiteStoreOptions)
