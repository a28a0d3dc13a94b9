"""The load test's fast subset (bench/load.py with small numbers): four times the admission
capacity, mixed clients, over real HTTP, on the echo mock and on the tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from chatstream.plugins.stores.memory import MemorySessionStore

_path = Path(__file__).resolve().parents[1] / "bench" / "load.py"
_spec = importlib.util.spec_from_file_location("chatstream_bench_load", _path)
assert _spec is not None and _spec.loader is not None
load = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = load  # dataclasses look their module up
_spec.loader.exec_module(load)


def test_mock_under_four_times_its_capacity_loses_and_leaks_nothing() -> None:
    config = load.LoadConfig(engine="mock", requests=30, waves=2, token_delay_s=0.002)
    report = load.run_load(config, in_process=True)
    print(report.render())
    assert report.violations() == []
    # every kind of client and outcome really happened
    assert report.outcomes["answered"] and report.outcomes["refused"] and report.outcomes["dropped"]
    # (which kinds win a slot depends on timing; that each kind was sent and settled does not)
    assert all(sum(report.by_kind[kind].values()) for kind in ("reader", "multi", "slow", "openai"))
    assert report.histories_checked >= 10 and report.server_errors == 0 and not report.leaks


def test_tiny_model_under_four_times_its_capacity_loses_and_leaks_nothing(tiny_model: Any) -> None:
    config = load.LoadConfig(engine="tiny", requests=8, slots=1, queue=1, waves=1, max_new_tokens=6)
    report = load.run_load(config, in_process=True, tiny_model=tiny_model)
    print(report.render())
    assert report.violations() == []
    assert report.outcomes["answered"] and report.outcomes["refused"]


class MixingStore(MemorySessionStore):
    """A broken store: every session reads the record saved last, whoever saved it."""

    async def load(self, session_id: str) -> dict[str, Any] | None:
        return await super().load(self.last) if hasattr(self, "last") else None

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        self.last = session_id
        await super().save(session_id, data)


def test_the_history_check_catches_mixed_conversations() -> None:
    config = load.LoadConfig(engine="mock", requests=12, waves=1, token_delay_s=0.001)
    report = load.run_load(config, in_process=True, session_store=MixingStore())
    assert report.history_problems
    assert any(problem.startswith("history:") for problem in report.violations())
