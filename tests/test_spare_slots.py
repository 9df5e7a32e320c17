"""Spare slots: a worker keeps ``spare_slots`` slots beyond ``slots``, free and warm, so that a
trajectory taking a released slot's place starts at once in a warm sandbox while the released
slot is wiped; no more than ``slots`` trajectories hold a slot at once.

Failed before there were spare slots (issue 10, items 3 and 4: at full load no free slot was
warm, and a waiter's first call waited for the released slot's wipe and a cold sandbox start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from services._slot_cleanup import SlotCleaner
from services._slots import Slot
from services.executor import ExecutorConfig
from services.worker import SandboxWorker
from tests._waits import until
from tests.conftest import StackFactory


def _warm_free(worker: SandboxWorker) -> int:
    return worker.info().slots_warm


async def test_a_waiter_gets_a_warm_spare_while_the_released_slot_is_still_wiped(
    make_stack: StackFactory, trajectory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(
        slots=1,
        worker_options={"spare_slots": 1, "warm_slots": 2},
        executor_config=ExecutorConfig(acquire_timeout_s=60),
    )
    worker = stack.workers[0]
    first, second = trajectory(), trajectory()
    held = await stack.client.execute(first, "terminal", {"command": "echo a > mine.txt"})
    assert held.success, held.error
    await until(lambda: _warm_free(worker) == 1)  # the spare is up, before anyone asks

    # The released slot's wipe waits at a gate of this test: the waiter must not.
    gate, wiping = asyncio.Event(), asyncio.Event()
    wipe = SlotCleaner._wipe

    async def gated_wipe(cleaner: SlotCleaner, slot: Slot) -> None:
        wiping.set()
        await gate.wait()
        await wipe(cleaner, slot)

    monkeypatch.setattr(SlotCleaner, "_wipe", gated_wipe)
    waiting = asyncio.create_task(
        stack.client.execute(second, "terminal", {"command": "ls -A; whoami"})
    )
    try:
        await until(lambda: stack.executors[0].trajectories_waiting == 1)  # one slot at a time
        # The release answers once its slot is clean, so not before the gate opens.
        releasing = asyncio.create_task(stack.client.release(first, reset_workspace=True))
        async with asyncio.timeout(30):
            await wiping.wait()
            result = await waiting
        assert not gate.is_set() and not releasing.done()
        assert result.success, result.error
        assert result.output.split() == ["sandbox"]  # nothing of the first trajectory
        assert result.metadata["slot"] != held.metadata["slot"]
        gate.set()
        async with asyncio.timeout(30):
            assert (await releasing).slot == held.metadata["slot"]
    finally:
        gate.set()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_spare_slots_do_not_raise_how_many_trajectories_hold_a_slot(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        slots=1,
        worker_options={"spare_slots": 2},
        executor_config=ExecutorConfig(acquire_timeout_s=60),
    )
    worker = stack.workers[0]
    assert (len(list(worker._table)), worker.info().slots_total) == (3, 1)
    first, second = trajectory(), trajectory()
    assert (await stack.client.execute(first, "terminal", {"command": "true"})).success
    assert worker.slots_free == 0 and worker.info().slots_free == 0
    waiting = asyncio.create_task(stack.client.execute(second, "terminal", {"command": "true"}))
    try:
        await until(lambda: stack.executors[0].trajectories_waiting == 1)
        assert worker._table.holding(second) is None  # three slots, one trajectory at a time
        await stack.client.release(first, reset_workspace=True)
        async with asyncio.timeout(30):
            assert (await waiting).success
        assert worker._table.holding(second) is not None
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
