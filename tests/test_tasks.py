"""Shutdown ends a background loop even when the loop lost its cancel (Python 3.11 wait_for)."""

from __future__ import annotations

import asyncio

from services._tasks import cancel_and_wait


async def test_a_loop_that_lost_its_cancel_is_cancelled_again_and_ends() -> None:
    ticks = 0

    async def beat() -> None:
        nonlocal ticks
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if ticks == 0:  # as wait_for does when its result is in: the cancel is lost
                    ticks += 1
                    continue
                raise

    loop = asyncio.create_task(beat())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(10):
        await cancel_and_wait([loop])
    assert loop.cancelled()
    assert ticks == 1


async def test_a_bound_stops_the_wait_for_a_task_that_never_ends() -> None:
    released = False

    async def stubborn() -> None:
        while not released:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await cancel_and_wait([task], timeout_s=0.3)
    assert not task.done()
    released = True  # the test's own clean-up
    await task
