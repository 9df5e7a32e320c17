"""Warm slots: a free slot's sandbox is started before a trajectory asks for it.

A warm sandbox must be as clean as a cold one: started only in a FREE slot whose workspace was
wiped, never one a previous trajectory's commands ran in. The tests look at the sandboxes
themselves (``running``, ``launcher_pid``: bubblewrap's pid, new at each start), not at timings.
They poll the worker's state with a bound (``_until``) where there is no event to await.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
import structlog
from nats.aio.client import Client

from schemas.internal import AcquireOutcome, AcquireReply, AcquireRequest
from schemas.messages import WorkerStatus
from services._sandbox import BwrapSandbox
from services._slots import Slot, SlotState
from services.worker import SandboxWorker, WorkerConfig
from tests._waits import until
from tests.conftest import StackFactory

_LEAVE_TRACES = (
    "echo secret > a.txt; echo secret > /tmp/a.txt; "
    "(setsid sleep 1000 >/dev/null 2>&1 &); nohup sleep 1000 >/dev/null 2>&1 & echo ok"
)
# The last trajectory's sleeps ("sleep 1000"), not the one the sandbox's pid 1 waits on.
_LOOK_FOR_TRACES = "ls -A; ls -A /tmp; ps -e -o args= | grep -c '^sleep 1000$' || true"


def _sandbox(slot: Slot) -> BwrapSandbox:
    sandbox = slot.tools.sandbox
    assert isinstance(sandbox, BwrapSandbox), "these tests need bubblewrap"
    return sandbox


def _slots(worker: SandboxWorker) -> list[Slot]:
    return list(worker._table)


def _warm(worker: SandboxWorker) -> list[Slot]:
    return [s for s in _slots(worker) if s.state is SlotState.FREE and _sandbox(s).running]


def _slot_of(worker: SandboxWorker, trajectory_id: str) -> Slot:
    slot = worker._table.holding(trajectory_id)
    assert slot is not None
    return slot


async def _acquire(nc: Client, worker: SandboxWorker, trajectory_id: str) -> Slot:
    request = AcquireRequest(trajectory_id=trajectory_id).model_dump_json().encode()
    subject = worker._config.subjects.worker_acquire(worker.worker_id)
    reply = AcquireReply.model_validate_json((await nc.request(subject, request, timeout=10)).data)
    assert reply.outcome is AcquireOutcome.LEASED, reply
    return _slot_of(worker, trajectory_id)


async def test_free_slots_are_warmed_up_to_the_bound_and_a_warm_one_is_given_first(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack(slots=4, worker_options={"warm_slots": 2})
    worker = stack.workers[0]
    await until(lambda: len(_warm(worker)) == 2)
    first = trajectory()
    taken = await _acquire(nc, worker, first)
    assert _sandbox(taken).running, "a warm slot is given"
    await until(lambda: len(_warm(worker)) == 2)  # refilled from the two cold ones
    await stack.client.release(first, reset_workspace=True)
    await worker.wait_settled()
    await worker.wait_warmed()
    assert len(_warm(worker)) == 2  # never more than the bound: the freed slot stays cold
    assert worker.info().slots_warm == 2
    assert taken.state is SlotState.FREE and not _sandbox(taken).running
    # A warm slot before a cold one, wherever they are in the table.
    second = await _acquire(nc, worker, trajectory())
    assert second is not taken and _sandbox(second).running


async def test_the_first_call_in_a_warm_slot_starts_no_sandbox(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=2, worker_options={"warm_slots": 2})
    worker = stack.workers[0]
    await until(lambda: len(_warm(worker)) == 2)
    pids = {s.index: _sandbox(s).launcher_pid for s in _slots(worker)}
    tid = trajectory()
    first = await stack.client.execute(tid, "terminal", {"command": "echo hello"})
    assert first.success, first.error
    slot = _slot_of(worker, tid)
    assert pids[slot.index] is not None
    assert _sandbox(slot).launcher_pid == pids[slot.index]  # the same sandbox: no start


async def test_a_slot_released_with_reset_is_warmed_again_with_nothing_of_its_last_trajectory(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=1, worker_options={"warm_slots": 1})
    worker = stack.workers[0]
    (slot,) = _slots(worker)
    await until(lambda: len(_warm(worker)) == 1)
    first, second = trajectory(), trajectory()
    traces = await stack.client.execute(first, "terminal", {"command": _LEAVE_TRACES})
    assert traces.success and traces.output.strip() == "ok", traces
    pid_of_first = _sandbox(slot).launcher_pid
    await stack.client.release(first, reset_workspace=True)
    await worker.wait_settled()
    await until(lambda: len(_warm(worker)) == 1)  # warmed again, in the background
    pid_of_warm = _sandbox(slot).launcher_pid
    assert pid_of_warm is not None and pid_of_warm != pid_of_first
    seen = await stack.client.execute(second, "terminal", {"command": _LOOK_FOR_TRACES})
    assert seen.success, seen.error
    assert seen.output.split() == ["0"], "no file, no /tmp file, no sleep of the last one"
    assert _sandbox(slot).launcher_pid == pid_of_warm


async def test_a_slot_released_without_reset_is_not_warmed_until_it_is_wiped(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=1, worker_options={"warm_slots": 1})
    worker = stack.workers[0]
    (slot,) = _slots(worker)
    first, second = trajectory(), trajectory()
    traces = await stack.client.execute(first, "terminal", {"command": _LEAVE_TRACES})
    assert traces.success, traces
    await stack.client.release(first, reset_workspace=False)
    await worker.wait_settled()
    await worker.wait_warmed()
    assert slot.state is SlotState.DIRTY
    assert not _sandbox(slot).running  # its files are still there: no sandbox on them
    seen = await stack.client.execute(second, "terminal", {"command": _LOOK_FOR_TRACES})
    assert seen.success, seen.error
    assert seen.output.split() == ["0"]


async def test_rollouts_through_warm_slots_each_get_a_fresh_sandbox(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    """Releases land at any point of the warm starts: before, during, after."""
    stack = await make_stack(slots=2, worker_options={"warm_slots": 2})
    worker = stack.workers[0]
    pids: dict[int, list[int | None]] = {0: [], 1: []}

    async def rollout(tid: str, reset: bool) -> str:
        seen = await stack.client.execute(tid, "terminal", {"command": _LOOK_FOR_TRACES})
        pids[_slot_of(worker, tid).index].append(_sandbox(_slot_of(worker, tid)).launcher_pid)
        traces = await stack.client.execute(tid, "terminal", {"command": _LEAVE_TRACES})
        assert traces.success, traces
        await stack.client.release(tid, reset_workspace=reset)
        return seen.output if seen.success else f"FAILED: {seen.error}"

    for round_ in range(6):
        seen = await asyncio.gather(*(rollout(trajectory(), round_ % 3 != 2) for _ in range(4)))
        assert all(s.split() == ["0"] for s in seen), (round_, seen)
    for index, sequence in pids.items():
        assert len(set(sequence)) == len(sequence), (index, sequence)  # a new one each time
    await worker.wait_settled()
    assert worker.slot_states()["out_of_service"] == 0


async def _own_worker(
    nats_url: str, tmp_path: Path, **options: object
) -> tuple[SandboxWorker, Client]:
    worker_id = f"warm-{uuid.uuid4().hex[:6]}"
    connection = await nats.connect(nats_url, name=worker_id)
    config = WorkerConfig(
        worker_id=worker_id,
        workspace_root=tmp_path / worker_id,
        heartbeat_s=0.5,
        min_free_disk_mb=0,
        **options,  # type: ignore[arg-type]
    )
    return SandboxWorker(connection, config), connection


def _gate_warm_starts(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Warm starts (``BwrapSandbox.start``; a trajectory's commands start their sandbox without
    it) wait for the gate before they begin: a start that takes long before it looks at the
    sandbox's resets, the worst case for a release that comes meanwhile."""
    gate = asyncio.Event()
    real = BwrapSandbox.start

    async def gated(self: BwrapSandbox) -> None:
        await gate.wait()
        await real(self)

    monkeypatch.setattr(BwrapSandbox, "start", gated)
    return gate


