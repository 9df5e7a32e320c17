"""A freed slot goes to the first waiter, never to a newcomer that asks the worker directly.

Before the worker kept a view of the queue (services/_waiting.py ``QueueView``), a new
trajectory's direct acquire that reached the worker while a slot was free and the first
waiter's ticket was not served yet (not fetched, or fetched and its offer being prepared) took
the slot: the first two tests failed there, the newcomer served first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from schemas.subjects import WAITING_CONSUMER, WAITING_STREAM, Subjects
from services.executor import ExecutorConfig
from services.worker import SandboxWorker
from tests._waits import until
from tests.conftest import Stack, StackFactory


def _waiting(stack: Stack) -> int:
    return sum(executor.trajectories_waiting for executor in stack.executors)


@pytest.fixture
async def empty_queue(nc: Client) -> None:
    """The waiting stream is the session's: no ticket of an earlier test is served first."""
    with contextlib.suppress(NotFoundError):  # not made yet: the first executor makes it
        await nc.jetstream().purge_stream(WAITING_STREAM)


class _Order:
    """Runs trajectories' first calls and notes the order they were served in."""

    def __init__(self, stack: Stack) -> None:
        self._client = stack.client
        self.served: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, trajectory_id: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self._work(trajectory_id))
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        """Cancel the calls a failed test left waiting."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _work(self, trajectory_id: str) -> None:
        result = await self._client.execute(trajectory_id, "terminal", {"command": "true"})
        assert result.success, result.error
        self.served.append(trajectory_id)


@contextlib.asynccontextmanager
async def _holding_the_only_slot(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> AsyncIterator[tuple[Stack, SandboxWorker, str, _Order]]:
    stack = await make_stack(slots=1, executor_config=ExecutorConfig(acquire_timeout_s=120))
    holder = trajectory()
    assert (await stack.client.execute(holder, "terminal", {"command": "true"})).success
    order = _Order(stack)
    try:
        yield stack, stack.workers[0], holder, order
    finally:
        await order.close()


async def _newcomer_waits_behind_first(
    stack: Stack, order: _Order, newcomer: asyncio.Task[None]
) -> None:
    """The newcomer joins the queue behind the first waiter (its executor queues it)."""
    await until(lambda: newcomer.done() or _waiting(stack) == 2)
    assert not newcomer.done(), f"the newcomer was served first: {order.served}"


async def _served_in_order(
    stack: Stack, order: _Order, first: tuple[str, asyncio.Task[None]], newcomer: str
) -> None:
    """The first waiter gets the slot; the newcomer gets it when the first releases it."""
    async with asyncio.timeout(60):
        await first[1]
    assert order.served == [first[0]]
    await stack.client.release(first[0], reset_workspace=True)
    async with asyncio.timeout(60):
        await asyncio.gather(*order.tasks)
    assert order.served == [first[0], newcomer]


async def test_a_newcomer_does_not_take_a_freed_slot_whose_ticket_is_being_served(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    empty_queue: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _holding_the_only_slot(make_stack, trajectory) as (stack, worker, holder, order):
        # The worker's serving of a ticket it has fetched waits at a gate of this test.
        offers = worker._offers
        take_slot = offers._take_slot
        fetched, gate = asyncio.Event(), asyncio.Event()

        async def gated_take_slot(ticket: Msg) -> object:
            fetched.set()
            await gate.wait()
            return await take_slot(ticket)

        monkeypatch.setattr(offers, "_take_slot", gated_take_slot)
        first, newcomer = trajectory(), trajectory()
        first_call = order.start(first)
        await until(lambda: _waiting(stack) == 1)
        await stack.client.release(holder, reset_workspace=True)
        async with asyncio.timeout(30):
            await fetched.wait()
        assert worker.slots_free == 1  # free, and the first waiter's ticket not served yet
        try:
            await _newcomer_waits_behind_first(stack, order, order.start(newcomer))
        finally:
            gate.set()
        await _served_in_order(stack, order, (first, first_call), newcomer)


async def test_a_newcomer_does_not_take_a_freed_slot_before_the_worker_looked_at_the_queue(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    empty_queue: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _holding_the_only_slot(make_stack, trajectory) as (stack, worker, holder, order):
        first, newcomer = trajectory(), trajectory()
        first_call = order.start(first)
        await until(lambda: _waiting(stack) == 1)
        # The worker's ticket serving does not hear that a slot freed (it pulls no ticket)
        # until the test lets it: the slot is free, the first waiter's ticket in the stream.
        offers = worker._offers
        wake = offers.wake
        monkeypatch.setattr(offers, "wake", lambda: None)
        await stack.client.release(holder, reset_workspace=True)
        assert worker.slots_free == 1
        try:
            await _newcomer_waits_behind_first(stack, order, order.start(newcomer))
        finally:
            monkeypatch.setattr(offers, "wake", wake)
            wake()
        await _served_in_order(stack, order, (first, first_call), newcomer)


async def test_with_nobody_waiting_a_new_trajectory_gets_a_free_slot_without_queueing(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client, empty_queue: None
) -> None:
    async with _holding_the_only_slot(make_stack, trajectory) as (stack, worker, holder, _):
        tickets: list[bytes] = []

        async def on_ticket(msg: Msg) -> None:
            tickets.append(msg.data)

        watch = await nc.subscribe(Subjects().waiting, cb=on_ticket)
        try:
            # A slot freed after a time with none free (the worker looks at the queue first),
            # then a slot free all along: both go straight to a new trajectory.
            await stack.client.release(holder, reset_workspace=True)
            for _ in range(2):
                newcomer = trajectory()
                call = await stack.client.execute(newcomer, "terminal", {"command": "true"})
                assert call.success, call.error
                await stack.client.release(newcomer, reset_workspace=True)
            await nc.flush()
        finally:
            await watch.unsubscribe()
        assert tickets == []
        assert _waiting(stack) == 0
        assert worker.slots_free == 1


async def test_slots_freed_together_go_to_their_waiters_with_one_look_and_in_order(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    nc: Client,
    empty_queue: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rollouts release in bursts: three slots freed at once are served from one look at the
    queue (a pull for up to three tickets), not three looks one after the other, each a
    JetStream round trip that the third waiter would wait behind; and still in arrival order."""
    stack = await make_stack(slots=3, executor_config=ExecutorConfig(acquire_timeout_s=120))
    worker = stack.workers[0]
    holders = [trajectory() for _ in range(3)]
    for holder in holders:
        assert (await stack.client.execute(holder, "terminal", {"command": "true"})).success
    order = _Order(stack)
    pulls: list[bytes] = []

    async def on_pull(msg: Msg) -> None:
        pulls.append(msg.data)

    watch = await nc.subscribe(
        f"$JS.API.CONSUMER.MSG.NEXT.{WAITING_STREAM}.{WAITING_CONSUMER}", cb=on_pull
    )
    try:
        waiters = [trajectory() for _ in range(3)]
        for count, waiter in enumerate(waiters, start=1):
            order.start(waiter)
            await until(lambda count=count: _waiting(stack) == count)
        # The three slots free before the worker looks (as when releases come together).
        offers = worker._offers
        wake = offers.wake
        monkeypatch.setattr(offers, "wake", lambda: None)
        for holder in holders:
            await stack.client.release(holder, reset_workspace=True)
        pulls.clear()
        monkeypatch.setattr(offers, "wake", wake)
        wake()
        async with asyncio.timeout(60):
            await asyncio.gather(*order.tasks)
        # Given in arrival order (the first calls then run side by side, and end in any order).
        slots = [worker._table.holding(waiter) for waiter in waiters]
        epochs = [slot.epoch for slot in slots if slot is not None]
        assert len(epochs) == 3 and epochs == sorted(epochs), slots
        await nc.flush()
        assert b'"batch":3' in pulls[0], pulls
    finally:
        await watch.unsubscribe()
        await order.close()
