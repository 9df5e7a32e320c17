"""Trajectories that outnumber the slots wait in one queue, in arrival order, across executors.

Before the waiting queue (shared/issue 10, item 4) every waiting executor polled the workers
every 0.5 s, so a freed slot went to whichever poller asked first: the order test failed there.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.aio.msg import Msg

from schemas.internal import SlotOfferReply, SlotWaiter
from schemas.subjects import WAITING_STREAM, Subjects
from services._kv import ttl_header
from services._leases import LeaseStore
from services.exceptions import NoCapacity
from services.executor import ExecutorConfig
from tests._waits import until
from tests.conftest import Stack, StackFactory


def _until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> Awaitable[None]:
    return until(predicate, timeout_s, every_s=0.01)


def _waiting(stack: Stack) -> int:
    return sum(executor.trajectories_waiting for executor in stack.executors)


async def _queued_tickets(stack: Stack) -> int:
    js = stack.client.nc.jetstream()
    return (await js.stream_info(WAITING_STREAM)).state.messages


async def test_waiters_get_freed_slots_in_arrival_order_across_executors(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        executors=2, slots=1, executor_config=ExecutorConfig(acquire_timeout_s=120)
    )
    client = stack.client
    holder = trajectory()
    assert (await client.execute(holder, "terminal", {"command": "true"})).success
    served: list[int] = []

    async def wait_then_work(index: int, trajectory_id: str) -> None:
        result = await client.execute(trajectory_id, "terminal", {"command": "true"})
        assert result.success, result.error
        served.append(index)
        await client.release(trajectory_id, reset_workspace=True)

    waiters = []
    for index in range(8):
        waiters.append(asyncio.create_task(wait_then_work(index, trajectory())))
        await _until(lambda index=index: _waiting(stack) == index + 1)  # type: ignore[misc]
    status = await client.status()  # the queue is the session's: earlier tickets may linger
    assert status.waiting.trajectories >= 8
    assert status.waiting.longest_wait_s > 0
    await client.release(holder, reset_workspace=True)
    async with asyncio.timeout(120):
        await asyncio.gather(*waiters)
    assert served == list(range(8))
    assert _waiting(stack) == 0


async def test_a_waiter_that_times_out_gets_503_and_holds_no_slot(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=1, executor_config=ExecutorConfig(acquire_timeout_s=1))
    client = stack.client
    holder = trajectory()
    assert (await client.execute(holder, "terminal", {"command": "true"})).success
    with pytest.raises(NoCapacity, match="no free slot within 1s"):
        await client.execute(trajectory(), "terminal", {"command": "true"})
    assert _waiting(stack) == 0
    await client.release(holder, reset_workspace=True)
    # The slot freed after the waiter gave up is free for the next one, not held for it.
    assert (await client.execute(trajectory(), "terminal", {"command": "true"})).success


async def test_tickets_nobody_takes_up_any_more_give_the_slot_to_the_next_waiter(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str
) -> None:
    stack = await make_stack(slots=1, executor_config=ExecutorConfig(acquire_timeout_s=120))
    client, executor = stack.client, stack.executors[0]
    holder = trajectory()
    assert (await client.execute(holder, "terminal", {"command": "true"})).success
    subjects = Subjects()
    # Ahead in the queue: the ticket of an executor that is gone (nobody answers its offers),
    # and one this executor no longer waits for (it declines the offer).
    orphans = [
        SlotWaiter(
            ticket=uuid.uuid4().hex,
            trajectory_id=trajectory(),
            offer_to=offer_to,
            deadline=time.time() + 120,
            enqueued_at=time.time(),
        )
        for offer_to in (
            subjects.executor_offers("gone-executor"),
            subjects.executor_offers(executor.executor_id),
        )
    ]
    publisher = await nats.connect(nats_url)
    try:
        js = publisher.jetstream()
        for orphan in orphans:  # with a TTL, as executors put them: none outlives the test
            await js.publish(
                subjects.waiting, orphan.model_dump_json().encode(), headers=ttl_header(120)
            )
    finally:
        await publisher.drain()
    latecomer = trajectory()
    waiting = asyncio.create_task(client.execute(latecomer, "terminal", {"command": "pwd"}))
    await _until(lambda: _waiting(stack) == 1)
    await client.release(holder, reset_workspace=True)
    async with asyncio.timeout(60):
        result = await waiting
    assert result.success, result.error
    assert await _queued_tickets(stack) == 0
    leases = LeaseStore.on(client.nc.jetstream())
    for orphan in orphans:  # the orphans' slots were given back, not leased to them for ever
        assert await leases.get(orphan.trajectory_id) is None


async def test_a_declined_offer_never_takes_the_slot_from_a_call_that_reached_it(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str
) -> None:
    # A waiter that gave up (its executor declines the offer) may come back through another
    # executor, find the lease the worker wrote, and work in the slot before the decline
    # arrives: that slot is the trajectory's now and must stay so.
    stack = await make_stack(slots=1, executor_config=ExecutorConfig(acquire_timeout_s=60))
    client = stack.client
    holder, returning = trajectory(), trajectory()
    assert (await client.execute(holder, "terminal", {"command": "true"})).success
    subjects = Subjects()
    offers = f"{subjects.executor_offers('a-test-executor')}"
    answered = asyncio.Event()
    test_nc = await nats.connect(nats_url)
    try:

        async def on_offer(msg: Msg) -> None:
            # Before declining: the trajectory's call, through the real executor, which reads
            # the lease the worker has just written.
            wrote = await client.execute(
                returning, "write_file", {"path": "mine.txt", "content": "kept"}
            )
            assert wrote.success, wrote.error
            await msg.respond(SlotOfferReply(accepted=False).model_dump_json().encode())
            answered.set()

        await test_nc.subscribe(offers, cb=on_offer)
        ticket = SlotWaiter(
            ticket=uuid.uuid4().hex,
            trajectory_id=returning,
            offer_to=offers,
            deadline=time.time() + 60,
            enqueued_at=time.time(),
        )
        await test_nc.jetstream().publish(
            subjects.waiting, ticket.model_dump_json().encode(), headers=ttl_header(60)
        )
        await client.release(holder, reset_workspace=True)
        async with asyncio.timeout(60):
            await answered.wait()
            while await _queued_tickets(stack):  # noqa: ASYNC110 (acknowledged after the offer)
                await asyncio.sleep(0.05)
        read = await client.execute(returning, "read_file", {"path": "mine.txt"})
        assert read.success and read.output == "kept", read
        await client.release(returning, reset_workspace=True)
    finally:
        await test_nc.drain()
