"""Admission: N slots, a bounded FIFO line, refusal beyond it, waiters that leave."""

from __future__ import annotations

import asyncio

import pytest

from chatstream.admission import Admission, TooManyRequests


async def test_slots_then_queue_then_refusal() -> None:
    adm = Admission(max_processing=2, max_waiting=1)
    await adm.acquire()
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.load.to_dict() == {"processing": 2, "waiting": 1, "max_processing": 2, "max_waiting": 1}
    with pytest.raises(TooManyRequests):
        await adm.acquire()
    adm.release()
    await waiter
    assert adm.load.processing == 2 and adm.load.waiting == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    adm = Admission(max_processing=1, max_waiting=5)
    await adm.acquire()
    served: list[int] = []

    async def wait(n: int) -> None:
        await adm.acquire()
        served.append(n)

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(wait(n)))
        await asyncio.sleep(0)
    for _ in range(4):
        adm.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3]


async def test_cancelled_waiter_leaves_the_line_and_takes_no_slot() -> None:
    adm = Admission(max_processing=1, max_waiting=2)
    await adm.acquire()
    leaver = asyncio.create_task(adm.acquire())
    stayer = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert adm.load.waiting == 1
    adm.release()
    await stayer
    adm.release()
    assert adm.load.processing == 0 and adm.load.waiting == 0


async def test_closed_admission_refuses() -> None:
    adm = Admission(1, 1)
    adm.close()
    with pytest.raises(TooManyRequests):
        await adm.acquire()


def test_bad_limits_are_refused_with_the_option_name() -> None:
    with pytest.raises(ValueError, match="num_of_concurrent_executions"):
        Admission(0, 1)
    with pytest.raises(ValueError, match="max_queue_size"):
        Admission(1, -1)
