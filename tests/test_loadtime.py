"""LoadTime: measures a load once, then shows a progress bar estimated from it."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from chatstream.loadtime import LoadTime


def slow_load(seconds: float = 0.25) -> str:
    time.sleep(seconds)
    return "model"


def test_first_run_returns_the_result_and_remembers_the_duration(tmp_path: Path) -> None:
    out = io.StringIO()
    loader = LoadTime(name="m", fn=slow_load, cache_dir=tmp_path, file=out)
    assert loader() == "model"
    assert out.getvalue() == ""  # nothing to estimate from: no bar
    remembered = loader.remembered_seconds()
    assert remembered is not None and 0.2 <= remembered < 5


def test_later_runs_show_a_bar_that_ends_at_100_percent(tmp_path: Path) -> None:
    LoadTime(name="m", fn=slow_load, cache_dir=tmp_path)()
    out = io.StringIO()
    assert LoadTime(name="m", fn=slow_load, cache_dir=tmp_path, file=out)() == "model"
    shown = out.getvalue()
    assert "Loading m" in shown
    assert "100%" in shown
    assert any(f"{p}%" in shown for p in range(10, 100))  # it moved while the load ran


def test_durations_are_kept_per_name(tmp_path: Path) -> None:
    LoadTime(name="a", fn=lambda: slow_load(0.01), cache_dir=tmp_path)()
    LoadTime(name="b", fn=lambda: slow_load(0.2), cache_dir=tmp_path)()
    records = json.loads((tmp_path / "load_times.json").read_text())
    assert set(records) == {"a", "b"}
    assert records["b"] > records["a"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"m": "slow"}'])
def test_a_corrupt_record_counts_as_missing_and_is_rewritten(tmp_path: Path, content: str) -> None:
    (tmp_path / "load_times.json").write_text(content)
    out = io.StringIO()
    assert LoadTime(name="m", fn=lambda: slow_load(0.01), cache_dir=tmp_path, file=out)() == "model"
    assert out.getvalue() == ""
    assert isinstance(json.loads((tmp_path / "load_times.json").read_text())["m"], float)


def test_a_failing_load_raises_and_is_not_remembered(tmp_path: Path) -> None:
    LoadTime(name="m", fn=lambda: slow_load(0.01), cache_dir=tmp_path)()
    before = (tmp_path / "load_times.json").read_text()

    def broken() -> str:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        LoadTime(name="m", fn=broken, cache_dir=tmp_path, file=io.StringIO())()
    assert (tmp_path / "load_times.json").read_text() == before


def test_an_unwritable_cache_dir_does_not_break_the_load(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert LoadTime(name="m", fn=lambda: "ok", cache_dir=blocker / "sub")() == "ok"


def test_an_empty_name_is_refused() -> None:
    with pytest.raises(ValueError, match="name"):
        LoadTime(name="", fn=lambda: None)
