"""Session stores (memory, sqlite, redis): one contract for all, then what each adds.

Redis tests run a real ``redis-server`` (tests/redis_server.py) and skip when it is not installed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, redis_server_or_skip

from chatstream.plugins.stores.memory import MemorySessionStore
from chatstream.plugins.stores.redis import RedisSessionStore, SessionStoreUnavailable, create_redis_store
from chatstream.plugins.stores.sqlite import SQLiteSessionStore, create_sqlite_store
from chatstream.sessions import SessionStore
from chatstream.testing import free_port

STORE_KINDS = ("memory", "sqlite", "redis")

RECORD: dict[str, Any] = {
    "prompt": {
        "contents": [
            {"role": "ユーザー", "message": "日本の首都はどこですか？🗼", "id": "m1"},
            {"role": "アシスタント", "message": '東京です。\n改行と "引用符" と \\ も。', "id": "m2"},
            {"role": "ユーザー", "message": None, "id": "m3"},
        ],
        "system": "",
    },
    "generation_params": {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "stop": ["</s>", "ユーザー:"]},
    "nested": {"a": [1, 2.5, True, False, None, {"b": {"c": []}}]},
}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server_or_skip(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., SessionStore]]:
    """Factory ``open_store(kind, **options)``; every store it made is closed after the test.

    For sqlite, every store of one test shares one file; for redis, one key prefix.
    """
    made: list[SessionStore] = []
    prefix = f"test:{uuid.uuid4().hex}:"

    def make(kind: str, **options: Any) -> SessionStore:
        store: SessionStore
        if kind == "memory":
            store = MemorySessionStore(**options)
        elif kind == "sqlite":
            store = SQLiteSessionStore(tmp_path / "sessions.sqlite3", **options)
        elif kind == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            options.setdefault("url", server.url)
            store = RedisSessionStore(prefix=prefix, **options)
        else:  # pragma: no cover
            raise AssertionError(kind)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


# -- the contract every store keeps ------------------------------------------------------------------
@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_nested_japanese_record_round_trips(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    assert isinstance(store, SessionStore)
    await store.save("s1", RECORD)
    assert await store.load("s1") == RECORD
    assert await store.load("s1") == RECORD  # a load does not consume the record


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_missing_overwrite_and_delete(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    assert await store.load("nobody") is None
    await store.delete("nobody")  # deleting what is not there is fine
    await store.save("a", {"old": 1, "kept?": "no"})
    await store.save("b", {"other": "session"})
    await store.save("a", {"new": 2})
    assert await store.load("a") == {"new": 2}  # replaced whole, never merged
    await store.delete("a")
    assert await store.load("a") is None
    assert await store.load("b") == {"other": "session"}


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_stored_record_is_a_snapshot(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)
    data: dict[str, Any] = {"prompt": {"contents": ["hello"]}}
    await store.save("s", data)
    data["prompt"]["contents"].append("changed after save")
    loaded = await store.load("s")
    assert loaded == {"prompt": {"contents": ["hello"]}}
    assert loaded is not None
    loaded["prompt"]["contents"].append("changed after load")
    assert await store.load("s") == {"prompt": {"contents": ["hello"]}}


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_session_expires_ttl_after_last_use(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind, ttl_s=0.6)
    await store.save("s", {"n": 1})
    await asyncio.sleep(0.35)
    assert await store.load("s") == {"n": 1}  # this load starts the TTL again
    await asyncio.sleep(0.35)
    assert await store.load("s") == {"n": 1}  # 0.7 s after the save, 0.35 s after the last use
    await asyncio.sleep(0.8)
    assert await store.load("s") is None


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_concurrent_saves_never_corrupt(kind: str, open_store: Callable[..., SessionStore]) -> None:
    store = open_store(kind)

    def record(task: int, turn: int) -> dict[str, Any]:
        return {"task": task, "turn": turn, "text": f"タスク{task} " * 50, "list": list(range(turn + 1))}

    async def worker(task: int) -> None:
        for turn in range(5):
            await store.save(f"own-{task}", record(task, turn))
            await store.save("shared", record(task, turn))

    await asyncio.gather(*(worker(task) for task in range(30)))
    for task in range(30):
        assert await store.load(f"own-{task}") == record(task, 4)
    shared = await store.load("shared")
    assert shared is not None
    assert shared == record(shared["task"], 4)  # one writer's whole last record


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_cancelled_save_leaves_old_or_new_record(
    kind: str, open_store: Callable[..., SessionStore]
) -> None:
    store = open_store(kind)
    old = {"version": "old", "text": "古い" * 1000}
    new = {"version": "new", "text": "新しい" * 50_000}
    for yields in range(6):  # cancel at several points of the save
        await store.save("s", old)
        task = asyncio.create_task(store.save("s", new))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        # A save may finish before the cancellation lands; either way the record is whole.
        outcome: BaseException | None = (await asyncio.gather(task, return_exceptions=True))[0]
        assert outcome is None or isinstance(outcome, asyncio.CancelledError)
        assert await store.load("s") in (old, new)


# -- sqlite ------------------------------------------------------------------------------------------
async def test_sqlite_data_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    first = SQLiteSessionStore(path)
    await first.save("s", RECORD)
    await first.close()
    second = SQLiteSessionStore(path)
    try:
        assert await second.load("s") == RECORD
    finally:
        await second.close()
    assert await first.load("s") == RECORD  # a closed store opens the file again when used
    await first.close()


async def test_sqlite_ttl_counts_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    first = SQLiteSessionStore(path, ttl_s=0.3)
    await first.save("s", {"n": 1})
    await first.close()
    await asyncio.sleep(0.5)
    second = SQLiteSessionStore(path, ttl_s=0.3)
    try:
        assert await second.load("s") is None
    finally:
        await second.close()


_WRITER = textwrap.dedent(
    """
    import asyncio, pathlib, sys, time
    from chatstream.plugins.stores.sqlite import SQLiteSessionStore

    path, name, count, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])

    async def main():
        store = SQLiteSessionStore(path, timeout_s=60)  # a loaded CI machine can be slow to fsync
        (folder / f"ready-{name}").touch()
        while not (folder / "go").exists():  # start both writers together
            time.sleep(0.002)
        for i in range(count):
            await store.save(f"{name}-{i}", {"writer": name, "i": i, "text": "会話" * 100})
            await store.save("shared", {"writer": name, "i": i})
        await store.close()

    asyncio.run(main())
    """
)


async def test_sqlite_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    count = 40
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), name, str(count), str(tmp_path)])
        for name in ("w1", "w2")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{name}").exists() for name in ("w1", "w2")):
        assert all(w.poll() is None for w in writers), "a writer process failed to start"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    (tmp_path / "go").touch()
    assert [await asyncio.to_thread(w.wait, 120) for w in writers] == [0, 0]
    store = SQLiteSessionStore(path)
    try:
        for name in ("w1", "w2"):
            for i in range(count):
                assert await store.load(f"{name}-{i}") == {"writer": name, "i": i, "text": "会話" * 100}
        shared = await store.load("shared")
        assert shared is not None and shared["i"] == count - 1 and shared["writer"] in ("w1", "w2")
    finally:
        await store.close()


def test_sqlite_bad_path_and_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*plugin_config\.sqlite\.path"):
        SQLiteSessionStore(tmp_path / "missing-dir" / "s.sqlite3")
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("these are not sessions\n" * 100)
    with pytest.raises(ValueError, match=r"not a usable session database"):
        SQLiteSessionStore(not_a_db)
    assert not_a_db.read_text().startswith("these are not sessions")  # never overwritten
    with pytest.raises(ValueError, match=r"'plugin_config\.sqlite\.ttl_s': .*greater than 0 \(got 0\)"):
        SQLiteSessionStore(tmp_path / "s.sqlite3", ttl_s=0)
    with pytest.raises(
        ValueError,
        match=r"'plugin_config\.sqlite\.ttl': unknown option; known options: path, ttl_s, timeout_s",
    ):
        create_sqlite_store({"path": str(tmp_path / "s.sqlite3"), "ttl": 5})


# -- redis -------------------------------------------------------------------------------------------
async def test_redis_data_survives_a_new_store_instance(open_store: Callable[..., SessionStore]) -> None:
    first = open_store("redis")
    await first.save("s", RECORD)
    await first.close()
    assert await open_store("redis").load("s") == RECORD


async def test_redis_replicas_see_each_others_writes(open_store: Callable[..., SessionStore]) -> None:
    replica_a, replica_b = open_store("redis"), open_store("redis")
    await replica_a.save("s", {"turn": 1})
    assert await replica_b.load("s") == {"turn": 1}
    await replica_b.save("s", {"turn": 2})
    assert await replica_a.load("s") == {"turn": 2}
    await replica_a.delete("s")
    assert await replica_b.load("s") is None


async def test_redis_keys_use_the_prefix_and_carry_the_ttl(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url, ttl_s=100, prefix="myapp:")
    try:
        await store.save("abc", {"x": 1})
        assert await store.client.exists("myapp:abc") == 1
        assert 0 < await store.client.pttl("myapp:abc") <= 100_000
        forever = RedisSessionStore(redis_server.url, ttl_s=None, prefix="myapp:")
        await forever.save("abc", {"x": 2})
        assert await store.client.pttl("myapp:abc") == -1  # no expiry
        assert await forever.load("abc") == {"x": 2}
        await forever.close()
    finally:
        await store.client.delete("myapp:abc")
        await store.close()


async def test_unreachable_redis_raises_session_store_unavailable() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/3"
    store = RedisSessionStore(url, timeout_s=1)
    try:
        calls = (store.load("s"), store.save("s", {"a": 1}), store.delete("s"))
        for call in calls:
            started = time.monotonic()
            with pytest.raises(SessionStoreUnavailable) as info:
                await call
            assert time.monotonic() - started < 5  # fails fast, the user is not left hanging
            message = str(info.value)
            assert isinstance(info.value, ConnectionError)
            assert url.replace("hunter2", "***") in message and "plugin_config.redis.url" in message
            assert "hunter2" not in message  # the password never reaches logs or responses
    finally:
        await store.close()


async def test_redis_store_recovers_when_the_server_comes_back(tmp_path: Path) -> None:
    with redis_server_or_skip(tmp_path) as server:
        store = RedisSessionStore(server.url, timeout_s=1)
        try:
            await store.save("s", {"before": True})
            server.stop()
            with pytest.raises(SessionStoreUnavailable, match=str(server.port)):
                await store.save("s", {"during": True})
            with pytest.raises(SessionStoreUnavailable):
                await store.load("s")
            server.start()
            await store.save("s", {"after": True})
            assert await store.load("s") == {"after": True}
        finally:
            await store.close()


def test_redis_bad_url_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"plugin_config\.redis\.url"):
        RedisSessionStore("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match=r"'plugin_config\.redis\.ttl_s': .*0\.001 \(got -1\)"):
        RedisSessionStore(ttl_s=-1)
    with pytest.raises(
        ValueError,
        match=r"'plugin_config\.redis\.host': unknown option; known options: url, ttl_s, prefix, timeout_s",
    ):
        create_redis_store({"host": "localhost"})


def test_store_modules_import_no_client_library() -> None:
    code = (
        "import sys, chatstream.plugins.stores.redis, chatstream.plugins.stores.sqlite; "
        "assert 'redis' not in sys.modules, 'redis imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_redis_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "redis" or name.startswith("redis."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # makes "import redis" fail
    with pytest.raises(ImportError, match="pip install redis"):
        create_redis_store({})


_OPENER = textwrap.dedent(
    """
    import pathlib, sys, time
    from chatstream.plugins.stores.sqlite import SQLiteSessionStore

    path, go = sys.argv[1], pathlib.Path(sys.argv[2])
    while not go.exists():  # open together
        time.sleep(0.0005)
    SQLiteSessionStore(path, timeout_s=60)
    """
)


def test_sqlite_processes_opening_a_new_file_at_once_all_start(tmp_path: Path) -> None:
    """Worker processes starting together on a new database: switching it to WAL can report
    "database is locked" at once, without waiting; every one of them must still start. (The race
    is timing-dependent: before the fix it failed CI about once in five runs, here only sometimes.)"""
    for round_ in range(6):
        folder = tmp_path / str(round_)
        folder.mkdir()
        openers = [
            subprocess.Popen(
                [sys.executable, "-c", _OPENER, str(folder / "s.sqlite3"), str(folder / "go")],
                stderr=subprocess.PIPE,
            )
            for _ in range(3)
        ]
        time.sleep(0.8)  # all three imported and waiting
        (folder / "go").touch()
        for opener in openers:
            _, err = opener.communicate(timeout=60)
            assert opener.returncode == 0, err.decode()[-500:]