@pytest.mark.parametrize("reset", [False, True])
async def test_a_release_during_a_warm_start_leaves_the_slot_clean(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    reset: bool,
) -> None:
    gate = _gate_warm_starts(monkeypatch)
    stack = await make_stack(slots=1, worker_options={"warm_slots": 1})
    worker = stack.workers[0]
    (slot,) = _slots(worker)
    await until(lambda: worker._warm.starting == 1)  # waiting at the gate
    first, second = trajectory(), trajectory()
    # The trajectory's command starts the sandbox itself, and leaves traces in it.
    traces = await stack.client.execute(first, "terminal", {"command": _LEAVE_TRACES})
    assert traces.success, traces
    pid_of_first = _sandbox(slot).launcher_pid
    await stack.client.release(first, reset_workspace=reset)
    await worker.wait_settled()
    gate.set()  # the warm start goes on, in a slot that is nobody's or FREE again
    await worker.wait_warmed()
    assert worker.slot_states()["out_of_service"] == 0
    if not reset:
        assert slot.state is SlotState.DIRTY
        assert not _sandbox(slot).running, "a released, unwiped slot holds no sandbox"
    else:
        assert slot.state is SlotState.FREE
        assert _sandbox(slot).launcher_pid not in (None, pid_of_first)
    seen = await stack.client.execute(second, "terminal", {"command": _LOOK_FOR_TRACES})
    assert seen.success, seen.error
    assert seen.output.split() == ["0"]


