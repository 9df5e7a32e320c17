"""Rollout-shaped churn: many trajectories through fewer slots, each starting clean.

In RL every trajectory gets a workspace, works in it, is scored, is released, and its slot goes
to the next one. A trajectory that sees another's files can read its solution, and rewards are
wrong: these tests check that this never happens, however the releases and acquisitions of
different trajectories interleave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.executor import ExecutorConfig
from tests.conftest import StackFactory

_ROUNDS = 20
_TRAJECTORIES = 100
_SLOTS = 10


async def test_a_hundred_trajectories_through_ten_slots_each_start_empty_and_read_their_own(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=_SLOTS, executor_config=ExecutorConfig(acquire_timeout_s=120))
    client = stack.client
    worker = stack.workers[0]

    async def rollout(tid: str, reset: bool) -> tuple[str, str]:
        wrote = await client.execute(tid, "write_file", {"path": "me.txt", "content": tid})
        assert wrote.success, wrote.error
        # Its own file, and nothing else: the workspace was empty when it got it.
        seen = await client.execute(tid, "terminal", {"command": "cat me.txt; echo; ls -A"})
        await client.release(tid, reset_workspace=reset)
        return tid, seen.output if seen.success else f"FAILED: {seen.error}"

    for round_ in range(_ROUNDS):
        reset = round_ % 2 == 0  # with and without reset, alternately
        ids = [trajectory() for _ in range(_TRAJECTORIES)]
        outcomes = await asyncio.gather(*(rollout(tid, reset) for tid in ids))
        wrong = {tid: seen for tid, seen in outcomes if seen != f"{tid}\nme.txt\n"}
        assert not wrong, f"round {round_} (reset={reset}): {len(wrong)} saw {wrong}"
    await worker.wait_settled()
    assert worker.slots_free == _SLOTS
