"""A worker drained before a scale-down (issue 11, item 6): no slot for a new trajectory, its
own trajectories served until they end, then DRAINED; at the deadline what it still holds is
given up with ``infra`` results; a resume makes it serve again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.aio.client import Client

from schemas.internal import DrainReply, DrainRequest, DrainState
from schemas.subjects import Subjects
from services.executor import ExecutorService
from services.worker import SandboxWorker
from tests._waits import until
from tests.conftest import StackFactory


async def _drain(nc: Client, worker: SandboxWorker, request: DrainRequest) -> DrainReply:
    msg = await nc.request(
        Subjects().worker_drain(worker.worker_id), request.model_dump_json().encode(), timeout=5
    )
    return DrainReply.model_validate_json(msg.data)


def _seen_as(executor: ExecutorService, worker: SandboxWorker) -> DrainState | None:
    for info, _ in executor.registered_workers():
        if info.worker_id == worker.worker_id:
            return info.drain
    return None


async def test_a_draining_worker_gives_no_new_slot_and_serves_its_trajectories_to_the_end(
    make_stack: StackFactory, nc: Client, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=1, workers=1, slots=2)
    client, executor, [draining] = stack.client, stack.executors[0], stack.workers
    mine = trajectory()
    opened = await client.execute(mine, "terminal", {"command": "echo kept > f"})
    assert opened.success and opened.metadata["worker_id"] == draining.worker_id
    other = await stack.add_worker()

    reply = await _drain(nc, draining, DrainRequest(deadline_s=60))
    assert (reply.state, reply.slots_held) == (DrainState.DRAINING, 1)
    await until(lambda: _seen_as(executor, draining) is DrainState.DRAINING, 10)
    status = executor.status()  # what `toolbus status` shows
    [shown] = [w for w in status.workers if w.worker_id == draining.worker_id]
    assert (shown.state, shown.slots_held) == ("draining", 1)
    assert status.pool.slots_by_state["draining"] == 1  # its free slot is not free

    # New trajectories go elsewhere, though the draining worker has a free slot.
    for _ in range(2):
        fresh = await client.execute(trajectory(), "terminal", {"command": "true"})
        assert fresh.success and fresh.metadata["worker_id"] == other.worker_id, fresh
    # Its own trajectory keeps its workspace and its calls run.
    again = await client.execute(mine, "terminal", {"command": "cat f"})
    assert again.success and again.output.strip() == "kept", again
    assert again.metadata["worker_id"] == draining.worker_id
    assert (await _drain(nc, draining, DrainRequest(drain=None))).state is DrainState.DRAINING

    await client.release(mine)
    await until(lambda: _seen_as(executor, draining) is DrainState.DRAINED, 10)
    reply = await _drain(nc, draining, DrainRequest(drain=None))
    assert (reply.state, reply.slots_held) == (DrainState.DRAINED, 0)


async def test_at_the_deadline_what_is_held_is_given_up_with_infra_results(
    make_stack: StackFactory, nc: Client, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=1, workers=1, slots=2)
    client, executor, [draining] = stack.client, stack.executors[0], stack.workers
    busy, idle = trajectory(), trajectory()
    for tid in (busy, idle):
        opened = await client.execute(tid, "terminal", {"command": "echo mine > f"})
        assert opened.success and opened.metadata["worker_id"] == draining.worker_id
    other = await stack.add_worker()
    running = asyncio.create_task(
        client.execute(busy, "terminal", {"command": "sleep 50"}, timeout_s=60)
    )
    await asyncio.sleep(0.5)

    began = time.monotonic()
    await _drain(nc, draining, DrainRequest(deadline_s=1.0))
    cut = await asyncio.wait_for(running, 20)
    assert time.monotonic() - began < 10  # at the deadline, not after the call's 60 s
    assert not cut.success and cut.metadata["error_kind"] == "infra", cut
    await until(lambda: _seen_as(executor, draining) is DrainState.DRAINED, 10)

    for tid in (busy, idle):  # each hears once that its workspace is lost, and why
        lost = await client.execute(tid, "terminal", {"command": "cat f"})
        assert not lost.success and lost.metadata["workspace_lost"] is True, lost
        assert lost.metadata["lost_reason"] == "worker_drained", lost
        fresh = await client.execute(tid, "terminal", {"command": "ls -A"})
        assert fresh.success and fresh.output == "", fresh  # a new, empty workspace
        assert fresh.metadata["worker_id"] == other.worker_id


async def test_a_resumed_worker_serves_again_and_a_trajectory_that_waited_gets_its_slot(
    make_stack: StackFactory, nc: Client, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=1, workers=1, slots=2)
    client, executor, [worker] = stack.client, stack.executors[0], stack.workers
    assert (await _drain(nc, worker, DrainRequest(deadline_s=60))).state is DrainState.DRAINED
    await until(lambda: _seen_as(executor, worker) is DrainState.DRAINED, 10)

    waiting = asyncio.create_task(client.execute(trajectory(), "terminal", {"command": "true"}))
    await until(lambda: executor.trajectories_waiting == 1, 10)  # no slot anywhere: it waits
    reply = await _drain(nc, worker, DrainRequest(drain=False))
    assert reply.state is DrainState.SERVING
    served = await asyncio.wait_for(waiting, 20)
    assert served.success and served.metadata["worker_id"] == worker.worker_id, served
    await until(lambda: _seen_as(executor, worker) is DrainState.SERVING, 10)


async def test_a_malformed_drain_request_is_answered_with_an_error(
    make_stack: StackFactory, nc: Client
) -> None:
    stack = await make_stack(executors=0, workers=1)
    [worker] = stack.workers
    msg = await nc.request(Subjects().worker_drain(worker.worker_id), b"{not json", timeout=5)
    reply = DrainReply.model_validate_json(msg.data)
    assert reply.state is None and reply.error is not None and "ValidationError" in reply.error
    assert (await _drain(nc, worker, DrainRequest(drain=None))).state is DrainState.SERVING


async def test_a_draining_worker_warms_no_slot_again(
    make_stack: StackFactory, nc: Client, trajectory: Callable[[], str]
) -> None:
    """A slot freed while the worker drains stays cold: the worker is about to stop, and a warm
    sandbox there would only be ended with it. A resume warms again."""
    stack = await make_stack(executors=1, workers=1, slots=2, worker_options={"warm_slots": 2})
    client, [draining] = stack.client, stack.workers
    await draining.wait_warmed()
    assert draining.info().slots_warm == 2
    tid = trajectory()
    assert (await client.execute(tid, "terminal", {"command": "true"})).success
    assert draining.info().slots_warm == 1

    assert (await _drain(nc, draining, DrainRequest(deadline_s=60))).state is DrainState.DRAINING
    await client.release(tid, reset_workspace=True)
    await draining.wait_settled()  # its slot is wiped and FREE
    assert (await _drain(nc, draining, DrainRequest(drain=None))).state is DrainState.DRAINED
    await draining.wait_warmed()
    assert draining.info().slots_warm == 1

    assert (await _drain(nc, draining, DrainRequest(drain=False))).state is DrainState.SERVING
    await until(lambda: draining.info().slots_warm == 2, 20)
