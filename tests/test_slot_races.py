"""Races a review of the slot and lease redesign found: each test failed before its fix.

They poll the worker's state with a bound (``until``) where there is no event to await.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.client import Client

from schemas.internal import AcquireOutcome, AcquireReply, AcquireRequest, LostReason
from services._leases import LeaseStore
from services.worker import SandboxWorker, WorkerConfig
from tests._waits import until
from tests.conftest import StackFactory

_MANY_FILES = "mkdir d && cd d && seq 1 40000 | xargs touch"


async def test_two_acquires_of_one_trajectory_over_two_dirty_slots_both_get_an_answer(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack(workers=1, slots=2)
    worker = stack.workers[0]
    first, second = trajectory(), trajectory()
    for t in (first, second):  # two slots with big trees, released without reset: DIRTY
        assert (await stack.client.execute(t, "terminal", {"command": _MANY_FILES})).success
    for t in (first, second):
        await stack.client.release(t, reset_workspace=False)
    await worker.wait_settled()
    assert worker.slot_states()["dirty"] == 2
    newcomer = trajectory()
    request = AcquireRequest(trajectory_id=newcomer).model_dump_json().encode()
    subject = worker._config.subjects.worker_acquire(worker.worker_id)
    replies = await asyncio.gather(
        nc.request(subject, request, timeout=4),
        nc.request(subject, request, timeout=4),
        return_exceptions=True,
    )
    # Each acquire is answered (LEASED or CONFLICT); none is left without a reply.
    for reply in replies:
        assert not isinstance(reply, BaseException), repr(reply)
        AcquireReply.model_validate_json(reply.data)


async def test_a_rejoin_under_way_when_the_worker_stops_does_not_reopen_it(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    stack = await make_stack(workers=0)
    worker_id = f"rv-{uuid.uuid4().hex[:6]}"
    connection = await nats.connect(nats_url, name=worker_id)
    config = WorkerConfig(
        worker_id=worker_id,
        slots=2,
        workspace_root=tmp_path / worker_id,
        heartbeat_s=0.5,
        min_free_disk_mb=0,
    )
    worker = SandboxWorker(connection, config)
    await worker.__aenter__()
    try:
        busy = trajectory()
        await until(
            lambda: any(
                i.worker_id == worker_id for i, _ in stack.executors[0].registered_workers()
            )
        )
        running = asyncio.create_task(
            stack.client.execute(busy, "terminal", {"command": "sleep 3"}, timeout_s=30)
        )
        await until(lambda: bool(worker._calls.running))
        rejoin = asyncio.create_task(worker._rejoin())  # as a beat that found its registration gone
        await asyncio.sleep(0)
        stopping = asyncio.create_task(worker.__aexit__(None, None, None))
        await rejoin
        assert not stopping.done()
        # The worker is stopping (draining the sleep): it must not hand out a slot now.
        newcomer = trajectory()
        reply = await connection.request(
            config.subjects.worker_acquire(worker_id),
            AcquireRequest(trajectory_id=newcomer).model_dump_json().encode(),
            timeout=4,
        )
        outcome = AcquireReply.model_validate_json(reply.data).outcome
        await stopping
        await running
        leases = LeaseStore.on(connection.jetstream())
        stored = await leases.get(newcomer)
        assert outcome is AcquireOutcome.STOPPING, (outcome, stored)
    finally:
        await connection.drain()


async def test_a_long_call_keeps_its_lease_so_no_second_workspace_is_made(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        workers=2, slots=1, executors=2, worker_options={"slot_idle_timeout_s": 2.0}
    )
    first, other = stack.executors
    t = trajectory()
    wrote = await first.execute(
        t, "write_file", {"path": "f", "content": "x"}, timeout_s=10, uniq_id=None
    )
    assert wrote.success, wrote
    long_call = asyncio.create_task(
        first.execute(t, "terminal", {"command": "sleep 7"}, timeout_s=20, uniq_id=None)
    )
    leases = LeaseStore.on(stack.workers[0]._nc.jetstream())
    # The long call outlives the lease's TTL (twice the idle timeout): the lease must stay.
    for _ in range(25):
        await asyncio.sleep(0.25)
        assert await leases.get(t) is not None, "the lease expired while its slot was busy"
    # Another executor's call of the same trajectory while the long one still runs.
    read = await other.execute(t, "terminal", {"command": "cat f"}, timeout_s=10, uniq_id=None)
    assert (await long_call).success
    assert read.success and read.output.strip() == "x", read


async def test_a_tombstone_written_at_shutdown_stays_a_tombstone(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    stack = await make_stack(workers=0)
    worker_id = f"rv-{uuid.uuid4().hex[:6]}"
    connection = await nats.connect(nats_url, name=worker_id)
    config = WorkerConfig(
        worker_id=worker_id,
        slots=2,
        workspace_root=tmp_path / worker_id,
        heartbeat_s=0.5,
        min_free_disk_mb=0,
        slot_idle_timeout_s=2.0,  # a lease TTL refresh is due 1 s after it was written
    )
    worker = SandboxWorker(connection, config)
    await worker.__aenter__()
    try:
        t = trajectory()
        await until(
            lambda: any(
                i.worker_id == worker_id for i, _ in stack.executors[0].registered_workers()
            )
        )
        calls = [
            asyncio.create_task(
                stack.client.execute(t, "terminal", {"command": "sleep 1.5"}, timeout_s=30)
            ),
        ]
        await until(lambda: len(worker._calls.running) == 1)
        calls.append(
            asyncio.create_task(
                stack.client.execute(t, "terminal", {"command": "true"}, timeout_s=30)
            )
        )
        await until(lambda: len(worker._calls.running) == 2)  # the second waits behind it
        await worker.__aexit__(None, None, None)
        await asyncio.gather(*calls)
        leases = LeaseStore.on(connection.jetstream())
        stored = await leases.get(t)
        assert stored is not None
        assert stored[0].lost is LostReason.WORKER_STOPPED, stored
    finally:
        await connection.drain()


_DEEP = "for i in $(seq 1200); do mkdir a && cd a || exit 1; done; echo deep"


async def test_a_deeply_nested_tree_is_wiped_or_the_slot_goes_out_of_service(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(workers=1, slots=1)
    worker = stack.workers[0]
    t = trajectory()
    made = await stack.client.execute(t, "terminal", {"command": _DEEP}, timeout_s=60)
    assert made.success, made
    await stack.client.release(t, reset_workspace=True)
    await worker.wait_settled()
    states = worker.slot_states()
    assert states["wiping"] == 0, states  # stuck: neither free nor out of service


async def test_a_worker_starts_over_a_deeply_nested_workspace_left_by_its_last_run(
    nc: Client, tmp_path: Path
) -> None:
    root = tmp_path / "w"
    (root / "slot_0").mkdir(parents=True)
    fd = os.open(root / "slot_0", os.O_RDONLY)
    for _ in range(1200):
        os.mkdir("a", dir_fd=fd)
        fd = os.open("a", os.O_RDONLY, dir_fd=fd)
    config = WorkerConfig(
        worker_id=f"rv-{uuid.uuid4().hex[:6]}",
        slots=1,
        spare_slots=0,  # slot_0 alone: the one its last run left
        workspace_root=root,
        heartbeat_s=0.5,
        min_free_disk_mb=0,
    )
    async with SandboxWorker(nc, config) as worker:
        assert worker.slot_states()["free"] + worker.slot_states()["out_of_service"] == 1


async def test_a_call_without_an_id_that_an_executor_stops_waiting_for_is_not_left_running(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str
) -> None:
    # A call with a uniq_id is left running, for its retry (tests/test_retries.py); one without
    # cannot be retried safely, so it stops. Sent as a client of another language would, with
    # no uniq_id (the Python client gives every call one).
    from services.executor import ExecutorConfig, ExecutorService

    stack = await make_stack(workers=1, executors=0)
    worker = stack.workers[0]
    connection = await nats.connect(nats_url, name="rv-executor")
    try:
        t = trajectory()
        command = {"command": "sleep 2; echo done > f"}
        body = {
            "trajectory_id": t,
            "tool": {"name": "terminal", "arguments": command},
            "timeout_s": 30,
        }
        async with ExecutorService(connection, ExecutorConfig(drain_timeout_s=0.5)):
            call = asyncio.create_task(
                stack.client.nc.request(
                    "tools.execute.terminal", json.dumps(body).encode(), timeout=30
                )
            )
            await until(lambda: bool(worker._calls.running))
        # The executor has stopped, its call still running on the worker.
        answer = (await asyncio.gather(call, return_exceptions=True))[0]
        await until(lambda: not worker._calls.running)
        # Past the time the command would have finished: a run that only stopped being waited
        # for, its process left going, writes the file meanwhile.
        await asyncio.sleep(2.5)
        slot = next(s for s in worker._table if s.trajectory_id == t)
        ran = (slot.workspace / "f").exists()
    finally:
        await connection.drain()
    assert not ran, f"told {answer!r}, yet the call ran to the end"