async def test_a_warm_start_that_fails_leaves_the_slot_in_service_and_logs_once(
    make_stack: StackFactory, trajectory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = BwrapSandbox.start

    async def failing(self: BwrapSandbox) -> None:
        # A real failure: bubblewrap cannot be executed, for warm starts only.
        working = self._options
        self._options = dataclasses.replace(working, bwrap="/nonexistent/bwrap")
        try:
            await real(self)
        finally:
            self._options = working

    monkeypatch.setattr(BwrapSandbox, "start", failing)
    with structlog.testing.capture_logs() as logs:
        stack = await make_stack(slots=3, worker_options={"warm_slots": 2})
        worker = stack.workers[0]
        await until(lambda: worker._warm.failures >= 1)
        await worker.wait_warmed()
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert len(warnings) == 1, warnings
    assert worker.slot_states() == {**worker.slot_states(), "free": 3, "out_of_service": 0}
    assert not _warm(worker)
    # A slot whose warm start failed is tried again only after its next use, not in a loop.
    assert worker._warm.failures <= 3
    result = await stack.client.execute(trajectory(), "terminal", {"command": "echo cold"})
    assert result.success and result.output.strip() == "cold", result  # cold starts work


async def test_warm_starts_run_a_bounded_few_at_a_time_and_shutdown_ends_them(
    nats_url: str, tmp_path: Path
) -> None:
    worker, connection = await _own_worker(nats_url, tmp_path, slots=6, warm_slots=6)
    try:
        await worker.__aenter__()
        await until(lambda: len(_warm(worker)) == 6)
        assert 1 <= worker._warm.peak_starting <= 2
        sandboxes = [_sandbox(s) for s in _slots(worker)]
    finally:
        await worker.__aexit__(None, None, None)
        await connection.drain()
    assert not any(s.running for s in sandboxes), "the worker's exit ends its warm sandboxes"
    pids = {s.launcher_pid for s in sandboxes}
    assert pids == {None}
    assert not os.path.exists(f"/sys/fs/cgroup/pids/toolbus/{worker.worker_id}")


async def test_status_counts_the_warm_slots(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=3, worker_options={"warm_slots": 2})
    executor = stack.executors[0]
    worker_id = stack.workers[0].worker_id

    def ours() -> WorkerStatus | None:  # workers of other tests may still be registered
        return next((w for w in executor.status().workers if w.worker_id == worker_id), None)

    await until(lambda: (status := ours()) is not None and status.slots_warm == 2)
    status = ours()
    assert status is not None and status.slots_free == 3


async def test_a_pool_closed_as_it_is_asked_to_refill_ends_its_refill_and_its_sandboxes(
    make_stack: StackFactory,
) -> None:
    # On Python 3.11, asyncio.wait_for returns the awaited result when a cancel comes in the
    # very turn the awaited event is set, swallowing the cancel: the refill loop then ran on,
    # and the worker's shutdown waited for it for ever (a hang seen in a full suite run).
    stack = await make_stack(slots=2, worker_options={"warm_slots": 2})
    worker = stack.workers[0]
    await until(lambda: len(_warm(worker)) == 2)
    await worker.wait_warmed()
    pool = worker._warm
    pool.wanted()  # the refill's event is set ...
    async with asyncio.timeout(30):
        await pool.close(5)  # ... and the cancel comes in the same turn
    assert pool._loop is not None and pool._loop.done()
    assert _warm(worker) == []  # every warm sandbox was ended
