"""What an executor and the leases bucket keep is bounded, and ends with the executor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats
import pytest
from nats.aio.client import Client

from schemas.internal import Lease
from schemas.subjects import LEASES_BUCKET, WAITING_STREAM, Subjects
from services._kv import encode_key
from services._leases import LeaseCache
from services.exceptions import NoCapacity
from services.executor import ExecutorConfig, ExecutorService
from tests.conftest import StackFactory


async def test_a_stopping_executor_ends_its_acquisitions_instead_of_leaving_them_running(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack(slots=1, executor_config=ExecutorConfig(acquire_timeout_s=30))
    worker = stack.workers[0]
    holder, waiter = trajectory(), trajectory()
    config = ExecutorConfig(acquire_timeout_s=30, drain_timeout_s=0.5)
    async with ExecutorService(nc, config) as leaving:
        await leaving.execute(holder, "terminal", {"command": "true"}, timeout_s=5, uniq_id=None)
        waiting = asyncio.create_task(
            leaving.execute(waiter, "terminal", {"command": "true"}, timeout_s=5, uniq_id=None)
        )
        await asyncio.sleep(0.3)  # it waits for a slot
    # The executor is gone: so is its acquisition, at once (not after acquire_timeout_s), and
    # freeing the slot now must not let a leftover of it take the slot.
    with pytest.raises((asyncio.CancelledError, NoCapacity)):
        await asyncio.wait_for(waiting, 10)
    await stack.client.release(holder, reset_workspace=True)
    # Its ticket is still queued: the worker serves it (nobody takes the offer) and frees the
    # slot again before it acknowledges it; only then is the queue empty.
    js = nc.jetstream()
    async with asyncio.timeout(30):
        while (await js.stream_info(WAITING_STREAM)).state.messages:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        while worker.slots_free != 1:  # noqa: ASYNC110 (worker state with no event to await)
            await asyncio.sleep(0.05)
    await worker.wait_settled()
    assert worker.slots_free == 1
    assert worker.slot_states()["free"] == 1


async def test_leases_expire_after_their_slot_would_so_abandoned_ones_do_not_pile_up(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack(worker_options={"slot_idle_timeout_s": 600})
    tid = trajectory()
    assert (await stack.client.execute(tid, "terminal", {"command": "true"})).success
    stored = await nc.jetstream().get_last_msg(
        f"KV_{LEASES_BUCKET}", f"$KV.{LEASES_BUCKET}.{encode_key(tid)}"
    )
    assert stored.headers is not None
    assert stored.headers.get("Nats-TTL") == "1200"  # twice slot_idle_timeout_s
    await stack.client.release(tid)


def test_the_lease_cache_keeps_the_most_recently_used_leases_only() -> None:
    cache = LeaseCache(max_entries=3)
    leases = {
        f"t{i}": Lease(worker_id="w", incarnation="i", slot=i, epoch=i, acquired_at=0.0)
        for i in range(5)
    }
    for tid in ("t0", "t1", "t2"):
        cache.put(tid, leases[tid])
    assert cache.get("t0") == leases["t0"]  # used: t1 is now the oldest
    cache.put("t3", leases["t3"])
    cache.put("t4", leases["t4"])
    assert len(cache) == 3
    assert [cache.get(t) is not None for t in ("t0", "t1", "t2", "t3", "t4")] == [
        True,
        False,
        False,
        True,
        True,
    ]
    cache.forget("t0", leases["t1"])  # not the one it holds: kept
    assert cache.get("t0") is not None
    cache.forget("t0")
    assert cache.get("t0") is None


def test_the_lease_cache_drops_leases_not_used_for_its_idle_time() -> None:
    now = [0.0]
    cache = LeaseCache(idle_s=60.0, clock=lambda: now[0])
    lease = Lease(worker_id="w", incarnation="i", slot=0, epoch=1, acquired_at=0.0)
    cache.put("released-elsewhere", lease)
    cache.put("busy", lease)
    for _ in range(3):  # used every 30 s: kept; the other one is not used again
        now[0] += 30.0
        assert cache.get("busy") == lease
    assert cache.get("released-elsewhere") is None
    assert len(cache) == 1


async def test_an_executor_whose_start_fails_late_leaves_nothing_subscribed(
    nats_url: str, nc: Client
) -> None:
    # Its last step (a flush) fails after it has subscribed in the queue group: what it
    # subscribed must go with the failed start, or the queue group routes calls to it.
    connection = await nats.connect(nats_url, name="failed-start")
    real_flush = connection.flush

    async def failing_flush(timeout: int = 10) -> None:
        raise nats.errors.FlushTimeoutError

    try:
        connection.flush = failing_flush  # type: ignore[method-assign]
        with pytest.raises(nats.errors.FlushTimeoutError):
            await ExecutorService(connection, ExecutorConfig()).__aenter__()
        connection.flush = real_flush  # type: ignore[method-assign]
        await connection.flush()
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(Subjects().list_tools, b"", timeout=5)
    finally:
        await connection.close()
