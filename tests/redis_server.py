"""A real ``redis-server`` for tests: on a free loopback port, in a temporary directory, no persistence
unless asked.

Use ``RedisServer(tmp_dir)`` with ``start()``/``stop()`` (``stop()`` then ``start()`` again keeps the
port, to test recovery; with ``persistent=True`` the data is written to an append-only file before
each reply, so it survives ``kill()`` and a restart, as on a production server), or the
``redis_server_or_skip`` context manager, which skips the calling test when the ``redis-server``
binary is not installed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatstream.testing import free_port

REDIS_SERVER = "redis-server"
SKIP_REASON = (
    "redis-server is not installed (apt-get install redis-server); Redis store tests need a real server"
)


class RedisServer:
    """One ``redis-server`` child process bound to 127.0.0.1."""

    def __init__(self, directory: Path, port: int | None = None, persistent: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            raise RuntimeError(SKIP_REASON)
        log = self.directory / f"redis-{self.port}.log"
        # No RDB; an append-only file (synced before each reply) only when ``persistent``.
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                *aof,
                "--logfile", str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{text}")
            time.sleep(0.01)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop the server (its data is gone) and wait for the process to end."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def redis_server_or_skip(directory: Path) -> Iterator[RedisServer]:
    """A started server for the ``with`` block; skips the test when redis-server is missing."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.skip(SKIP_REASON)
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
