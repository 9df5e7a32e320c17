"""One trajectory flooding calls cannot starve the others.

Before the per-trajectory cap (services/_fair_share.py), a trajectory's flood filled the
executor's ``max_pending_calls`` and every other trajectory got 429 until the flood drained:
the first test failed there, the bystander refused. A worker's slots were already fair (a
slot runs one call at a time, so a flood waits in its own slot's queue): the second test
guards that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from schemas.errors import ErrorKind
from services._fair_share import TrajectoryLimits
from services.exceptions import Overloaded
from services.executor import ExecutorConfig
from tests._waits import until
from tests.conftest import StackFactory


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_call_past_the_cap_is_refused_with_a_hint_from_the_trajectorys_pace() -> None:
    clock = _Clock()
    limits = TrajectoryLimits(max_calls=2, clock=clock)
    first, second = limits.admit("t"), limits.admit("t")
    with pytest.raises(Overloaded) as refused:
        limits.admit("t")
    assert refused.value.kind == ErrorKind.TOO_MANY_CALLS
    assert "2 calls" in refused.value.message
    assert refused.value.retry_after_s is not None  # no pace seen yet: the default hint
    limits.admit("other").__exit__(None, None, None)  # another trajectory is not affected
    clock.now += 0.4
    with first:
        pass  # ended 0.4 s after it began: the first pace seen
    third = limits.admit("t")  # room again
    with pytest.raises(Overloaded) as refused:
        limits.admit("t")
    assert refused.value.retry_after_s == pytest.approx(0.4)
    clock.now += 0.2
    with second:
        pass
    fourth = limits.admit("t")
    with pytest.raises(Overloaded) as refused:
        limits.admit("t")
    # Calls of one slot end one after another: the next is expected a pace (0.2-0.4 s) away.
    assert refused.value.retry_after_s is not None
    assert 0.2 < refused.value.retry_after_s < 0.4
    for calls in (third, fourth):
        with calls:
            pass
    assert limits.trajectories == 0  # nothing kept of a trajectory with nothing in flight


async def test_a_flooding_trajectory_is_capped_and_the_others_are_served(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    config = ExecutorConfig(max_pending_calls=16, max_calls_per_trajectory=4)
    stack = await make_stack(slots=2, executor_config=config)
    flooder, bystander = trajectory(), trajectory()
    assert (await stack.client.execute(flooder, "terminal", {"command": "true"})).success
    executor = stack.executors[0]
    before = executor.total_requests
    flood = [
        asyncio.create_task(stack.client.execute(flooder, "terminal", {"command": "sleep 1"}))
        for _ in range(40)
    ]
    await until(lambda: executor.total_requests - before == 40)  # every flood call arrived
    result = await stack.client.execute(bystander, "terminal", {"command": "echo served"})
    assert result.success, result.error
    assert result.output.strip() == "served"
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    refused = [outcome for outcome in outcomes if isinstance(outcome, Overloaded)]
    ran = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    assert len(ran) == 4 and all(outcome.success for outcome in ran), outcomes
    assert len(refused) == 36, outcomes
    assert {error.kind for error in refused} == {ErrorKind.TOO_MANY_CALLS}
    assert all(error.retry_after_s and error.retry_after_s > 0 for error in refused)
    # The cap holds calls in flight, not calls ever: once the flood ended, the next call runs.
    assert (await stack.client.execute(flooder, "terminal", {"command": "true"})).success


async def test_a_flood_waits_in_its_own_slot_and_another_slots_call_runs_at_once(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=2)
    flooder, bystander = trajectory(), trajectory()
    for trajectory_id in (flooder, bystander):  # each has its slot before the flood
        assert (await stack.client.execute(trajectory_id, "terminal", {"command": "true"})).success
    finished: list[str] = []

    async def call(trajectory_id: str, command: str) -> None:
        result = await stack.client.execute(trajectory_id, "terminal", {"command": command})
        assert result.success, result.error
        finished.append(trajectory_id)

    executor = stack.executors[0]
    before = executor.total_requests
    flood = [asyncio.create_task(call(flooder, "sleep 1")) for _ in range(6)]
    await until(lambda: executor.total_requests - before == 6)
    await call(bystander, "true")
    # The flood's calls run one after another (1 s each); the bystander's is not behind them.
    assert finished.index(bystander) <= 2, finished
    await asyncio.gather(*flood)
