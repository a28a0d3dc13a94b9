"""``LoadTime``: a progress bar for a slow load, estimated from how long it took last time.

The first run of a named load only measures it; later runs show a tqdm bar that fills in step
with the remembered duration while the load runs in the calling thread, and closes at 100%
when it is done. Durations live in a small JSON file in the user cache directory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_FILE_NAME = "load_times.json"
_TICK_S = 0.1


def default_cache_dir() -> Path:
    """Where load durations are remembered: the platform's user cache dir for chatstream."""
    try:
        import platformdirs
    except ImportError:  # a declared dependency, but a missing one must not stop a model loading
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatstream"
    return Path(platformdirs.user_cache_dir("chatstream"))


class LoadTime(Generic[T]):
    """Run ``fn()`` once, with a progress bar estimated from the previous run of ``name``.

    ``LoadTime(name="model", fn=lambda: load(...))()`` returns what ``fn`` returns. A missing or
    unreadable record is treated as a first run and rewritten; errors writing it are logged
    and otherwise ignored (a progress bar is never a reason for a load to fail).
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[], T],
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        file: Any = None,
    ) -> None:
        if not name:
            raise ValueError("LoadTime name must be a non-empty string (it keys the remembered duration)")
        self.name = name
        self.fn = fn
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.file = file  # where the bar is drawn; None = tqdm's default (stderr)

    @property
    def record_path(self) -> Path:
        """The JSON file holding every remembered duration."""
        return self.cache_dir / _FILE_NAME

    def _read_all(self) -> dict[str, float]:
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and v >= 0}

    def remembered_seconds(self) -> float | None:
        """The duration of the last completed run of this load, or None when unknown."""
        return self._read_all().get(self.name)

    def _remember(self, seconds: float) -> None:
        records = self._read_all()
        records[self.name] = seconds
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(records, indent=1, sort_keys=True), encoding="utf-8")
            tmp.replace(self.record_path)
        except OSError as exc:
            log.warning("could not remember load time of %r in %s: %s", self.name, self.record_path, exc)

    def __call__(self) -> T:
        """Run the load and return its result."""
        expected = self.remembered_seconds()
        start = time.perf_counter()
        result = self.fn() if expected is None or expected <= 0 else self._run_with_bar(expected)
        self._remember(time.perf_counter() - start)
        return result

    def _run_with_bar(self, expected: float) -> T:
        from tqdm.auto import tqdm

        done = threading.Event()
        # Whole percent steps: the bar reads as an estimate, never as an exact count.
        bar = tqdm(total=100, desc=f"Loading {self.name}", unit="%", file=self.file, leave=True)

        def tick() -> None:
            start = time.perf_counter()
            while not done.wait(_TICK_S):
                # Stop short of 100% while the load still runs longer than last time.
                target = min(99, int(100 * (time.perf_counter() - start) / expected))
                if target > bar.n:
                    bar.update(target - bar.n)

        ticker = threading.Thread(target=tick, name=f"loadtime-{self.name}", daemon=True)
        ticker.start()
        finished = False
        try:
            result = self.fn()
            finished = True
        finally:
            done.set()
            ticker.join()
            if finished:
                bar.update(100 - bar.n)
            bar.close()
        return result
